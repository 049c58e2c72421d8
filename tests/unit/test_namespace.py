"""The apply function, called directly against a temporary LMDB replica."""

from __future__ import annotations

import errno
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterfs import records as r
from clusterfs.committer import commit_batch
from clusterfs.namespace import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INO,
    XATTR_CREATE,
    XATTR_REPLACE,
    Applied,
    NamespaceError,
    apply,
    initialise,
)
from clusterfs.store import Inode, Store

REG = stat.S_IFREG | 0o644


class Replica:
    """A temporary replica with one-line helpers for the records under test."""

    def __init__(self, path: Path) -> None:
        self.store = Store(path)
        self.now_ns = 1_000
        with self.store.write() as view:
            initialise(view, 0, 0, self.now_ns)

    def tick(self) -> int:
        self.now_ns += 1
        return self.now_ns

    def apply(self, record: r.Record) -> Applied:
        with self.store.write() as view, self.store.savepoint(view) as child:
            return apply(child, record)

    def fails(self, record: r.Record, expected_errno: int) -> None:
        before = self.store.digest()
        with pytest.raises(NamespaceError) as info:
            self.apply(record)
        assert info.value.errno == expected_errno, errno.errorcode[info.value.errno]
        assert self.store.digest() == before, "a refused record changed the replica"

    def file(self, parent: int, name: str) -> int:
        return self.apply(r.MakeNode(parent, name.encode(), REG, 0, 0, 0, self.tick())).ino

    def dir(self, parent: int, name: str) -> int:
        return self.apply(r.MakeDir(parent, name.encode(), 0o755, 0, 0, self.tick())).ino

    def inode(self, ino: int) -> Inode:
        with self.store.read() as view:
            inode = view.get_inode(ino)
        assert inode is not None
        return inode

    def names(self, parent: int) -> list[bytes]:
        with self.store.read() as view:
            return sorted(e.name for e in view.list_dir(parent, 0, 1 << 20))

    def child(self, parent: int, name: str) -> int | None:
        with self.store.read() as view:
            entry = view.lookup(parent, name.encode())
        return None if entry is None else entry.ino

    def rename(self, p_old: int, old: str, p_new: int, new: str, flags: int = 0) -> r.Rename:
        return r.Rename(p_old, old.encode(), p_new, new.encode(), flags, self.tick())


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Replica]:
    replica = Replica(tmp_path / "replica")
    yield replica
    replica.store.close()


def test_create_links_and_times(ns: Replica) -> None:
    root_before = ns.inode(ROOT_INO)
    ino = ns.file(ROOT_INO, "a")
    assert ns.inode(ino).nlink == 1
    root = ns.inode(ROOT_INO)
    assert root.nlink == 2 and root.mtime_ns > root_before.mtime_ns
    sub = ns.dir(ROOT_INO, "d")
    assert ns.inode(sub).nlink == 2 and ns.inode(ROOT_INO).nlink == 3
    assert ns.inode(sub).parent == ROOT_INO


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a", errno.EEXIST), ("x" * 256, errno.ENAMETOOLONG), ("", errno.EINVAL)],
)
def test_create_refused(ns: Replica, name: str, expected: int) -> None:
    ns.file(ROOT_INO, "a")
    ns.fails(r.MakeNode(ROOT_INO, name.encode(), REG, 0, 0, 0, 1), expected)


def test_create_in_missing_removed_or_non_directory_parent(ns: Replica) -> None:
    f = ns.file(ROOT_INO, "f")
    ns.fails(r.MakeNode(f, b"x", REG, 0, 0, 0, 1), errno.ENOTDIR)
    ns.fails(r.MakeNode(999, b"x", REG, 0, 0, 0, 1), errno.ENOENT)
    d = ns.dir(ROOT_INO, "d")
    ns.apply(r.RemoveDir(ROOT_INO, b"d", 1))
    ns.fails(r.MakeDir(d, b"x", 0o755, 0, 0, 1), errno.ENOENT)


