"""A member that dies is removed by the others, who go on committing without it: kill -9 of
a follower, and of the leader (a new leader settles the epoch and takes over)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.cluster.conftest import Cluster

pytestmark = [pytest.mark.mount, pytest.mark.slow]

REMOVED_WITHIN_S = 30.0  # heartbeat silence (3 s) plus view changes, on a loaded machine


def _members_seen_by(cluster: Cluster, i: int) -> set[str]:
    node = next(n for n in cluster.status(i)["nodes"] if n["name"] == f"n{i + 1}")
    return set(node["members"])


def _wait_members(cluster: Cluster, i: int, expected: set[str]) -> None:
    deadline_s = time.monotonic() + REMOVED_WITHIN_S
    while _members_seen_by(cluster, i) != expected:
        assert time.monotonic() < deadline_s, f"still {_members_seen_by(cluster, i)}"
        time.sleep(0.3)


@pytest.mark.parametrize("victim", [2, 0], ids=["follower", "leader"])
def test_the_survivors_remove_a_dead_member_and_go_on(
        new_cluster: Callable[..., Cluster], victim: int) -> None:
    cluster = new_cluster()
    assert cluster.status(0)["nodes"][0]["leader"] == "n1"
    survivors = [i for i in range(3) if i != victim]
    cluster.kill9(victim)
    # The first change waits for the dead member's vote until its deadline, then goes on.
    (cluster.mnt(survivors[0]) / "after-the-kill").write_text("still committing")
    _wait_members(cluster, survivors[0], {f"n{i + 1}" for i in survivors})
    for i in survivors:
        assert (cluster.mnt(i) / "after-the-kill").read_text() == "still committing"
    (cluster.mnt(survivors[1]) / "and-more").mkdir()
    status = cluster.status(survivors[0])  # the dead node is no member: not asked
    assert {n["name"] for n in status["nodes"]} == {f"n{i + 1}" for i in survivors}
    assert all(n["state"] == "online" for n in status["nodes"])
    assert len({n["leader"] for n in status["nodes"]}) == 1
    assert status["nodes"][0]["leader"] in {f"n{i + 1}" for i in survivors}
    assert status["digests_equal"]
