"""A finetune job stopped mid-training by the scheduler resumes from its last finetuning checkpoint:
requeued by submitit when preempted, or submitted again after being killed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.slurm.helpers import job_env, job_record, run_sweep, squeue, stop_sweep, sweep_args, wait_for

pytestmark = pytest.mark.slurm

STEPS, EVERY = 300, 10
#: Two tasks trained long enough (in tiny steps) to be caught between two checkpoints.
FINETUNE = ["methods=[ta]", "benchmark.select=[mood,topic]", f"finetune.steps={STEPS}",
            f"finetune.checkpoint_every={EVERY}", "finetune.log_every=50"]


def start_sweep(tiny_env: Path, tmp_path: Path, sweep: Path) -> subprocess.Popen:
    return subprocess.Popen(sweep_args(tiny_env, sweep, *FINETUNE), cwd=tmp_path, env=job_env(tmp_path / "logs"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def checkpoints(tmp_path: Path) -> list[Path]:
    """The finetuning checkpoints of adapters in training (``<cache>/adapters/<task>-<key>.partial``)."""
    from knots.pipeline.cache import is_complete

    return sorted(p for p in (tmp_path / "logs" / "cache" / "adapters").glob("*.partial") if is_complete(p))


def interrupted_task(tmp_path: Path) -> str:
    """The task whose training was stopped (the job must not be running)."""
    partial = checkpoints(tmp_path)
    assert len(partial) == 1, f"expected one adapter stopped in training, found {partial}: raise STEPS"
    return partial[0].name.split("-")[0]


def resumed(results_path: Path, task: str) -> int:
    adapters = {a["task"]: a for a in json.loads(results_path.read_text())["meta"]["adapters"]}
    assert not adapters[task]["reused"]
    return adapters[task]["resumed_from"]


def test_preempted_finetune_job_is_requeued_and_resumes(slurm_cluster, tiny_env, tmp_path):
    sweep = tmp_path / "sweep"
    proc = start_sweep(tiny_env, tmp_path, sweep)
    try:
        wait_for(lambda: checkpoints(tmp_path), 180, "a finetuning checkpoint", proc)
        job = job_record(sweep / "0")["hydra_job_id"]
        # What a preemption looks like to the job, as submitit sends it (SIGTERM, then its USR2 signal):
        # submitit checkpoints the job and requeues it.
        for signal in ("TERM", "USR2"):
            subprocess.run(["scancel", f"--signal={signal}", job], check=True)
        # SLURM holds a requeued job for two minutes; let it start in 5 s instead (not at once: the node
        # refuses to start a job within the second in which it revoked the job's previous credential).
        wait_for(lambda: squeue(job) == ("PENDING", "BeginTime"), 60, "the job to be requeued", proc)
        task = interrupted_task(tmp_path)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+5"], check=True)
        out, err = proc.communicate(timeout=300)
    finally:
        stop_sweep(proc, sweep)
    assert proc.returncode == 0, err[-3000:]
    assert "this job is preempted" in (sweep / ".submitit" / job / f"{job}_0_log.err").read_text()
    assert f"Requeued job {job}" in (sweep / "0" / "run.log").read_text()
    step = resumed(sweep / "0" / "results.json", task)
    assert 0 < step < STEPS and step % EVERY == 0


def test_killed_finetune_job_resumes_when_submitted_again(slurm_cluster, tiny_env, tmp_path):
    proc = start_sweep(tiny_env, tmp_path, tmp_path / "killed")
    try:
        wait_for(lambda: checkpoints(tmp_path), 180, "a finetuning checkpoint", proc)
        job = job_record(tmp_path / "killed" / "0")["hydra_job_id"]
        # The hardest stop: SIGKILL to the job step running the training (a plain `scancel` sends
        # SIGTERM first, which submitit ignores, and SIGKILL after the cluster's KillWait).
        subprocess.run(["scancel", "--signal=KILL", f"{job}.0"], check=True)
        wait_for(lambda: squeue(job) == ("", ""), 60, "the killed job to leave the queue")
        task = interrupted_task(tmp_path)
    finally:
        # Without accounting (sacct), submitit cannot learn how a job that wrote no result ended, and
        # waits; on a cluster with accounting it reports the job as failed. Stop the launching process.
        stop_sweep(proc, tmp_path / "killed")
    again = run_sweep(tmp_path, sweep_args(tiny_env, tmp_path / "again", *FINETUNE))
    assert again.returncode == 0, again.stderr[-3000:]
    step = resumed(tmp_path / "again" / "0" / "results.json", task)
    assert 0 < step < STEPS and step % EVERY == 0