def test_symlink_and_device_nodes(ns: Replica) -> None:
    ino = ns.apply(r.MakeSymlink(ROOT_INO, b"l", b"target", 0, 0, 1)).ino
    inode = ns.inode(ino)
    assert stat.S_ISLNK(inode.mode) and inode.size_bytes == 6
    dev = ns.apply(r.MakeNode(ROOT_INO, b"c", stat.S_IFCHR | 0o600, 0, 0, 0x0501, 1)).ino
    assert ns.inode(dev).rdev == 0x0501


def test_hard_links(ns: Replica) -> None:
    ino = ns.file(ROOT_INO, "a")
    ns.apply(r.Link(ino, ROOT_INO, b"b", 1))
    assert ns.inode(ino).nlink == 2
    ns.fails(r.Link(ino, ROOT_INO, b"b", 1), errno.EEXIST)
    d = ns.dir(ROOT_INO, "d")
    ns.fails(r.Link(d, ROOT_INO, b"d2", 1), errno.EPERM)
    ns.apply(r.Unlink(ROOT_INO, b"a", 1))
    assert ns.inode(ino).nlink == 1


def test_unlink_orphans_and_purge(ns: Replica) -> None:
    ino = ns.file(ROOT_INO, "a")
    done = ns.apply(r.Unlink(ROOT_INO, b"a", 1))
    assert done.orphaned == [ino]
    assert ns.inode(ino).nlink == 0
    ns.fails(r.Link(ino, ROOT_INO, b"again", 1), errno.ENOENT)
    purged = ns.apply(r.Purge(ino))
    assert [i.ino for i in purged.purged] == [ino]
    assert ns.apply(r.Purge(ino)).purged == []


def test_unlink_and_rmdir_refusals(ns: Replica) -> None:
    d = ns.dir(ROOT_INO, "d")
    ns.file(d, "f")
    ns.fails(r.Unlink(ROOT_INO, b"d", 1), errno.EISDIR)
    ns.fails(r.RemoveDir(ROOT_INO, b"d", 1), errno.ENOTEMPTY)
    ns.fails(r.RemoveDir(d, b"f", 1), errno.ENOTDIR)
    ns.fails(r.Unlink(ROOT_INO, b"missing", 1), errno.ENOENT)
    ns.apply(r.Unlink(d, b"f", 1))
    ns.apply(r.RemoveDir(ROOT_INO, b"d", 1))
    assert ns.inode(ROOT_INO).nlink == 2


def test_rename_replaces_a_file(ns: Replica) -> None:
    a, b = ns.file(ROOT_INO, "a"), ns.file(ROOT_INO, "b")
    done = ns.apply(ns.rename(ROOT_INO, "a", ROOT_INO, "b"))
    assert ns.child(ROOT_INO, "b") == a and ns.child(ROOT_INO, "a") is None
    assert done.orphaned == [b]


def test_rename_noreplace_and_exchange(ns: Replica) -> None:
    a, b = ns.file(ROOT_INO, "a"), ns.file(ROOT_INO, "b")
    ns.fails(ns.rename(ROOT_INO, "a", ROOT_INO, "b", RENAME_NOREPLACE), errno.EEXIST)
    ns.fails(ns.rename(ROOT_INO, "a", ROOT_INO, "c", RENAME_EXCHANGE), errno.ENOENT)
    ns.apply(ns.rename(ROOT_INO, "a", ROOT_INO, "b", RENAME_EXCHANGE))
    assert ns.child(ROOT_INO, "a") == b and ns.child(ROOT_INO, "b") == a


