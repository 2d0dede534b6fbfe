"""Helpers of the SLURM tests: the local cluster script, ``knots-run -m`` through the submitit launchers,
and the scheduler's view of a sweep's jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from tests.pipeline.helpers import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "slurm_local.sh"
T = TypeVar("T")


def cluster(command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``experiments/slurm_local.sh <command>``."""
    return subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=timeout)


def why_no_cluster() -> str | None:
    """Why the tests do not start the local cluster (None: they can try)."""
    if os.environ.get("KNOTS_SLURM_TESTS", "").lower() in ("0", "off", "no", "false"):
        return "KNOTS_SLURM_TESTS=0: not starting a SLURM cluster"
    if os.name != "posix" or os.geteuid() != 0:
        return "the local SLURM cluster needs root (experiments/slurm_local.sh up)"
    if not Path("/etc/debian_version").is_file():
        return "the local SLURM cluster needs Debian (experiments/slurm_local.sh up)"
    return None


def job_env(log_dir: Path) -> dict[str, str]:
    """The environment of ``knots-run``: this checkout first on the path (SLURM jobs inherit it)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "KNOTS_LOG_DIR": str(log_dir), "PYTHONPATH": path}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def sweep_args(tiny_env: Path, sweep: Path, *overrides: str, launcher: str = "slurm") -> list[str]:
    """``knots-run -m`` of the tiny experiment through ``hydra/launcher=<launcher>``. The W&B logger
    config is used with W&B disabled (its ``group`` is resolved, nothing is logged); each job writes
    its group and scheduler job id to ``<job dir>/job.json`` (see ``RecordJob``)."""
    return [sys.executable, "-m", "knots.cli.run", "-m", f"hydra.searchpath=[file://{tiny_env}]", *TINY_OVERRIDES,
            "logger=wandb", "logger.mode=disabled", f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}",
            f"+hydra.callbacks.record._target_={RecordJob.__module__}.{RecordJob.__qualname__}", *overrides]


def run_sweep(tmp_path: Path, args: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``knots-run -m`` to the end; on a timeout, cancel the sweep's jobs before failing."""
    try:
        return subprocess.run(list(args), cwd=tmp_path, env=job_env(tmp_path / "logs"), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        cancel_jobs(Path(next(a for a in args if a.startswith("hydra.sweep.dir=")).split("=", 1)[1]))
        raise


def stop_sweep(proc: subprocess.Popen, sweep: Path) -> None:
    """Stop a ``knots-run -m`` started in the background if it still runs, and the jobs it submitted."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
        cancel_jobs(sweep)


def cancel_jobs(sweep: Path) -> None:
    """``scancel`` the jobs submitted for ``sweep`` (named by submitit's folders), and only those."""
    ids = [p.name for p in (sweep / ".submitit").glob("*") if p.is_dir() and p.name.replace("_", "").isdigit()]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


class RecordJob(Callback):
    """A Hydra callback that records, inside each job's process, what the job resolved: its W&B group
    and its scheduler job id, in ``<job dir>/job.json``."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        record = {"hydra_job_id": config.hydra.job.id, "group": config.logger.group,
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        (Path(config.hydra.runtime.output_dir) / "job.json").write_text(json.dumps(record))


def job_record(job_dir: Path) -> dict[str, Any]:
    """What ``RecordJob`` wrote in the job's process: ``hydra_job_id`` (submitit's job id, ``<id>`` or
    ``<array id>_<index>``, naming ``<sweep>/.submitit/<id>/``), ``slurm_job_id`` and ``group``."""
    return json.loads((job_dir / "job.json").read_text())


def squeue(job_id: str) -> tuple[str, str]:
    """``(state, reason)`` of a job in the queue; ``("", "")`` once it has left it."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True).stdout.split()
    return (out[0], out[1]) if len(out) >= 2 else ("", "")


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, proc: subprocess.Popen | None = None) -> T:
    """Poll ``probe`` every 50 ms until it returns something; fail after ``timeout`` s or if ``proc`` ends."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = probe()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"knots-run ended (status {proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
