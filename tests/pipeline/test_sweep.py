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
    results = json.loads((sweep / "1" / "results.json").read_text())
    assert list(results["methods"]) == ["ta", "ensemble"]

    assert collect_main([str(sweep)]) == 0
    md = (sweep / "comparison.md").read_text()
    assert "| methods=[ta,ensemble] | ta |" in md and "| methods=[ta,ensemble] | ensemble |" in md
    assert "Failed jobs" in md and "methods=[nope]" in md
    tex = (sweep / "comparison.tex").read_text()
    assert "\\begin{tabular}" in tex and "ensemble" in tex
    assert capsys.readouterr().out == md


def test_sweep_jobs_share_a_wandb_group(tiny_env, monkeypatch, tmp_path):
    """In a -m sweep every job's W&B run joins the group named after the sweep directory (unless
    logger.group is set); a single run has no group."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    import knots.pipeline.run
    from knots.cli.run import _task
    from knots.config import register_configs
    from tests.pipeline.helpers import CONF_DIR

    groups = []
    monkeypatch.setattr(knots.pipeline.run, "run_experiment", lambda cfg, out, resolved: groups.append(cfg.logger.group) or {})
    register_configs()
    for mode, extra in ((RunMode.MULTIRUN, []), (RunMode.RUN, []), (RunMode.MULTIRUN, ["logger.group=mine"])):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("run", overrides=[f"hydra.searchpath=[file://{tiny_env}]", *TINY_OVERRIDES, f"paths.log_dir={tmp_path}",
                                            f"hydra.sweep.dir={tmp_path}/my-sweep", *extra], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = mode
            cfg.hydra.runtime.output_dir = str(tmp_path / "job")
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        _task(cfg)
    assert groups == ["my-sweep", None, "mine"]