def test_exchange_directory_with_file_across_parents(ns: Replica) -> None:
    p1, p2 = ns.dir(ROOT_INO, "p1"), ns.dir(ROOT_INO, "p2")
    sub = ns.dir(p1, "sub")
    f = ns.file(p2, "f")
    ns.apply(ns.rename(p1, "sub", p2, "f", RENAME_EXCHANGE))
    assert ns.child(p2, "f") == sub and ns.child(p1, "sub") == f
    assert ns.inode(p1).nlink == 2 and ns.inode(p2).nlink == 3
    assert ns.inode(sub).parent == p2


def test_rename_directory_across_parents(ns: Replica) -> None:
    p1, p2 = ns.dir(ROOT_INO, "p1"), ns.dir(ROOT_INO, "p2")
    sub = ns.dir(p1, "sub")
    ns.apply(ns.rename(p1, "sub", p2, "moved"))
    assert ns.inode(p1).nlink == 2 and ns.inode(p2).nlink == 3
    assert ns.inode(sub).parent == p2


def test_rename_directory_onto_directories(ns: Replica) -> None:
    ns.dir(ROOT_INO, "src")
    full = ns.dir(ROOT_INO, "full")
    ns.file(full, "x")
    ns.dir(ROOT_INO, "empty")
    ns.file(ROOT_INO, "file")
    ns.fails(ns.rename(ROOT_INO, "src", ROOT_INO, "full"), errno.ENOTEMPTY)
    ns.fails(ns.rename(ROOT_INO, "src", ROOT_INO, "file"), errno.ENOTDIR)
    ns.fails(ns.rename(ROOT_INO, "file", ROOT_INO, "empty"), errno.EISDIR)
    links_before = ns.inode(ROOT_INO).nlink
    ns.apply(ns.rename(ROOT_INO, "src", ROOT_INO, "empty"))
    assert ns.inode(ROOT_INO).nlink == links_before - 1


def test_rename_into_own_subtree(ns: Replica) -> None:
    a = ns.dir(ROOT_INO, "a")
    b = ns.dir(a, "b")
    ns.fails(ns.rename(ROOT_INO, "a", b, "a"), errno.EINVAL)
    ns.fails(ns.rename(ROOT_INO, "a", a, "x"), errno.EINVAL)
    ns.fails(ns.rename(ROOT_INO, "a", a, "b", RENAME_EXCHANGE), errno.EINVAL)


def test_rename_between_names_of_one_inode_does_nothing(ns: Replica) -> None:
    a = ns.file(ROOT_INO, "a")
    ns.apply(r.Link(a, ROOT_INO, b"b", 1))
    ns.apply(ns.rename(ROOT_INO, "a", ROOT_INO, "b"))
    assert ns.names(ROOT_INO) == [b"a", b"b"] and ns.inode(a).nlink == 2


def test_setattr_keeps_the_file_type(ns: Replica) -> None:
    d = ns.dir(ROOT_INO, "d")
    ns.apply(r.SetAttr(d, 5, mode=0o1777, uid=7, gid=8))
    inode = ns.inode(d)
    assert inode.mode == stat.S_IFDIR | 0o1777 and (inode.uid, inode.gid) == (7, 8)
    assert inode.ctime_ns == 5
    ns.fails(r.SetAttr(d, 6, size_bytes=0), errno.EISDIR)


def test_xattr_flags_and_limits(ns: Replica) -> None:
    a = ns.file(ROOT_INO, "a")
    ns.fails(r.SetXattr(a, b"user.x", b"1", XATTR_REPLACE, 1), errno.ENODATA)
    ns.apply(r.SetXattr(a, b"user.x", b"1", XATTR_CREATE, 1))
    ns.fails(r.SetXattr(a, b"user.x", b"2", XATTR_CREATE, 1), errno.EEXIST)
    ns.fails(r.SetXattr(a, b"user." + b"y" * 300, b"", 0, 1), errno.ERANGE)
    ns.fails(r.SetXattr(a, b"user.big", b"v" * 65537, 0, 1), errno.E2BIG)
    ns.fails(r.RemoveXattr(a, b"user.none", 1), errno.ENODATA)
    ns.apply(r.RemoveXattr(a, b"user.x", 1))


