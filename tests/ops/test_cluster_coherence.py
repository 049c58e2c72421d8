"""Two (or three) nodes' file system layers over ONE shared block directory, each with its
own replica, fed the same records in the same order by a test-only mirror committer.

The mirror stands in for the 2PC layer (not under test here): it applies each record on
every replica with `commit_batch` and calls every node's `on_applied`, with `local` true
only on the node that submitted the record. What is under test is the FileSystem layer:
backing files made and removed once, cluster-wide open tracking before a purge, and the
kernel cache invalidations a remote record causes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio

from clusterfs import fsck, fuse_ops
from clusterfs import records as r
from clusterfs.attributes import Caller
from clusterfs.blockdir import BlockDir, format_blockdir, hold_shared, is_locked
from clusterfs.committer import commit_batch
from clusterfs.filesystem import AttrChanges, FileSystem, NoInvalidator
from clusterfs.namespace import ROOT_INO, Applied, NamespaceError
from clusterfs.node import open_replica, recover
from clusterfs.store import Store
from tests.util import fuse_skip_reason

ROOT = Caller(0, 0, os.getpid())


class RecordingInvalidator:
    """A fake of the kernel side (pyfuse3), recording what the node asked it to drop."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, bytes]] = []
        self.inodes: list[int] = []

    def entry(self, parent: int, name: bytes) -> None:
        self.entries.append((parent, name))

    def inode(self, ino: int) -> None:
        self.inodes.append(ino)

    async def drained(self) -> None:
        pass

    def clear(self) -> None:
        self.entries.clear()
        self.inodes.clear()


class Node:
    def __init__(self, name: str, store: Store, fs: FileSystem) -> None:
        self.name, self.store, self.fs = name, store, fs
        self.kernel = RecordingInvalidator()
        fs.invalidator = self.kernel


class Mirror:
    """Every record on every replica, in one order; lazy records wait for `commit_lazy`."""

    def __init__(self, blockdir: BlockDir) -> None:
        self.blockdir = blockdir
        self.nodes: list[Node] = []
        self._lazy: list[tuple[r.Record, FileSystem]] = []

    def add(self, name: str, state_dir: Path) -> Node:
        store = open_replica(state_dir, self.blockdir)
        fs = FileSystem(store, self.blockdir)
        fs.committer = MirrorCommitter(self, fs)
        node = Node(name, store, fs)
        self.nodes.append(node)
        return node

    def commit(self, record: r.Record, submitter: FileSystem) -> Applied | NamespaceError:
        outcomes = [commit_batch(node.store, [record])[0] for node in self.nodes]
        assert len({type(o) for o in outcomes}) == 1, f"replicas disagree on {record}"
        mine = outcomes[0]
        for node, outcome in zip(self.nodes, outcomes, strict=True):
            if node.fs is submitter:
                mine = outcome
            if isinstance(outcome, Applied):
                node.fs.on_applied(record, outcome, node.fs is submitter)
        return mine

    def commit_without_side_effects(self, record: r.Record) -> None:
        """As if the capturing node died right after the commit, before any node applied
        the record's side effects (they are lost with the nodes' memory)."""
        for node in self.nodes:
            assert isinstance(commit_batch(node.store, [record])[0], Applied)

    def queue_lazy(self, record: r.Record, submitter: FileSystem) -> None:
        self._lazy.append((record, submitter))

    def commit_lazy(self) -> int:
        """Commit the queued lazy records (purges); returns how many there were."""
        lazy, self._lazy = self._lazy, []
        for record, submitter in lazy:
            self.commit(record, submitter)
        for node in self.nodes:
            node.fs.remove_purged_now()
        return len(lazy)

    def assert_replicas_agree(self) -> None:
        assert len({node.store.digest() for node in self.nodes}) == 1


