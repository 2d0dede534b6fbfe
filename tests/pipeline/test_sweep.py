"""``knots-run -m``: a failing job does not stop the others; ``experiments.collect`` tabulates the sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from experiments.collect import main as collect_main
from tests.pipeline.helpers import TINY_OVERRIDES


def test_sweep_with_a_failing_job_finishes_the_others(tiny_env, tmp_path, capsys):
    env = {**os.environ, "KNOTS_LOG_DIR": str(tmp_path / "logs")}
    env.pop("HYDRA_FULL_ERROR", None)
    args = [sys.executable, "-m", "knots.cli.run", "-m", f"hydra.searchpath=[file://{tiny_env}]",
            *TINY_OVERRIDES, "logger=none", "methods=[nope],[ta,ensemble]", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0  # the sweep reports its failed job
    assert "unknown method 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    sweep = tmp_path / "sweep"
    assert not (sweep / "0" / "results.json").exists()
    (job_log,) = (sweep / "0").glob("*.log")  # the failed job's own log says why
    assert "error: unknown method 'nope'" in job_log.read_text()
    results = json.loads((sweep / "1" / "results.json").read_text())
    assert list(results["methods"]) == ["ta", "ensemble"]

    assert collect_main([str(sweep)]) == 0
    md = (sweep / "comparison.md").read_text()
    assert "| methods=[ta,ensemble] | ta |" in md and "| methods=[ta,ensemble] | ensemble |" in md
    assert "Failed jobs" in md and "methods=[nope]" in md
    tex = (sweep / "comparison.tex").read_text()
    assert "\\begin{tabular}" in tex and "ensemble" in tex
    assert capsys.readouterr().out == md
