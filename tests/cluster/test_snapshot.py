"""Catching up by snapshot: a node further behind than the others keep their commit log
(shortened here to a few batches through CLUSTERFS_TEST_LOG_KEEP_BATCHES) copies a
member's replica through the block directory, installs it, fetches what was committed
since, and serves with the same namespace as the others. Both ways a node can fall that far
behind are covered: a restart after being killed, and a new node joining late."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster.conftest import Cluster
from tests.util import tree_diff, tree_state

pytestmark = [pytest.mark.mount, pytest.mark.slow]

LOG_KEEP_BATCHES = 5
CHANGES = 40  # one batch each (written one after another): far more than the log keeps


@pytest.fixture(autouse=True)
def _short_commit_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLUSTERFS_TEST_LOG_KEEP_BATCHES", str(LOG_KEEP_BATCHES))


def _change_many(cluster: Cluster, node: int, prefix: str) -> dict[str, bytes]:
    top = cluster.mnt(node) / prefix
    top.mkdir()
    files = {}
    for k in range(CHANGES):
        data = os.urandom(64 + k)
        (top / f"f{k}").write_bytes(data)
        files[f"{prefix}/f{k}"] = data
    os.rename(top / "f0", top / "renamed")
    files[f"{prefix}/renamed"] = files.pop(f"{prefix}/f0")
    os.unlink(top / "f1")
    del files[f"{prefix}/f1"]
    return files


def _expect_everywhere(cluster: Cluster, files: dict[str, bytes]) -> None:
    quiet = cluster.wait_quiet_digests()
    assert all(n["state"] == "online" for n in quiet["nodes"]), quiet
    trees = [tree_state(mount) for mount in cluster.mounts]
    for i, tree in enumerate(trees[1:], start=2):
        assert tree == trees[0], f"n1 and n{i} differ:\n" + "\n".join(tree_diff(trees[0], tree))
    for i in range(len(cluster)):
        for rel, data in files.items():
            assert (cluster.mnt(i) / rel).read_bytes() == data, f"{rel} on n{i + 1}"


def _caught_up_by_snapshot(cluster: Cluster, node: int) -> None:
    log = cluster.nodes[node].log_text()
    assert "installed the snapshot from" in log, cluster.nodes[node].log_tail()
    leftovers = list((cluster.blockdir / "cluster" / "snapshots").iterdir())
    assert leftovers == [], f"snapshots left in the block directory: {leftovers}"


def test_a_restarted_node_far_behind_catches_up_by_snapshot(
        new_cluster: Callable[..., Cluster]) -> None:
    c = new_cluster(3)
    before = _change_many(c, 0, "before")
    c.kill9(2)
    during = _change_many(c, 1, "during")
    c.start_node(2)
    _expect_everywhere(c, {**before, **during})
    _caught_up_by_snapshot(c, 2)
    after = _change_many(c, 2, "after")  # and it takes part again
    _expect_everywhere(c, {**before, **during, **after})


def test_a_node_joining_a_cluster_with_a_long_history_joins_by_snapshot(
        new_cluster: Callable[..., Cluster]) -> None:
    c = new_cluster(4, start=False)
    c.format()
    for i in range(3):
        c.start_node(i)
    history = _change_many(c, 0, "history")
    c.start_node(3)  # joins through n1
    _expect_everywhere(c, history)
    _caught_up_by_snapshot(c, 3)


def test_clusterfs_mount_shows_the_progress_of_a_snapshot_until_the_mount_is_live(
        new_cluster: Callable[..., Cluster]) -> None:
    """The daemonizing `clusterfs mount --join` prints the catch-up's progress on stderr
    (the terminal of the operator who typed it) and returns once the mount is live."""
    c = new_cluster(4, start=False)
    c.format()
    for i in range(3):
        c.start_node(i)
    history = _change_many(c, 0, "history")
    joiner = c.nodes[3]
    argv = joiner.mount_args(c.nodes[0].address)
    assert argv[-1] == "-f"
    proc = subprocess.run(argv[:-1], capture_output=True, text=True, timeout=120, check=False)
    pid_file = joiner.statedir / "clusterfs.pid"
    try:
        assert proc.returncode == 0, proc.stderr
        assert os.path.ismount(joiner.mountpoint)
        lines = proc.stderr.splitlines()
        assert any(line.startswith("catching up by snapshot from n1") for line in lines), lines
        assert any(line.startswith("snapshot from n1: ") and line.endswith("(100%)")
                   for line in lines), lines
        assert any(line.startswith("installed the snapshot from n1") for line in lines), lines
        for rel, data in history.items():
            assert (joiner.mountpoint / rel).read_bytes() == data
    finally:
        _stop_daemon(int(pid_file.read_text()) if pid_file.exists() else None,
                     joiner.mountpoint)


def _stop_daemon(pid: int | None, mountpoint: Path) -> None:
    """SIGTERM the daemon by PID and wait for it; a mount left behind is detached."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
    if os.path.ismount(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, timeout=60)