class MirrorCommitter:
    def __init__(self, mirror: Mirror, fs: FileSystem) -> None:
        self._mirror, self._fs = mirror, fs

    async def submit(self, record: r.Record) -> Applied:
        await trio.lowlevel.checkpoint()
        outcome = self._mirror.commit(record, self._fs)
        if isinstance(outcome, NamespaceError):
            raise outcome
        return outcome

    def submit_lazy(self, record: r.Record) -> None:
        self._mirror.queue_lazy(record, self._fs)


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    mirror = Mirror(format_blockdir(tmp_path / "blocks"))
    yield mirror
    for node in mirror.nodes:
        node.fs.close_all()
        node.store.close()


@pytest.fixture
def a(mirror: Mirror, tmp_path: Path) -> Node:
    return mirror.add("a", tmp_path / "state-a")


@pytest.fixture
def b(mirror: Mirror, tmp_path: Path, a: Node) -> Node:
    return mirror.add("b", tmp_path / "state-b")


def backing_files(blockdir: BlockDir) -> set[int]:
    return {ino for ino, _ in blockdir.iter_backing()}


def fds_open_on(path: str) -> int:
    """How many fds of this process are open on the file at `path`."""
    path = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(f"/proc/self/fd/{fd}") == path
    return count


def assert_fsck_clean(mirror: Mirror) -> None:
    for node in mirror.nodes:
        report = fsck.check(node.store, mirror.blockdir)
        assert report.clean, (node.name, report.lines())


async def make_file(node: Node, name: bytes, data: bytes = b"data") -> int:
    """Create, write and close a file; the creating node's kernel keeps its lookup."""
    fh, attrs = await node.fs.create(ROOT_INO, name, 0o644, os.O_RDWR, ROOT)
    await node.fs.write(fh, 0, data)
    node.fs.release(fh)
    return attrs.ino


def open_by_name(node: Node, name: bytes) -> int:
    """What the kernel does for open(2): a lookup (a reference it keeps), then open."""
    ino = node.fs.lookup(ROOT_INO, name).ino
    fh, _ = node.fs.open(ino, os.O_RDWR, ROOT)
    return fh


def assert_gone_everywhere(mirror: Mirror, ino: int) -> None:
    assert ino not in backing_files(mirror.blockdir)
    for node in mirror.nodes:
        with pytest.raises(NamespaceError) as info:
            node.fs.getattr(ino)
        assert info.value.errno == errno.ENOENT
    assert_fsck_clean(mirror)
    mirror.assert_replicas_agree()


# -- the OFD lock helpers -------------------------------------------------------------------

def test_shared_lock_is_seen_from_another_open_file_description(tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    Path(path).write_bytes(b"")
    assert not is_locked(path)
    holder = os.open(path, os.O_RDWR)
    second_holder = os.open(path, os.O_RDONLY)
    try:
        hold_shared(holder)
        hold_shared(second_holder)  # shared locks do not conflict with each other
        assert is_locked(path)
        os.close(second_holder)
        bystander = os.open(path, os.O_RDONLY)
        os.close(bystander)  # unlike a POSIX lock, closing another fd keeps an OFD lock
        assert is_locked(path)
    finally:
        os.close(holder)
    assert not is_locked(path)
    assert not is_locked(str(tmp_path / "missing"))


# -- backing files ----------------------------------------------------------------------------

async def test_create_on_a_makes_one_backing_file_and_no_fd_on_b(
        mirror: Mirror, a: Node, b: Node) -> None:
    ino = await make_file(a, b"f", b"hello")
    assert backing_files(mirror.blockdir) == {ino}
    assert fds_open_on(mirror.blockdir.path(ino)) == 0, "a backing fd leaked"
    fh = open_by_name(b, b"f")
    assert b.fs.read(fh, 0, 100) == b"hello"
    b.fs.release(fh)
    assert fds_open_on(mirror.blockdir.path(ino)) == 0
    assert b.fs.getattr(ino).size_bytes == 5
    assert_fsck_clean(mirror)
    mirror.assert_replicas_agree()


async def test_spares_on_both_nodes_stay_true_to_fsck(mirror: Mirror, a: Node, b: Node) -> None:
    """Both nodes make spares for the same numbers; a number that goes to a directory loses
    its spare, one that goes to a regular file on A keeps it as A's backing file."""
    with a.store.read() as view:
        first = view.get_counter(b"next_ino")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.fs.spares.run)
        await nursery.start(b.fs.spares.run)
        with trio.fail_after(10):
            while first + 1 not in backing_files(mirror.blockdir):
                await trio.sleep(0.01)
            await trio.sleep(0.05)  # let both nodes adopt theirs
        d = await a.fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
        ino = await make_file(a, b"f", b"kept")
        for node in mirror.nodes:
            node.fs.remove_purged_now()
        nursery.cancel_scope.cancel()
    assert (d.ino, ino) == (first, first + 1)
    assert d.ino not in backing_files(mirror.blockdir)
    with open(mirror.blockdir.path(ino), "rb") as backing:
        assert backing.read() == b"kept"
    assert_fsck_clean(mirror)


