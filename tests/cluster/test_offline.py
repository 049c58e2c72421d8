"""Offline means offline: a node cut off from the majority of its members stops serving —
every call on its mount answers EIO, reads included — and `clusterfs status` on it says
why. The other two nodes are frozen with SIGSTOP (by PID) to cut it off."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from clusterfs.credentials import credentials_path
from tests.cluster.conftest import Cluster
from tests.util import run_cli

pytestmark = [pytest.mark.mount, pytest.mark.slow]

OFFLINE_WITHIN_S = 20.0


@contextmanager
def frozen(pids: list[int]) -> Iterator[None]:
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _errno_of(call: Callable[[], object]) -> int:
    try:
        call()
    except OSError as exc:
        return exc.errno or 0
    return 0


def _wait_for_eio(path: Path) -> None:
    deadline_s = time.monotonic() + OFFLINE_WITHIN_S
    while _errno_of(lambda: os.stat(path)) != errno.EIO:
        assert time.monotonic() < deadline_s, f"{path} still answers {OFFLINE_WITHIN_S} s on"
        time.sleep(0.2)


def test_a_node_cut_off_from_the_majority_answers_eio(
        new_cluster: Callable[..., Cluster]) -> None:
    cluster = new_cluster()
    (cluster.mnt(0) / "f").write_bytes(b"written before the cut")
    m3 = cluster.mnt(2)
    fd = os.open(m3 / "f", os.O_RDONLY)  # a handle opened while the node still served
    try:
        with frozen([cluster.nodes[0].pid, cluster.nodes[1].pid]):
            _wait_for_eio(m3 / "f")
            assert _errno_of(lambda: os.pread(fd, 100, 0)) == errno.EIO
            assert _errno_of(lambda: os.listdir(m3)) == errno.EIO
            assert _errno_of(lambda: os.mkdir(m3 / "d")) == errno.EIO
            assert _errno_of(lambda: os.open(m3 / "g", os.O_CREAT | os.O_WRONLY)) == errno.EIO
            proc = run_cli("status", "--connect", cluster.nodes[2].address, "--json",
                           "--credentials", str(credentials_path(cluster.blockdir)),
                           timeout_s=60)
            assert proc.returncode == 0, proc.stderr
            n3 = next(n for n in json.loads(proc.stdout)["nodes"] if n["name"] == "n3")
            assert n3["state"] == "offline"
            assert "majority" in n3["reason"]
    finally:
        # close() succeeds: there is nothing to flush (writes reach the backing file
        # before they return, so the file system sends no FLUSH), and the node's release
        # only frees its own state.
        assert _errno_of(lambda: os.close(fd)) == 0
        assert _errno_of(lambda: os.fstat(fd)) == errno.EBADF
