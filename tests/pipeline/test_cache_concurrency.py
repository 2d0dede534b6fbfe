"""Two real ``knots-run`` processes sharing one adapter cache (as jobs of a cluster do).

Finetuning one entry is locked: a second job finetuning the same task waits for the first and reuses
its adapter; a job killed mid-training leaves no entry that looks complete, releases its lock, and
the next job resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from knots.atomic import verify_directory
from knots.pipeline.cache import is_complete
from tests.pipeline.helpers import TINY_OVERRIDES

STEPS = 60


def start(tiny_env: Path, work: Path, cache: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """``knots-run stage=finetune`` of the tiny benchmark's mood task, run directory ``work/name``."""
    run_dir = work / name
    env = {**os.environ, "KNOTS_LOG_DIR": str(work / "logs")}
    env.pop("HYDRA_FULL_ERROR", None)
    args = [sys.executable, "-m", "knots.cli.run", f"hydra.searchpath=[file://{tiny_env}]", *TINY_OVERRIDES, "logger=none",
            "stage=finetune", "benchmark.select=[mood]", f"finetune.steps={STEPS}", f"paths.cache_dir={cache}",
            f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), run_dir


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (status {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def checkpointed(cache: Path) -> bool:
    return any(is_complete(p) for p in (cache / "adapters").glob("mood-*.partial")) if (cache / "adapters").is_dir() else False


def log_text(run_dir: Path) -> str:
    return "".join(p.read_text() for p in run_dir.glob("*.log"))


def status(run_dir: Path) -> str:
    return json.loads((run_dir / "results.json").read_text())["meta"]["adapters"][0]["status"]


def entries(cache: Path) -> list[Path]:
    """Cache entries: visible directories other than resume checkpoints (a writer's hidden staging
    directory, left behind when the process is killed outright, is never read as an entry)."""
    return [p for p in (cache / "adapters").iterdir()
            if p.is_dir() and not p.name.endswith(".partial") and not p.name.startswith(".")]


def test_two_jobs_finetuning_the_same_task_share_one_adapter(tiny_env, tmp_path):
    cache = tmp_path / "cache"
    first, first_dir = start(tiny_env, tmp_path, cache, "first")
    try:
        wait_for(lambda: checkpointed(cache), "the first job's first checkpoint", first)
        os.kill(first.pid, signal.SIGSTOP)  # hold it mid-training, lock held
        second, second_dir = start(tiny_env, tmp_path, cache, "second")
        wait_for(lambda: "waiting for it to finish" in log_text(second_dir), "the second job to wait", second)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [err[-2000:] for _, err in outputs]
    assert status(first_dir) == "trained" and status(second_dir) == "reused"
    [entry] = entries(cache)
    assert verify_directory(entry) == [] and not list((cache / "adapters").glob("*.partial"))


def test_a_killed_job_leaves_nothing_that_looks_complete_and_the_next_one_resumes(tiny_env, tmp_path):
    cache = tmp_path / "cache"
    job, _ = start(tiny_env, tmp_path, cache, "killed")
    wait_for(lambda: checkpointed(cache), "a checkpoint", job)
    job.kill()
    job.communicate()
    assert entries(cache) == []  # only the checkpoint (.partial), the lock file and perhaps a staging directory
    again, again_dir = start(tiny_env, tmp_path, cache, "again")
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert status(again_dir).startswith("resumed from step ") and "resumed from step" in log_text(again_dir)
    [entry] = entries(cache)
    assert verify_directory(entry) == [] and not list((cache / "adapters").glob("*.partial"))
    assert not [p.name for p in (cache / "adapters").iterdir() if p.is_dir() and p.name.startswith(".")]  # no leftovers