# -- purging after the last close in the cluster ------------------------------------------

async def test_unlink_on_a_keeps_the_file_while_b_has_it_open(
        mirror: Mirror, a: Node, b: Node) -> None:
    ino = await make_file(a, b"f", b"still here")
    fh = open_by_name(b, b"f")
    await a.fs.unlink(ROOT_INO, b"f")
    a.fs.forget(ino, 1)  # A's kernel lets go: only B's open file keeps it now
    mirror.commit_lazy()
    assert ino in backing_files(mirror.blockdir)
    assert b.fs.read(fh, 0, 100) == b"still here"
    assert a.fs.getattr(ino).nlink == 0
    b.fs.release(fh)
    b.fs.forget(ino, 1)
    assert mirror.commit_lazy() >= 1
    assert_gone_everywhere(mirror, ino)


@pytest.mark.parametrize("last", ["a", "b"])
async def test_unlink_while_open_on_both_purges_after_the_last_close(
        mirror: Mirror, a: Node, b: Node, last: str) -> None:
    ino = await make_file(a, b"f")
    handles = {"a": open_by_name(a, b"f"), "b": open_by_name(b, b"f")}
    await b.fs.unlink(ROOT_INO, b"f")
    first = "b" if last == "a" else "a"
    nodes = {"a": a, "b": b}
    for name in (first, last):
        nodes[name].fs.release(handles[name])
        nodes[name].fs.forget(ino, 2 if name == "a" else 1)  # A also has the create's
        mirror.commit_lazy()
        if name == first:
            assert ino in backing_files(mirror.blockdir), "purged while open on " + last
            assert nodes[last].fs.read(handles[last], 0, 4) == b"data"
    assert_gone_everywhere(mirror, ino)


