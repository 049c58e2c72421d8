"""Coherence across nodes: a change made through one node is seen by every other node as
soon as the call returned (no sleeps in between: their kernel caches must have been
invalidated), data written and closed on one node is read back exactly by an open on the
others (close-to-open), the same file has the same inode number everywhere, and a file
unlinked on one node while open on another keeps its data until the last close in the
cluster, after which its backing file goes."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import Cluster
from tests.util import errno_of, tree_diff, tree_state

pytestmark = pytest.mark.mount

PURGE_TIMEOUT_S = 15.0
XATTR = "user.cluster"



def _others(cluster: Cluster, origin: int) -> list[int]:
    return [i for i in range(len(cluster)) if i != origin]


def _prime(cluster: Cluster, croot: str, *names: str) -> None:
    """Look NAMES up (and list the directory) on every node, so that each kernel holds
    cached entries/attributes (or a listing) that the next change must invalidate."""
    for i in range(len(cluster)):
        d = cluster.mnt(i) / croot
        os.listdir(d)
        for name in names:
            try:
                os.lstat(d / name)
            except FileNotFoundError:
                pass
            else:
                os.listxattr(d / name, follow_symlinks=False)


def _lstat_everywhere(cluster: Cluster, croot: str, name: str) -> list[os.stat_result]:
    return [os.lstat(cluster.mnt(i) / croot / name) for i in range(len(cluster))]


def _gone_everywhere(cluster: Cluster, croot: str, name: str, others: list[int]) -> None:
    for i in others:
        d = cluster.mnt(i) / croot
        assert errno_of(os.lstat, d / name) == errno.ENOENT, f"{name} still there on n{i + 1}"
        assert name not in os.listdir(d), f"{name} still listed on n{i + 1}"


@pytest.mark.parametrize("origin", [0, 1, 2], ids=["from-n1", "from-n2", "from-n3"])
def test_changes_visible_on_other_nodes_right_after_the_call(
    shared_cluster: Cluster, croot: str, origin: int
) -> None:
    c = shared_cluster
    here = c.mnt(origin) / croot
    others = _others(c, origin)
    for rnd in range(5):
        f, d, s, g = f"file{rnd}", f"dir{rnd}", f"link{rnd}", f"renamed{rnd}"

        # create
        _prime(c, croot, f)
        fd = os.open(here / f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
        os.close(fd)
        ino = os.lstat(here / f).st_ino
        for i in others:
            st = os.lstat(c.mnt(i) / croot / f)
            assert stat.S_ISREG(st.st_mode) and st.st_ino == ino, f"create not seen on n{i + 1}"
            assert stat.S_IMODE(st.st_mode) == 0o640
            assert f in os.listdir(c.mnt(i) / croot)

        # chmod
        _prime(c, croot, f)
        os.chmod(here / f, 0o604)
        for i in others:
            assert stat.S_IMODE(os.lstat(c.mnt(i) / croot / f).st_mode) == 0o604, (
                f"chmod not seen on n{i + 1}")

        # setxattr (and its removal)
        _prime(c, croot, f)
        for i in others:
            assert errno_of(os.getxattr, c.mnt(i) / croot / f, XATTR) == errno.ENODATA
        value = f"v{rnd}-{origin}".encode()
        os.setxattr(here / f, XATTR, value)
        for i in others:
            assert os.getxattr(c.mnt(i) / croot / f, XATTR) == value
            assert XATTR in os.listxattr(c.mnt(i) / croot / f)
        os.removexattr(here / f, XATTR)
        for i in others:
            assert errno_of(os.getxattr, c.mnt(i) / croot / f, XATTR) == errno.ENODATA

        # mkdir
        _prime(c, croot, d)
        os.mkdir(here / d, 0o750)
        dino = os.lstat(here / d).st_ino
        for i in others:
            st = os.lstat(c.mnt(i) / croot / d)
            assert stat.S_ISDIR(st.st_mode) and st.st_ino == dino, f"mkdir not seen on n{i + 1}"
            assert stat.S_IMODE(st.st_mode) == 0o750
            assert os.listdir(c.mnt(i) / croot / d) == []

        # symlink
        _prime(c, croot, s)
        os.symlink(f"{f}-target", here / s)
        for i in others:
            assert os.readlink(c.mnt(i) / croot / s) == f"{f}-target", (
                f"symlink not seen on n{i + 1}")

        # rename (a file into the new directory, under a new name)
        _prime(c, croot, f, d)
        for i in others:
            os.listdir(c.mnt(i) / croot / d)
        os.rename(here / f, here / d / g)
        for i in others:
            assert os.lstat(c.mnt(i) / croot / d / g).st_ino == ino, (
                f"rename target not seen on n{i + 1}")
            assert os.listdir(c.mnt(i) / croot / d) == [g]
        _gone_everywhere(c, croot, f, others)

        # rename over an existing entry
        _prime(c, croot, s, f)
        os.rename(here / d / g, here / s)
        for i in others:
            st = os.lstat(c.mnt(i) / croot / s)
            assert stat.S_ISREG(st.st_mode) and st.st_ino == ino, (
                f"rename onto an existing name not seen on n{i + 1}")
            assert os.listdir(c.mnt(i) / croot / d) == []

        # unlink
        _prime(c, croot, s)
        os.unlink(here / s)
        _gone_everywhere(c, croot, s, others)

        # rmdir
        _prime(c, croot, d)
        os.rmdir(here / d)
        _gone_everywhere(c, croot, d, others)

    for i in range(len(c)):
        assert os.listdir(c.mnt(i) / croot) == []


def test_hard_link_and_nlink_seen_everywhere(shared_cluster: Cluster, croot: str) -> None:
    c = shared_cluster
    (c.mnt(0) / croot / "a").write_bytes(b"data")
    _prime(c, croot, "a", "b")
    os.link(c.mnt(1) / croot / "a", c.mnt(1) / croot / "b")
    for i in range(3):
        sa, sb = (os.lstat(c.mnt(i) / croot / n) for n in ("a", "b"))
        assert sa.st_ino == sb.st_ino and sa.st_nlink == 2 == sb.st_nlink, f"on n{i + 1}"
    os.unlink(c.mnt(2) / croot / "a")
    for i in range(3):
        assert os.lstat(c.mnt(i) / croot / "b").st_nlink == 1, f"nlink stale on n{i + 1}"
        assert (c.mnt(i) / croot / "b").read_bytes() == b"data"


def _write(path: Path, data: bytes, flags: int = os.O_TRUNC) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _read(path: Path) -> tuple[bytes, os.stat_result]:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks), os.fstat(fd)
    finally:
        os.close(fd)


def _check_everywhere(cluster: Cluster, croot: str, name: str, expected: bytes,
                      what: str) -> None:
    """Every node reads EXPECTED back through a new open; size, mtime and st_ino agree."""
    seen = []
    for i in range(len(cluster)):
        path = cluster.mnt(i) / croot / name
        data, fst = _read(path)
        assert len(data) == len(expected) and data == expected, (
            f"{what}: n{i + 1} read {len(data)} bytes that differ from the "
            f"{len(expected)} written")
        st = os.stat(path)
        seen.append((i, st.st_ino, st.st_size, st.st_mtime_ns, fst.st_size, fst.st_mtime_ns))
    assert len({s[1] for s in seen}) == 1, f"{what}: st_ino differs: {seen}"
    assert {s[2] for s in seen} == {len(expected)} == {s[4] for s in seen}, (
        f"{what}: sizes differ: {seen}")
    assert len({s[3] for s in seen} | {s[5] for s in seen}) == 1, f"{what}: mtimes differ: {seen}"


def test_close_to_open(shared_cluster: Cluster, croot: str) -> None:
    c = shared_cluster
    rnd = os.urandom(3 << 20)
    sizes = [0, 1, 4095, 4096, 4097, 65536 + 3, (1 << 20) + 7, 3 << 20]
    for k, size in enumerate(sizes):
        writer = k % 3
        name = f"f{size}"
        data = rnd[k : k + size]
        _write(c.mnt(writer) / croot / name, data)
        _check_everywhere(c, croot, name, data, f"new file of {size} bytes from n{writer + 1}")

    # One file, rewritten by each node in turn while the others hold its pages in cache.
    name = "shared"
    _write(c.mnt(0) / croot / name, rnd[: 1 << 20])
    _check_everywhere(c, croot, name, rnd[: 1 << 20], "first version")
    versions = [
        ("same size, other bytes", rnd[7 : (1 << 20) + 7], os.O_TRUNC),
        ("shorter (O_TRUNC)", rnd[100:5000], os.O_TRUNC),
        ("longer", rnd[:200_000], os.O_TRUNC),
        ("same size again", rnd[1:200_001], os.O_TRUNC),
        ("empty", b"", os.O_TRUNC),
        ("one byte", b"z", os.O_TRUNC),
    ]
    for k, (what, data, flags) in enumerate(versions):
        writer = (k + 1) % 3
        _write(c.mnt(writer) / croot / name, data, flags)
        _check_everywhere(c, croot, name, data, f"{what}, written on n{writer + 1}")

    # Partial overwrite in place, then truncate (shorter, then longer: a hole of zeros).
    base = rnd[: 1 << 16]
    _write(c.mnt(0) / croot / name, base)
    _check_everywhere(c, croot, name, base, "before the in-place overwrite")
    fd = os.open(c.mnt(1) / croot / name, os.O_WRONLY)
    try:
        os.pwrite(fd, b"X" * 1000, 5000)
    finally:
        os.close(fd)
    expected = base[:5000] + b"X" * 1000 + base[6000:]
    _check_everywhere(c, croot, name, expected, "in-place overwrite on n2")
    os.truncate(c.mnt(2) / croot / name, 3000)
    _check_everywhere(c, croot, name, expected[:3000], "truncate to 3000 on n3")
    os.truncate(c.mnt(0) / croot / name, 10_000)
    _check_everywhere(c, croot, name, expected[:3000] + bytes(7000), "truncate up on n1")
    fd = os.open(c.mnt(1) / croot / name, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"tail")
    finally:
        os.close(fd)
    _check_everywhere(c, croot, name, expected[:3000] + bytes(7000) + b"tail", "append on n2")

    trees = [tree_state(c.mnt(i) / croot) for i in range(3)]
    assert trees[0] == trees[1] == trees[2], tree_diff(trees[0], trees[1] if
                                                       trees[0] != trees[1] else trees[2])


def _backing(cluster: Cluster, ino: int) -> Path:
    return cluster.blockdir / "data" / f"{ino % 256:02x}" / f"{ino:x}"


def _wait_gone(path: Path, timeout_s: float = PURGE_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not path.exists():
            return True
        time.sleep(0.05)
    return not path.exists()


def test_unlink_while_open_on_another_node(shared_cluster: Cluster, croot: str) -> None:
    c = shared_cluster
    path1, path2, path3 = (c.mnt(i) / croot / "victim" for i in range(3))
    _write(path1, b"original data")
    ino = os.stat(path1).st_ino
    backing = _backing(c, ino)
    assert backing.exists(), f"backing file {backing} of inode {ino} is missing"

    fd = os.open(path2, os.O_RDWR)
    try:
        os.unlink(path1)
        for path in (path1, path2, path3):
            assert errno_of(os.stat, path) == errno.ENOENT
        # Node 2 keeps reading and writing the unlinked file through its handle.
        assert os.pread(fd, 100, 0) == b"original data"
        os.pwrite(fd, b"-and more written after the unlink", 13)
        assert os.pread(fd, 100, 0) == b"original data-and more written after the unlink"
        assert os.fstat(fd).st_ino == ino
        os.fsync(fd)
        time.sleep(0.5)  # give a wrong purge the time to happen
        assert backing.exists(), "backing file removed while the file is open on n2"
        assert os.pread(fd, 100, 0) == b"original data-and more written after the unlink"
    finally:
        os.close(fd)
    assert _wait_gone(backing), (
        f"backing file {backing} still there {PURGE_TIMEOUT_S:g} s after the last close")
    for i in range(3):
        assert os.listdir(c.mnt(i) / croot) == []


def test_unlink_while_open_on_two_other_nodes(shared_cluster: Cluster, croot: str) -> None:
    c = shared_cluster
    path1, path2, path3 = (c.mnt(i) / croot / "victim" for i in range(3))
    _write(path1, b"x" * 10_000)
    ino = os.stat(path1).st_ino
    backing = _backing(c, ino)
    fd2 = os.open(path2, os.O_RDONLY)
    fd3 = os.open(path3, os.O_RDWR)
    try:
        # Unlink on the node that does not have it open.
        os.unlink(path1)
        os.close(fd2)
        fd2 = -1
        time.sleep(0.5)  # give a wrong purge the time to happen
        assert backing.exists(), "backing file removed while the file is still open on n3"
        os.pwrite(fd3, b"y", 9_999)
        assert os.pread(fd3, 10_000, 0) == b"x" * 9_999 + b"y"
    finally:
        if fd2 >= 0:
            os.close(fd2)
        os.close(fd3)
    assert _wait_gone(backing), (
        f"backing file {backing} still there {PURGE_TIMEOUT_S:g} s after the last close")


def test_same_inode_numbers_everywhere(shared_cluster: Cluster, croot: str) -> None:
    c = shared_cluster
    for i in range(3):
        d = c.mnt(i) / croot / f"d{i}"
        d.mkdir()
        (d / "f").write_bytes(b"abc")
        os.symlink("f", d / "s")
        os.link(d / "f", d / "h")
    trees = [tree_state(c.mnt(i) / croot) for i in range(3)]
    assert trees[0] == trees[1] == trees[2], tree_diff(
        trees[0], trees[1] if trees[0] != trees[1] else trees[2])
    inos = [st[2] for st in trees[0].values()]
    assert len(set(inos)) == len(inos) - 3  # f and h share one inode in each directory
