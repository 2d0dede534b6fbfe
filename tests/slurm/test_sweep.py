"""``knots-run -m hydra/launcher=slurm``: every job of a sweep runs as a SLURM job and writes its results
where Hydra's own launcher would; a failing job is reported while the others finish."""

from __future__ import annotations

import json

import pytest

from experiments.collect import main as collect_main
from tests.slurm.helpers import run_sweep, sweep_args

pytestmark = pytest.mark.slurm


def test_three_job_sweep_runs_every_job_on_slurm(slurm_cluster, tiny_env, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    proc = run_sweep(tmp_path, sweep_args(tiny_env, sweep, "methods=[ta]", "finetune.seed=0,1,2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Submitit 'slurm' sweep output dir" in proc.stdout

    jobs = [sweep / str(i) for i in range(3)]
    records = [json.loads((job / "job.json").read_text()) for job in jobs]
    # Three SLURM jobs (one array), each of which wrote its own complete results.
    assert len({r["slurm_job_id"] for r in records}) == 3 and all(r["slurm_job_id"] for r in records)
    assert [r["hydra_job_id"] for r in records] == [f"{records[0]['hydra_job_id'].split('_')[0]}_{i}" for i in range(3)]
    adapters = set()
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        assert list(results["methods"]) == ["ta"]
        assert results["meta"]["tasks"] == ["mood", "topic", "review"]
        assert 0 <= results["methods"]["ta"]["avg_accuracy"] <= 100
        adapters |= {a["path"] for a in results["meta"]["adapters"]}
    assert len(adapters) == 9  # three seeds x three tasks: nothing shared between the jobs

    # One W&B group for the sweep, named like the sweep directory's default name (its start time).
    groups = {r["group"] for r in records}
    assert len(groups) == 1 and groups.pop().count("-") == 4

    assert collect_main([str(sweep)]) == 0
    md = capsys.readouterr().out
    assert all(f"| finetune.seed={s} | ta |" in md for s in range(3)) and "Failed" not in md


def test_failing_job_is_reported_and_the_others_finish(slurm_cluster, tiny_env, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    proc = run_sweep(tmp_path, sweep_args(tiny_env, sweep, "methods=[nope],[ta]"))
    assert proc.returncode == 1
    assert "error: unknown method 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (sweep / "0" / "results.json").exists()
    assert list(json.loads((sweep / "1" / "results.json").read_text())["methods"]) == ["ta"]

    assert collect_main([str(sweep)]) == 0
    md = capsys.readouterr().out
    failed = md.split("Failed jobs (no results.json): ")[1]
    job_id = json.loads((sweep / "0" / "job.json").read_text())["hydra_job_id"]
    assert failed.strip() == f"methods=[nope] (log: .submitit/{job_id}/{job_id}_0_log.err)"
    assert "| methods=[ta] | ta |" in md