async def test_only_the_unlinking_node_purges_and_a_second_purge_is_harmless(
        mirror: Mirror, a: Node, b: Node, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing holds the file: the unlinking node alone submits a Purge (not every node);
    a second Purge of the same inode (two last closes racing) is a no-op."""
    ino = await make_file(a, b"f")
    a.fs.forget(ino, 1)
    await a.fs.unlink(ROOT_INO, b"f")
    assert mirror.commit_lazy() == 1
    assert_gone_everywhere(mirror, ino)
    assert b.fs.committer is not None
    b.fs.committer.submit_lazy(r.Purge(ino))
    assert mirror.commit_lazy() == 1
    assert_gone_everywhere(mirror, ino)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]


async def test_orphans_left_by_a_killed_node_are_purged_by_another(
        mirror: Mirror, a: Node, b: Node) -> None:
    """A third node's process holds the unlinked file open and is killed (-9): its lock
    goes with it, and B purges the orphan, which A (whose kernel still holds it) never did."""
    ino = await make_file(a, b"f")
    with subprocess.Popen([sys.executable, "-c", HOLDER, mirror.blockdir.path(ino)],
                          stdout=subprocess.PIPE) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
            await a.fs.unlink(ROOT_INO, b"f")
            await b.fs.settle()
            assert mirror.commit_lazy() == 0
            assert b.fs.getattr(ino).nlink == 0, "purged while open on another node"
        finally:
            holder.kill()
    await b.fs.settle()
    mirror.commit_lazy()  # the backing files of purged inodes go
    assert_gone_everywhere(mirror, ino)


HOLDER = """
import os, sys, time
from clusterfs.blockdir import hold_shared
hold_shared(os.open(sys.argv[1], os.O_RDWR))
print("held", flush=True)
time.sleep(60)
"""


async def test_settle_keeps_an_orphan_another_node_has_open(
        mirror: Mirror, tmp_path: Path, a: Node, b: Node) -> None:
    """A's unlinks commit, then A dies before any node acts on them. C, restarted, settles:
    it purges (through the committer) the orphan nobody holds, and keeps the one B has open;
    once B closes it, B purges it."""
    c = mirror.add("c", tmp_path / "state-c")
    free = await make_file(a, b"free", b"open nowhere")
    held = await make_file(a, b"held", b"open on B")
    fh = open_by_name(b, b"held")
    for name in (b"free", b"held"):
        mirror.commit_without_side_effects(r.Unlink(ROOT_INO, name, 1))
    await c.fs.settle()
    mirror.commit_lazy()
    assert backing_files(mirror.blockdir) == {held}
    with pytest.raises(NamespaceError):
        b.fs.getattr(free)
    assert b.fs.read(fh, 0, 100) == b"open on B"
    b.fs.release(fh)
    b.fs.forget(held, 1)
    assert mirror.commit_lazy() == 1
    assert_gone_everywhere(mirror, held)


async def test_a_lagging_replica_leaves_the_block_directory_alone(
        mirror: Mirror, tmp_path: Path, a: Node, b: Node) -> None:
    """C was down while A created one file and purged another: recovering before it has
    caught up must neither remove the new file (its number is beyond C's counter) nor make
    a backing file again for the purged one (still an inode in C's replica)."""
    c = mirror.add("c", tmp_path / "state-c")
    old = await make_file(a, b"old", b"old data")
    mirror.nodes.remove(c)  # C stops
    a.fs.forget(old, 1)
    await a.fs.unlink(ROOT_INO, b"old")
    mirror.commit_lazy()
    new = await make_file(a, b"new", b"made while C was down")
    c.store.close()
    store = open_replica(tmp_path / "state-c", mirror.blockdir)  # C restarts after a crash
    with store.write() as view:
        view.put_meta(b"clean", b"0")
    try:
        recover(store, mirror.blockdir)
        assert fsck.check(store, mirror.blockdir).unpurged_inodes == []  # C's view: old lives
        assert backing_files(mirror.blockdir) == {new}
        with open(mirror.blockdir.path(new), "rb") as backing:
            assert backing.read() == b"made while C was down"
    finally:
        store.close()


# -- kernel caches ----------------------------------------------------------------------------

async def test_remote_records_invalidate_what_they_changed(
        mirror: Mirror, a: Node, b: Node) -> None:
    # A new name was never cached (no negative entries): only the parent's attributes.
    d = (await a.fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)).ino
    assert b.kernel.entries == [] and b.kernel.inodes == [ROOT_INO]
    b.kernel.clear()

    fh, f = await a.fs.create(d, b"f", 0o644, os.O_RDWR, ROOT)
    a.fs.release(fh)
    assert (b.kernel.entries, b.kernel.inodes) == ([], [d])
    b.kernel.clear()

    await a.fs.setattr(f.ino, AttrChanges(mode=0o600), None)
    await a.fs.setxattr(f.ino, b"user.k", b"v")
    assert (b.kernel.entries, b.kernel.inodes) == ([], [f.ino, f.ino])
    b.kernel.clear()

    _, g = await a.fs.create(ROOT_INO, b"g", 0o644, os.O_RDWR, ROOT)
    b.kernel.clear()
    await a.fs.rename(d, b"f", ROOT_INO, b"g", 0)  # replaces g
    assert b.kernel.entries == [(d, b"f"), (ROOT_INO, b"g")]
    assert sorted(b.kernel.inodes) == sorted([f.ino, d, ROOT_INO, g.ino])
    b.kernel.clear()

    await a.fs.unlink(ROOT_INO, b"g")
    assert (b.kernel.entries, sorted(b.kernel.inodes)) == ([(ROOT_INO, b"g")],
                                                           sorted([ROOT_INO, f.ino]))
    assert a.kernel.entries == [] and a.kernel.inodes == [], "local records need none"


async def test_remote_purge_invalidates_only_elsewhere(mirror: Mirror, a: Node, b: Node) -> None:
    ino = await make_file(a, b"f")
    a.fs.forget(ino, 1)
    await a.fs.unlink(ROOT_INO, b"f")
    b.kernel.clear()
    mirror.commit_lazy()  # A's Purge
    assert ino in b.kernel.inodes
    assert ino not in a.kernel.inodes


async def test_remote_change_drops_cached_pages_at_next_open(
        mirror: Mirror, a: Node, b: Node) -> None:
    ino = await make_file(a, b"f")
    b.fs.release(open_by_name(b, b"f"))
    fh, keep_cache = b.fs.open(ino, os.O_RDONLY, ROOT)
    b.fs.release(fh)
    assert keep_cache
    await a.fs.setattr(ino, AttrChanges(mode=0o600), None)
    fh, keep_cache = b.fs.open(ino, os.O_RDONLY, ROOT)
    b.fs.release(fh)
    assert not keep_cache


async def test_data_written_elsewhere_before_a_late_release_drops_cached_pages(
        mirror: Mirror, a: Node, b: Node) -> None:
    """The kernel sends RELEASE after close(2) returned: a write on `a` can come between
    them, and the next open on `b` must still drop what `b`'s kernel cached before it."""
    ino = await make_file(a, b"f")
    fh_b = open_by_name(b, b"f")
    fh_a, _ = a.fs.open(ino, os.O_WRONLY, ROOT)
    await a.fs.write(fh_a, 4, b"tail")
    a.fs.release(fh_a)
    b.fs.release(fh_b)  # late: after a's write
    fh, keep_cache = b.fs.open(ino, os.O_RDONLY, ROOT)
    b.fs.release(fh)
    assert not keep_cache


async def test_own_writes_and_truncates_keep_cached_pages(
        mirror: Mirror, a: Node, b: Node) -> None:
    ino = await make_file(a, b"f")
    fh = open_by_name(b, b"f")
    await b.fs.write(fh, 0, b"0123456789")
    await b.fs.setattr(ino, AttrChanges(size_bytes=3), fh)
    await b.fs.setattr(ino, AttrChanges(size_bytes=7), None)
    await b.fs.setattr(ino, AttrChanges(mtime_ns=10**18), None)
    b.fs.release(fh)
    fh, keep_cache = b.fs.open(ino, os.O_RDONLY, ROOT)
    b.fs.release(fh)
    assert keep_cache


async def test_own_write_after_a_write_elsewhere_drops_cached_pages(
        mirror: Mirror, a: Node, b: Node) -> None:
    ino = await make_file(a, b"f")
    fh_b = open_by_name(b, b"f")
    fh_a, _ = a.fs.open(ino, os.O_WRONLY, ROOT)
    await a.fs.write(fh_a, 4, b"tail")  # b's kernel does not have these bytes
    a.fs.release(fh_a)
    await b.fs.write(fh_b, 0, b"head")
    b.fs.release(fh_b)
    fh, keep_cache = b.fs.open(ino, os.O_RDONLY, ROOT)
    b.fs.release(fh)
    assert not keep_cache


async def test_kernel_invalidator_without_a_mount_logs_at_debug_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not mounted, pyfuse3 answers EINVAL: logged at debug, never raised. Attributes are
    dropped inline, entries by the thread, which `drained` waits for; stop resets."""
    monkeypatch.setattr(fuse_ops, "DRAIN_TIMEOUT_S", 10.0)  # no early return on a slow host
    blockdir = format_blockdir(tmp_path / "blocks")
    store = open_replica(tmp_path / "state", blockdir)
    fs = FileSystem(store, blockdir)
    caplog.set_level(logging.DEBUG, logger="clusterfs.fuse_ops")

    def logged() -> list[str]:
        return [rec.getMessage() for rec in caplog.records if rec.name == "clusterfs.fuse_ops"]

    with fuse_ops.invalidating(fs) as invalidator:
        assert fs.invalidator is invalidator
        fs.invalidator.inode(ROOT_INO)
        assert len(logged()) == 1
        fs.invalidator.entry(ROOT_INO, b"x")
        await fs.caches_dropped()
        assert len(logged()) == 2 and "b'x'" in logged()[1]
    assert isinstance(fs.invalidator, NoInvalidator)
    assert {rec.levelno for rec in caplog.records if rec.name == "clusterfs.fuse_ops"} == {
        logging.DEBUG}
    store.close()


async def test_mknod_of_a_fifo_on_a_needs_no_backing_file(
        mirror: Mirror, a: Node, b: Node) -> None:
    attrs = await a.fs.mknod(ROOT_INO, b"p", stat.S_IFIFO | 0o644, 0, ROOT)
    assert backing_files(mirror.blockdir) == set()
    assert stat.S_ISFIFO(b.fs.lookup(ROOT_INO, b"p").mode)
    await b.fs.unlink(ROOT_INO, b"p")
    a.fs.forget(attrs.ino, 1)
    b.fs.forget(attrs.ino, 1)
    mirror.commit_lazy()
    assert_gone_everywhere(mirror, attrs.ino)


# -- a real mount of node B -------------------------------------------------------------------

async def _stat_until(path: Path, wanted: object, timeout_s: float = 5.0) -> None:
    """Poll os.stat from a thread (the kernel waits for this process to answer) until the
    mode bits are `wanted`, or `FileNotFoundError` when that is wanted."""
    with trio.fail_after(timeout_s):
        while True:
            try:
                st = await trio.to_thread.run_sync(os.stat, path)
                got: object = stat.S_IMODE(st.st_mode)
            except FileNotFoundError:
                got = FileNotFoundError
            if got == wanted:
                return
            await trio.sleep(0.01)


@pytest.mark.mount
async def test_remote_records_reach_a_mounted_kernel_at_once(
        mirror: Mirror, a: Node, b: Node, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With minute-long cache timeouts, B's kernel still sees A's changes at once."""
    reason = fuse_skip_reason()
    if reason:
        pytest.skip(reason)
    monkeypatch.setattr(fuse_ops, "ENTRY_TIMEOUT_S", 60.0)
    monkeypatch.setattr(fuse_ops, "ATTR_TIMEOUT_S", 60.0)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ino = await make_file(a, b"f")
    pyfuse3.init(fuse_ops.Operations(b.fs), str(mnt), fuse_ops.mount_options([], "test"))
    try:
        async with trio.open_nursery() as nursery:
            with fuse_ops.invalidating(b.fs):
                nursery.start_soon(pyfuse3.main)
                await _stat_until(mnt / "f", 0o644)
                # Changed behind the kernel's back (no hook): the cached attributes stay.
                commit_batch(b.store, [r.SetAttr(ino, 1, mode=0o640)])
                await trio.sleep(0.2)
                await _stat_until(mnt / "f", 0o644)
                await a.fs.setattr(ino, AttrChanges(mode=0o600), None)
                await _stat_until(mnt / "f", 0o600)
                await a.fs.rename(ROOT_INO, b"f", ROOT_INO, b"g", 0)
                await _stat_until(mnt / "f", FileNotFoundError)
                await _stat_until(mnt / "g", 0o600)
                pyfuse3.terminate()
    finally:
        pyfuse3.close(unmount=True)
