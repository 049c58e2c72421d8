"""Two-node clusters, with real processes: when one node dies or stalls, the other claims
the witness on the common storage (docs/membership.md) and goes on alone; a stalled node
that wakes up learns that the other went on without it (from its newer epoch, or from the
witness it finds held) and stops serving, so only one side ever changes the namespace. A
restarted node re-joins with equal digests."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable

import pytest

from tests.cluster.conftest import Cluster

pytestmark = [pytest.mark.mount, pytest.mark.slow]

OFFLINE_WITHIN_S = 30.0


def _members_seen_by(cluster: Cluster, i: int) -> list[str]:
    me = next(n for n in cluster.status(i)["nodes"] if n["name"] == f"n{i + 1}")
    return sorted(me["members"])


def _wait_for_eio(path: os.PathLike[str]) -> None:
    deadline = time.monotonic() + OFFLINE_WITHIN_S
    while True:
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return
        assert time.monotonic() < deadline, f"{path} still answers {OFFLINE_WITHIN_S} s on"
        time.sleep(0.2)


def _wait_for_log(cluster: Cluster, i: int, since: int, text: str) -> str:
    deadline = time.monotonic() + OFFLINE_WITHIN_S
    while text not in (log := cluster.nodes[i].log_text(since)):
        assert time.monotonic() < deadline, f"n{i + 1} never logged {text!r}: {log}"
        time.sleep(0.1)
    return log


def _rejoin(cluster: Cluster, i: int) -> None:
    cluster.nodes[i].terminate()
    cluster.start_node(i)
    quiet = cluster.wait_quiet_digests()
    assert sorted(n["name"] for n in quiet["nodes"] if n["state"] == "online") == ["n1", "n2"]


def test_the_survivor_of_a_crash_goes_on_alone(new_cluster: Callable[..., Cluster]) -> None:
    c = new_cluster(2)
    (c.mnt(0) / "before").write_bytes(b"before")
    c.kill9(1)
    (c.mnt(0) / "alone").write_bytes(b"n1 alone")  # waits for the witness, then commits
    assert _members_seen_by(c, 0) == ["n1"]
    c.start_node(1)  # no --join: it knows the cluster and re-joins
    quiet = c.wait_quiet_digests()
    assert sorted(n["name"] for n in quiet["nodes"] if n["state"] == "online") == ["n1", "n2"]
    assert (c.mnt(1) / "alone").read_bytes() == b"n1 alone"


def test_a_stalled_node_wakes_to_find_the_witness_taken(
        new_cluster: Callable[..., Cluster]) -> None:
    c = new_cluster(2)
    (c.mnt(1) / "before").write_bytes(b"before")
    mark = c.nodes[1].log_mark()
    os.kill(c.nodes[1].pid, signal.SIGSTOP)
    try:
        (c.mnt(0) / "while-n2-stalled").write_bytes(b"n1 alone")
        assert _members_seen_by(c, 0) == ["n1"]
    finally:
        os.kill(c.nodes[1].pid, signal.SIGCONT)
    # n2 learns that n1 went on without it and stops serving at once; then it asks to be
    # admitted again (within milliseconds here, too fast to catch an EIO from outside) and
    # serves once it is a member again and caught up.
    log = _wait_for_log(c, 1, mark, "going offline: removed from the cluster")
    assert "serving again" not in log[:log.index("going offline")]
    quiet = c.wait_quiet_digests()
    assert sorted(n["name"] for n in quiet["nodes"] if n["state"] == "online") == ["n1", "n2"]
    (c.mnt(0) / "after").write_bytes(b"n1 still alone")
    _rejoin(c, 1)  # and after a restart
    for name, data in (("while-n2-stalled", b"n1 alone"), ("after", b"n1 still alone")):
        assert (c.mnt(1) / name).read_bytes() == data
