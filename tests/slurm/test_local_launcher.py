"""``knots-run -m hydra/launcher=local``: submitit's local executor runs the sweep's jobs at once, each in
its own process, with the same job directories and failure reporting as Hydra's own launcher."""

from __future__ import annotations

import json

from experiments.collect import main as collect_main
from tests.slurm.helpers import job_record, run_sweep, sweep_args


def test_local_launcher_runs_every_job_and_reports_the_failing_one(tiny_env, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    proc = run_sweep(tmp_path, sweep_args(tiny_env, sweep, "methods=[nope],[ta]", launcher="local"))
    assert proc.returncode == 1
    assert "Submitit 'local' sweep output dir" in proc.stdout
    assert "error: unknown method 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    assert list(json.loads((sweep / "1" / "results.json").read_text())["methods"]) == ["ta"]
    # Two processes of their own, not the launching one.
    assert len({job_record(sweep / str(i))["hydra_job_id"] for i in (0, 1)}) == 2

    assert collect_main([str(sweep)]) == 0
    job_id = job_record(sweep / "0")["hydra_job_id"]
    assert f"methods=[nope] (log: .submitit/{job_id}/{job_id}_0_log.err)" in capsys.readouterr().out
