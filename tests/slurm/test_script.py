"""``experiments/slurm_local.sh``: one clear line and a non-zero status when it cannot start a cluster;
``up`` is idempotent and quick on a running cluster."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from tests.slurm.helpers import SCRIPT, cluster


def test_unknown_command_prints_usage():
    proc = cluster("sideways")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [f"usage: {SCRIPT} up|down|status"]


def test_refuses_without_root_in_one_line():
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            pytest.skip("runuser is needed to run the script as an unprivileged user")
        # The script on stdin: the unprivileged user need not be able to read the checkout.
        with open(SCRIPT) as script:
            proc = subprocess.run(["runuser", "-u", "nobody", "--", "bash", "-s", "up"], stdin=script,
                                  capture_output=True, text=True, timeout=60)
    else:
        proc = cluster("up", timeout=60)
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert re.fullmatch(r"slurm_local\.sh: cannot start a SLURM cluster: must run as root \(uid is \d+\)", line)
    assert proc.stdout == ""


@pytest.mark.slurm
def test_up_on_a_running_cluster_is_quick_and_changes_nothing(slurm_cluster):
    before = cluster("status")
    assert before.returncode == 0 and before.stdout.startswith("SLURM cluster up: node ")
    start = time.perf_counter()
    again = cluster("up")
    assert again.returncode == 0 and time.perf_counter() - start < 10
    assert again.stdout.splitlines()[0] == before.stdout.splitlines()[0]


def test_never_overwrites_a_configuration_it_did_not_write(tmp_path):
    if os.geteuid() != 0 or not os.path.isfile("/etc/debian_version"):
        pytest.skip("the configuration is checked after the root and Debian checks")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=theirs\n")
    proc = subprocess.run(["bash", str(SCRIPT), "up"], env={**os.environ, "SLURM_CONF": str(conf)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"slurm_local.sh: cannot start a SLURM cluster: {conf} exists and was not written by this script "
        "(move it away to use the local cluster)"]
    assert conf.read_text() == "ClusterName=theirs\n" and sorted(p.name for p in tmp_path.iterdir()) == ["slurm.conf"]
