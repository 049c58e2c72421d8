"""Nodes that stop and come back: one node killed with SIGKILL while the others go on
changing the namespace catches up when it is restarted (without --join); a clean stop of
every node (SIGTERM) exits 0, leaves replicas that fsck finds clean, and a restart of all
brings every change back."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from tests.cluster.conftest import Cluster
from tests.util import run_cli, tree_diff, tree_state

pytestmark = [pytest.mark.mount, pytest.mark.slow]


def _populate(cluster: Cluster, prefix: str, nodes: list[int]) -> dict[str, bytes]:
    """Directories and files written through each of NODES; {relative path: data}."""
    files = {}
    for i in nodes:
        d = cluster.mnt(i) / f"{prefix}-n{i + 1}"
        d.mkdir()
        for k in range(10):
            data = os.urandom(100 * k)
            (d / f"f{k}").write_bytes(data)
            files[f"{d.name}/f{k}"] = data
        os.symlink("f1", d / "link")
        os.rename(d / "f0", d / "renamed")
        files[f"{d.name}/renamed"] = files.pop(f"{d.name}/f0")
        os.unlink(d / "f9")
        del files[f"{d.name}/f9"]
        os.chmod(d / "f2", 0o600)
    return files


def _check_files(cluster: Cluster, files: dict[str, bytes], nodes: list[int]) -> None:
    for i in nodes:
        for rel, data in files.items():
            assert (cluster.mnt(i) / rel).read_bytes() == data, f"{rel} on n{i + 1}"


def _same_trees(cluster: Cluster) -> None:
    trees = [tree_state(cluster.mnt(i)) for i in range(len(cluster))]
    for i in range(1, len(cluster)):
        assert trees[i] == trees[0], f"n1 and n{i + 1} differ:\n" + "\n".join(
            tree_diff(trees[0], trees[i]))


def test_killed_node_catches_up_after_restart(new_cluster: Callable[..., Cluster]) -> None:
    c = new_cluster(3)
    before = _populate(c, "before", [0, 1, 2])
    c.kill9(2)
    # The two others are a majority: changes go on (once n3 is out of the view).
    during = _populate(c, "during", [0, 1])
    _check_files(c, {**before, **during}, [0, 1])
    status = c.status(0)
    n3 = next((n for n in status["nodes"] if n["name"] == "n3"), None)
    assert n3 is None or n3["state"] != "online", status

    c.start_node(2)  # no --join: the state directory knows the cluster
    quiet = c.wait_quiet_digests()
    assert sorted(n["name"] for n in quiet["nodes"] if n["state"] == "online") == [
        "n1", "n2", "n3"]
    _check_files(c, {**before, **during}, [0, 1, 2])
    _same_trees(c)
    after = _populate(c, "after", [2])  # and the restarted node can change things again
    _check_files(c, after, [0, 1])


def test_clean_stop_and_restart_of_every_node(new_cluster: Callable[..., Cluster]) -> None:
    c = new_cluster(3)
    files = _populate(c, "one", [0, 1, 2])
    c.wait_quiet_digests()
    assert c.stop() == [0, 0, 0], c.log_tails()
    for node in c.nodes:
        proc = run_cli("fsck", str(c.blockdir), "--state", str(node.statedir))
        assert proc.returncode == 0 and "clean" in proc.stdout, (
            f"fsck of {node.name}: {proc.stdout}{proc.stderr}")
    c.restart_all()
    c.wait_quiet_digests()
    _check_files(c, files, [0, 1, 2])
    _same_trees(c)


def test_restart_of_a_node_that_missed_a_purge(new_cluster: Callable[..., Cluster]) -> None:
    """A file unlinked while open is purged by the cluster while n3 is down; when n3 comes
    back it must not repair or purge on its own (stale) replica in a way that makes it
    diverge: afterwards the digests are equal and the backing file is gone."""
    c = new_cluster(3)
    (c.mnt(0) / "f").write_bytes(b"data")
    (c.mnt(0) / "keep").write_bytes(b"kept")
    ino = os.stat(c.mnt(0) / "f").st_ino
    backing = c.blockdir / "data" / f"{ino % 256:02x}" / f"{ino:x}"
    fd = os.open(c.mnt(1) / "f", os.O_RDONLY)
    try:
        os.unlink(c.mnt(0) / "f")
        c.wait_quiet_digests()
        c.kill9(2)
    finally:
        os.close(fd)  # the last close: the cluster (n1, n2) purges the inode
    deadline = time.monotonic() + 15
    while backing.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not backing.exists(), "the purge after the last close did not happen"
    (c.mnt(0) / "after").write_bytes(b"after")
    c.start_node(2)
    c.wait_quiet_digests()
    assert not backing.exists(), "the restarted node brought the purged inode's file back"
    for i in range(3):
        assert sorted(os.listdir(c.mnt(i))) == ["after", "keep"]
        assert (c.mnt(i) / "keep").read_bytes() == b"kept"
    _same_trees(c)


def test_fsck_repairs_no_member_of_a_cluster_the_node_does_it(
        new_cluster: Callable[..., Cluster]) -> None:
    """`fsck --repair` on one member's replica would change that replica alone (and a replica
    behind the others would take their new files for orphans): it refuses, changes nothing,
    and the node repairs the block directory itself once it has started and caught up."""
    c = new_cluster(3)
    files = _populate(c, "one", [0])
    (c.mnt(0) / "gone").write_bytes(b"soon gone")
    ino = os.stat(c.mnt(0) / "gone").st_ino
    orphan = c.blockdir / "data" / f"{ino % 256:02x}" / f"{ino:x}"
    os.unlink(c.mnt(0) / "gone")
    deadline = time.monotonic() + 15
    while orphan.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not orphan.exists(), "the unlinked file was not purged"
    c.wait_quiet_digests()
    assert c.stop() == [0, 0, 0], c.log_tails()
    orphan.write_bytes(b"left by a crash")  # a backing file of an inode that is gone
    n1 = c.nodes[0]
    report = run_cli("fsck", str(c.blockdir), "--state", str(n1.statedir))
    assert report.returncode == 1 and f"backing file {ino:x}: no inode" in report.stdout, (
        report.stdout + report.stderr)
    refused = run_cli("fsck", str(c.blockdir), "--state", str(n1.statedir), "--repair")
    assert refused.returncode != 0, refused.stdout
    assert "not repaired" in refused.stderr and "one of 3 members" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert orphan.exists()
    c.restart_all()
    c.wait_quiet_digests()
    deadline = time.monotonic() + 15
    while orphan.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not orphan.exists(), "the restarted nodes did not remove the orphaned file"
    _check_files(c, files, [0, 1, 2])