def test_disk_state_is_compare_and_set(ns: Replica) -> None:
    ino = ns.file(ROOT_INO, "disk.vhd")
    ns.apply(r.SetDiskState(ino, b"", b"one"))
    ns.fails(r.SetDiskState(ino, b"", b"two"), errno.EAGAIN)  # decided from a stale state
    ns.apply(r.SetDiskState(ino, b"one", b"two"))
    with ns.store.read() as view:
        assert view.get_disk_state(ino) == b"two"
    ns.fails(r.SetDiskState(ROOT_INO, b"", b"x"), errno.EINVAL)
    ns.fails(r.SetDiskState(999, b"", b"x"), errno.ENOENT)


def test_purge_drops_the_disk_state(ns: Replica) -> None:
    ino = ns.file(ROOT_INO, "disk.vhd")
    ns.apply(r.SetDiskState(ino, b"", b"state"))
    ns.apply(r.Unlink(ROOT_INO, b"disk.vhd", ns.tick()))
    ns.apply(r.Purge(ino))
    with ns.store.read() as view:
        assert view.get_disk_state(ino) == b""


def test_readdir_cookies_survive_changes(ns: Replica) -> None:
    for i in range(10):
        ns.file(ROOT_INO, f"f{i}")
    with ns.store.read() as view:
        first = view.list_dir(ROOT_INO, 0, 4)
    ns.apply(r.Unlink(ROOT_INO, b"f2", 1))
    ns.apply(r.Unlink(ROOT_INO, b"f7", 1))
    ns.file(ROOT_INO, "new")
    with ns.store.read() as view:
        rest = view.list_dir(ROOT_INO, first[-1].cookie, 100)
    seen = [e.name for e in first + rest]
    assert len(seen) == len(set(seen))
    expected = {f"f{i}".encode() for i in range(10) if i not in (2, 7)} | {b"new"}
    assert expected <= set(seen)


def test_batch_rolls_back_only_the_refused_record(tmp_path: Path) -> None:
    store = Store(tmp_path / "replica")
    with store.write() as view:
        initialise(view, 0, 0, 1)
    outcomes = commit_batch(store, [
        r.MakeNode(ROOT_INO, b"a", REG, 0, 0, 0, 2),
        r.MakeNode(ROOT_INO, b"a", REG, 0, 0, 0, 3),
        r.MakeNode(ROOT_INO, b"b", REG, 0, 0, 0, 4),
    ])
    assert isinstance(outcomes[0], Applied) and isinstance(outcomes[2], Applied)
    assert isinstance(outcomes[1], NamespaceError) and outcomes[1].errno == errno.EEXIST
    with store.read() as view:
        assert view.get_counter(b"applied_seq") == 2
        assert sorted(e.name for e in view.list_dir(ROOT_INO, 0, 10)) == [b"a", b"b"]
    store.close()


def test_same_records_same_replica(tmp_path: Path) -> None:
    batch: list[r.Record] = [
        r.MakeDir(ROOT_INO, b"d", 0o755, 0, 0, 2),
        r.MakeNode(2, b"f", REG, 0, 0, 0, 3),
        r.Rename(2, b"f", ROOT_INO, b"g", 0, 4),
        r.SetXattr(3, b"user.k", b"v", 0, 5),
        r.Unlink(ROOT_INO, b"missing", 6),
    ]
    digests = []
    for name in ("one", "two"):
        store = Store(tmp_path / name)
        with store.write() as view:
            initialise(view, 0, 0, 1)
        commit_batch(store, batch)
        digests.append(store.digest())
        store.close()
    assert digests[0] == digests[1]


def test_records_round_trip() -> None:
    record = r.Rename(1, b"a", 2, b"b", RENAME_NOREPLACE, 42)
    assert r.decode(r.encode(record)) == record
