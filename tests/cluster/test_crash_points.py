"""kill -9 at each step of the commit protocol (crash points armed through the environment,
clusterfs/txn/faults.py), on the leader and on a follower, while a third node writes files:
every write that returned success is on every node afterwards, the replicas are equal once
the crashed node is back, and the writer never sees an error."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from clusterfs.txn import faults
from tests.cluster.conftest import Cluster
from tests.util import tree_diff, tree_state

pytestmark = [pytest.mark.mount, pytest.mark.slow]

CASES = [
    ("leader", "Prepare@1"),  # a batch is validated, no member has it
    ("leader", "Prepare@2"),  # one member has logged it, the other never heard of it
    ("leader", "Decide@1"),  # every vote is in and the leader has decided; nobody knows
    ("leader", "Decide@2"),  # one member has the decision and applies it
    ("follower", "Vote@1"),  # the follower logged the batch, its vote never arrives
    ("follower", "Ack@1"),  # the follower applied the batch, its ack never arrives
]
WRITES_AFTER_CRASH = 10
DEATH_TIMEOUT_S = 60.0


def _write(path: os.PathLike[str], data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize(("role", "crash_at"), CASES)
def test_a_crash_at_each_protocol_step_loses_nothing(
        new_cluster: Callable[..., Cluster], role: str, crash_at: str) -> None:
    c = new_cluster(3, start=False)
    victim = c.nodes[0 if role == "leader" else 1]  # n1 founds the cluster and leads it
    victim.env[faults.ENV] = crash_at
    c.start()
    assert c.status(2)["nodes"][0]["leader"] == "n1"
    writer = c.mnt(2)
    (writer / "d").mkdir()
    written: dict[str, bytes] = {}
    deadline = time.monotonic() + DEATH_TIMEOUT_S
    left_after_crash = WRITES_AFTER_CRASH
    while left_after_crash:
        assert time.monotonic() < deadline, f"{victim.name} never crashed at {crash_at}"
        name = f"d/f{len(written)}"
        data = os.urandom(100 + len(written))
        _write(writer / name, data)  # an error here fails the test: the writer's node is fine
        written[name] = data
        if not victim.alive():
            left_after_crash -= 1
    assert victim.proc is not None and victim.proc.returncode == -9
    victim.env.clear()
    c.start_node(victim.index)
    quiet = c.wait_quiet_digests()
    assert len(quiet["nodes"]) == 3 and all(n["state"] == "online" for n in quiet["nodes"])
    trees = [tree_state(mount) for mount in c.mounts]
    for i, tree in enumerate(trees[1:], start=2):
        assert tree == trees[0], f"n1 and n{i} differ:\n" + "\n".join(tree_diff(trees[0], tree))
    for i in range(3):
        for name, data in written.items():
            assert (c.mnt(i) / name).read_bytes() == data, f"{name} on n{i + 1}"
