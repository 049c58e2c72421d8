"""`clusterfs leave MNT`: the node leaves the membership, unmounts and exits; the others go on
committing without it; started again, it re-joins by itself and catches up."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.cluster.conftest import Cluster
from tests.util import is_mounted, run_cli

pytestmark = [pytest.mark.mount, pytest.mark.slow]


def test_leave_then_come_back(new_cluster: Callable[..., Cluster]) -> None:
    cluster = new_cluster()
    (cluster.mnt(0) / "before").write_text("x")
    leaver = cluster.nodes[2]

    proc = run_cli("leave", str(cluster.mnt(2)), timeout_s=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "left the cluster" in proc.stdout
    assert leaver.wait_exit() == 0
    assert not is_mounted(cluster.mnt(2))
    status = cluster.status(0)
    assert {n["name"] for n in status["nodes"]} == {"n1", "n2"}
    assert all(n["state"] == "online" and "n3" not in n["members"] for n in status["nodes"])

    (cluster.mnt(1) / "while-away").write_text("y")  # commits without the node that left

    cluster.start_node(2)  # no --join: its state remembers the cluster; it re-joins itself
    assert (cluster.mnt(2) / "while-away").read_text() == "y"
    quiet = cluster.wait_quiet_digests()
    assert {n["name"] for n in quiet["nodes"]} == {"n1", "n2", "n3"}
