"""Finetuning fanned out over SLURM, one job per task, into the shared adapter cache
(``knots-run -m stage=finetune benchmark.select=[a],[b],[c]``); a following ``knots-run`` merges from the
cache and trains nothing. Two jobs finetuning the same task at once leave one complete adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.pipeline.helpers import TINY_OVERRIDES
from tests.slurm.helpers import job_env, run_sweep, sweep_args

pytestmark = pytest.mark.slurm


@cache
def has_stages() -> bool:
    """Whether ``knots-run`` has the ``stage`` setting (``stage=finetune`` finetunes and stops)."""
    from hydra import compose, initialize_config_dir

    from knots.config import register_configs
    from tests.pipeline.helpers import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return "stage" in compose("run", overrides=["logger=none"])


needs_stages = pytest.mark.skipif("not has_stages()", reason="needs knots-run's `stage` setting (stage=finetune: finetune and stop)")


def cached_adapters(tmp_path: Path) -> dict[str, list[Path]]:
    """Adapter directories of the shared cache by task (in-training ``.partial`` ones included; lock
    files are not adapters)."""
    out: dict[str, list[Path]] = {}
    for path in sorted(p for p in (tmp_path / "logs" / "cache" / "adapters").iterdir() if p.is_dir()):
        out.setdefault(path.name.split("-")[0], []).append(path)
    return out


def is_complete(adapter: Path) -> bool:
    return all((adapter / f).is_file() for f in ("adapter_config.json", "adapter_model.safetensors", "knots_meta.json"))


@needs_stages
def test_finetune_fanout_then_merge_trains_nothing(slurm_cluster, tiny_env, tmp_path):
    fan = run_sweep(tmp_path, sweep_args(tiny_env, tmp_path / "finetune", "stage=finetune",
                                         "benchmark.select=[mood],[topic],[review]"))
    assert fan.returncode == 0, fan.stderr[-3000:]
    adapters = cached_adapters(tmp_path)
    assert sorted(adapters) == ["mood", "review", "topic"]
    assert all(len(paths) == 1 and is_complete(paths[0]) for paths in adapters.values())
    stamps = {p: p.stat().st_mtime_ns for paths in adapters.values() for p in paths}

    merge = subprocess.run([sys.executable, "-m", "knots.cli.run", f"hydra.searchpath=[file://{tiny_env}]", *TINY_OVERRIDES,
                            "logger=none", "methods=[ta]", f"hydra.run.dir={tmp_path}/merge"],
                           cwd=tmp_path, env=job_env(tmp_path / "logs"), capture_output=True, text=True, timeout=300)
    assert merge.returncode == 0, merge.stderr[-3000:]
    meta = json.loads((tmp_path / "merge" / "results.json").read_text())["meta"]
    assert [(a["task"], a["reused"]) for a in meta["adapters"]] == [("mood", True), ("topic", True), ("review", True)]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@needs_stages
def test_two_jobs_finetuning_the_same_task_leave_one_complete_adapter(slurm_cluster, tiny_env, tmp_path):
    # The local cluster runs both jobs at once (one core each).
    fan = run_sweep(tmp_path, sweep_args(tiny_env, tmp_path / "finetune", "stage=finetune",
                                         "benchmark.select=[mood],[mood]", "finetune.steps=60"))
    assert fan.returncode == 0, fan.stderr[-3000:]
    (mood,) = cached_adapters(tmp_path).values()
    assert len(mood) == 1 and is_complete(mood[0]) and not mood[0].name.endswith(".partial")
