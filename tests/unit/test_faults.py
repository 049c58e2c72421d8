"""The test-only crash points: what the environment variable means, and that a node really
dies by SIGKILL at the N-th message of the kind (in a forked child here)."""

from __future__ import annotations

import os
import signal

import pytest

from clusterfs.txn.faults import CrashPoint


def _dies_after(point: CrashPoint, sends: list[str]) -> int | None:
    """Feed `sends` in a child process; the index of the send it died at, or None."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports each send it survived, then exits normally
        os.close(read_fd)
        for kind in sends:
            point.before_send(kind)
            os.write(write_fd, b".")
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        survived = len(pipe.read())
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return survived
    assert os.WEXITSTATUS(status) == 0
    return None


def test_it_dies_at_the_nth_message_of_its_kind() -> None:
    sends = ["Prepare", "Decide", "Prepare", "Decide", "Prepare"]
    assert _dies_after(CrashPoint("Prepare@2"), sends) == 2
    assert _dies_after(CrashPoint("Decide"), sends) == 1  # N defaults to 1
    assert _dies_after(CrashPoint("Vote@1"), sends) is None
    assert _dies_after(CrashPoint(None), sends) is None


@pytest.mark.parametrize("spec", ["", "@2", "Decide@x", "Decide@-1", "Decide@1.5"])
def test_a_malformed_setting_arms_nothing(spec: str) -> None:
    point = CrashPoint(spec)
    assert point.kind == ""
    assert _dies_after(point, ["Decide", "Decide"]) is None
