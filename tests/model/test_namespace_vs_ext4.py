"""A Hypothesis state machine: random namespace changes applied both to a replica (through
the apply function) and to a real ext4 directory, which is the model.

After every step the errno must be the one ext4 gave, and the two trees must hold the same
names, types and link counts; the replica's own consistency check must stay clean. Paths are
resolved component by component the way the kernel walks them before it calls a file system.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from clusterfs import fsck
from clusterfs import records as r
from clusterfs.namespace import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INO,
    NamespaceError,
    apply,
    initialise,
)
from clusterfs.store import Store
from tests.util import fs_type, renameat2

NAMES = st.sampled_from(["a", "b", "c"])
PATHS = st.lists(NAMES, min_size=1, max_size=3)
REFERENCE_BASE = "/var/tmp"


def _errno_of(func: object, *args: object) -> int:
    try:
        func(*args)  # type: ignore[operator]
    except OSError as exc:
        return exc.errno or -1
    return 0


class NamespaceVsExt4(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="clusterfs-model-", dir=REFERENCE_BASE))
        self.ref = self.base / "ref"
        self.ref.mkdir()
        self.store = Store(self.base / "replica", durable=False)  # the flushes prove nothing here
        with self.store.write() as view:
            initialise(view, 0, 0, 1)
        self.now_ns = 10

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.base, ignore_errors=True)

    # -- the replica side -------------------------------------------------------------------
    def _walk(self, parts: list[str]) -> int:
        """The inode of directory `parts`, or NamespaceError as the kernel's walk fails."""
        ino = ROOT_INO
        with self.store.read() as view:
            for part in parts:
                entry = view.lookup(ino, part.encode())
                if entry is None:
                    raise NamespaceError(errno.ENOENT)
                inode = view.get_inode(entry.ino)
                assert inode is not None
                if not stat.S_ISDIR(inode.mode):
                    raise NamespaceError(errno.ENOTDIR)
                ino = entry.ino
        return ino

    def _ours(self, make: object, *paths: list[str]) -> int:
        """Resolve the parents of `paths`, build the record with `make` and apply it."""
        try:
            parents = [self._walk(p[:-1]) for p in paths]
            self.now_ns += 1
            record = make(*parents)  # type: ignore[operator]
            with self.store.write() as view, self.store.savepoint(view) as child:
                apply(child, record)
        except NamespaceError as exc:
            return exc.errno
        return 0

    def _leaf(self, parts: list[str]) -> bytes:
        return parts[-1].encode()

    def _ino_of(self, parts: list[str]) -> int | None:
        try:
            parent = self._walk(parts[:-1])
        except NamespaceError:
            return None
        with self.store.read() as view:
            entry = view.lookup(parent, self._leaf(parts))
        return None if entry is None else entry.ino

    def _same(self, ours: int, theirs: int, what: str) -> None:
        assert ours == theirs, (
            f"{what}: clusterfs {errno.errorcode.get(ours, ours)}, "
            f"ext4 {errno.errorcode.get(theirs, theirs)}")

    # -- rules ------------------------------------------------------------------------------
    @rule(path=PATHS)
    def mkdir(self, path: list[str]) -> None:
        theirs = _errno_of(os.mkdir, self.ref.joinpath(*path), 0o755)
        ours = self._ours(lambda p: r.MakeDir(p, self._leaf(path), 0o755, 0, 0, self.now_ns),
                          path)
        self._same(ours, theirs, f"mkdir {path}")

    @rule(path=PATHS)
    def mkfifo(self, path: list[str]) -> None:
        theirs = _errno_of(os.mkfifo, self.ref.joinpath(*path), 0o644)
        ours = self._ours(lambda p: r.MakeNode(p, self._leaf(path), stat.S_IFIFO | 0o644, 0, 0,
                                               0, self.now_ns), path)
        self._same(ours, theirs, f"mkfifo {path}")

    @rule(path=PATHS)
    def unlink(self, path: list[str]) -> None:
        theirs = _errno_of(os.unlink, self.ref.joinpath(*path))
        ours = self._ours(lambda p: r.Unlink(p, self._leaf(path), self.now_ns), path)
        self._same(ours, theirs, f"unlink {path}")

    @rule(path=PATHS)
    def rmdir(self, path: list[str]) -> None:
        theirs = _errno_of(os.rmdir, self.ref.joinpath(*path))
        ours = self._ours(lambda p: r.RemoveDir(p, self._leaf(path), self.now_ns), path)
        self._same(ours, theirs, f"rmdir {path}")

    @rule(src=PATHS, dst=PATHS, flags=st.sampled_from([0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, src: list[str], dst: list[str], flags: int) -> None:
        theirs = _errno_of(renameat2, self.ref.joinpath(*src), self.ref.joinpath(*dst), flags)
        ours = self._ours(
            lambda ps, pd: r.Rename(ps, self._leaf(src), pd, self._leaf(dst), flags,
                                    self.now_ns), src, dst)
        self._same(ours, theirs, f"rename {src} -> {dst} flags {flags}")

    @rule(src=PATHS, dst=PATHS)
    def link(self, src: list[str], dst: list[str]) -> None:
        theirs = _errno_of(os.link, self.ref.joinpath(*src), self.ref.joinpath(*dst))
        ino = self._ino_of(src)
        if ino is None:  # the kernel's walk to the source fails before the file system
            assert theirs in (errno.ENOENT, errno.ENOTDIR), f"link {src}: ext4 {theirs}"
            return
        ours = self._ours(lambda p: r.Link(ino, p, self._leaf(dst), self.now_ns), dst)
        self._same(ours, theirs, f"link {src} -> {dst}")

    # -- invariants -------------------------------------------------------------------------
    def _replica_tree(self, ino: int, prefix: str) -> dict[str, tuple[str, int]]:
        tree: dict[str, tuple[str, int]] = {}
        with self.store.read() as view:
            entries = view.list_dir(ino, 0, 1 << 16)
            inodes = {e.name: view.get_inode(e.ino) for e in entries}
        for entry in entries:
            inode = inodes[entry.name]
            assert inode is not None, f"{prefix}{entry.name!r} names a missing inode"
            path = prefix + entry.name.decode()
            kind = "dir" if stat.S_ISDIR(inode.mode) else "fifo"
            tree[path] = (kind, inode.nlink)
            if kind == "dir":
                tree.update(self._replica_tree(entry.ino, path + "/"))
        return tree

    def _ext4_tree(self) -> dict[str, tuple[str, int]]:
        tree: dict[str, tuple[str, int]] = {}
        for dirpath, dirnames, filenames in os.walk(self.ref):
            for name in dirnames + filenames:
                full = Path(dirpath) / name
                st_ = full.lstat()
                kind = "dir" if stat.S_ISDIR(st_.st_mode) else "fifo"
                tree[str(full.relative_to(self.ref))] = (kind, st_.st_nlink)
        return tree

    @invariant()
    def same_tree_as_ext4(self) -> None:
        assert self._replica_tree(ROOT_INO, "") == self._ext4_tree()

    @invariant()
    def replica_is_consistent(self) -> None:
        report = fsck.Report()
        fsck.check_namespace(self.store, report)
        report.unpurged_inodes = []  # unlinked inodes wait for the node's purge: expected
        assert report.clean, report.lines()


@pytest.mark.skipif(fs_type(REFERENCE_BASE) != "ext4", reason="the reference must be ext4")
def test_namespace_matches_ext4() -> None:
    machine = settings(max_examples=40, stateful_step_count=30, deadline=None)(
        NamespaceVsExt4).TestCase
    machine().runTest()
