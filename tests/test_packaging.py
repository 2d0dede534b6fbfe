"""A wheel install works from any directory: the configuration ships inside the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.merging.helpers import write_peft_adapter
from tests.pipeline.helpers import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project built as a wheel and installed (without dependencies) into a fresh target directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp / "dist").glob("knots-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp / "site"), str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    return tmp / "site"


def run(site: Path, program: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "KNOTS_LOG_DIR": str(cwd / "outputs")}
    env.pop("KNOTS_CONFIG_DIR", None)
    return subprocess.run([str(site / "bin" / program), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_ships_the_configuration(installed):
    conf = installed / "knots" / "conf"
    assert (conf / "run.yaml").is_file() and not (conf / "run.yaml").is_symlink()
    shipped = {p.relative_to(conf) for p in conf.rglob("*.yaml")}
    in_checkout = {p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml") if "local" not in p.parts}
    assert shipped == in_checkout


def test_knots_merge_from_a_wheel_in_another_directory(installed, tmp_path):
    for seed in (0, 1):
        write_peft_adapter(tmp_path / f"task{seed}", seed=seed)
    proc = run(installed, "knots-merge", "adapters=[task0,task1]", "method=knots_ties", "out=merged", "progress=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert summary["method"]["name"] == "knots_ties" and summary["hyperparameters"]["top_k"] == 20  # conf/method default


def test_knots_run_from_a_wheel_in_another_directory(installed, tiny_env, tmp_path):
    proc = run(installed, "knots-run", f"hydra.searchpath=[file://{tiny_env}]", *TINY_OVERRIDES, "methods=[ta,regmean]",
               "logger=none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = next((tmp_path / "outputs" / "runs").glob("*/results.json"))
    assert set(json.loads(results.read_text())["methods"]) == {"ta", "regmean"}
