"""Fixtures of the SLURM tests: a running one-node cluster (started here when possible) and the tiny
offline experiment of the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline.helpers import make_tiny_bert, make_tiny_tasks, write_tiny_conf
from tests.slurm.helpers import cluster, why_no_cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A SLURM cluster to submit to: the one running, else the local one of experiments/slurm_local.sh,
    started here (root, Debian; not with KNOTS_SLURM_TESTS=0) and stopped after the tests; skips with the
    reason when neither works."""
    if cluster("status", timeout=30).returncode == 0:
        yield
        return
    reason = why_no_cluster()
    if reason:
        pytest.skip(reason)
    started = cluster("up")
    if started.returncode != 0:
        pytest.skip((started.stderr.strip().splitlines() or ["experiments/slurm_local.sh up failed"])[-1])
    try:
        yield
    finally:
        cluster("down", timeout=120)


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory) -> Path:
    """A config directory with ``benchmark=tiny`` and ``model=tiny_bert`` over generated files."""
    root = tmp_path_factory.mktemp("tiny_slurm")
    return write_tiny_conf(root / "conf", make_tiny_tasks(root / "data"), make_tiny_bert(root / "bert"))
