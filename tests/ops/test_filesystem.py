"""The file system layer called directly, against a temporary replica and block directory,
with the real local committer running in a trio nursery."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
import trio

from clusterfs import fsck
from clusterfs import records as r
from clusterfs.attributes import Caller
from clusterfs.committer import commit_batch
from clusterfs.filesystem import AttrChanges
from clusterfs.namespace import ROOT_INO, NamespaceError
from clusterfs.node import recover
from tests.ops.conftest import Rig

ROOT = Caller(0, 0, os.getpid())
USER = Caller(1000, 1000, os.getpid())




async def test_create_write_read_through_backing_file(rig: Rig) -> None:
    fh, attrs = await rig.fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, ROOT)
    assert stat.S_ISREG(attrs.mode) and attrs.size_bytes == 0
    assert await rig.fs.write(fh, 0, b"hello") == 5
    assert rig.fs.read(fh, 0, 100) == b"hello"
    assert rig.fs.getattr(attrs.ino).size_bytes == 5
    with open(rig.blockdir.path(attrs.ino), "rb") as backing:
        assert backing.read() == b"hello"
    rig.fs.release(fh)


@pytest.mark.allow_error_logs
async def test_an_unlinked_inode_purged_elsewhere_is_stale_and_a_linked_one_is_damage(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """The kernel here still remembers an inode that another node has unlinked and purged
    (removed its backing file) before this replica applied the Purge: ESTALE, no error
    logged. A linked inode without its backing file is damage: EIO and an error line."""
    fh, gone = await rig.fs.create(ROOT_INO, b"gone", 0o644, os.O_RDWR, ROOT)
    rig.fs.release(fh)
    fh, kept = await rig.fs.create(ROOT_INO, b"kept", 0o644, os.O_RDWR, ROOT)
    rig.fs.release(fh)
    await rig.fs.unlink(ROOT_INO, b"gone")  # the kernel still holds its lookup: no purge
    for ino in (gone.ino, kept.ino):
        os.unlink(rig.blockdir.path(ino))
    with pytest.raises(NamespaceError) as stale:
        rig.fs.getattr(gone.ino)
    assert stale.value.errno == errno.ESTALE
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"]
    with pytest.raises(NamespaceError) as damaged:
        rig.fs.getattr(kept.ino)
    assert damaged.value.errno == errno.EIO
    assert any("backing file of inode" in rec.getMessage() for rec in caplog.records
               if rec.levelname == "ERROR")


async def test_unlinked_open_file_lives_until_forget_and_release(rig: Rig) -> None:
    fh, attrs = await rig.fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, ROOT)
    await rig.fs.write(fh, 0, b"data")
    await rig.fs.unlink(ROOT_INO, b"f")
    assert rig.fs.read(fh, 0, 4) == b"data"
    rig.fs.forget(attrs.ino, 1)
    rig.fs.committer.commit_queued()  # type: ignore[union-attr]
    assert attrs.ino in rig.backing_files(), "purged while still open"
    rig.fs.release(fh)
    rig.fs.committer.commit_queued()  # type: ignore[union-attr]
    rig.fs.remove_purged_now()
    assert attrs.ino not in rig.backing_files()
    with pytest.raises(NamespaceError):
        rig.fs.getattr(attrs.ino)


async def test_lazy_purge_commits_on_its_own(rig: Rig) -> None:
    attrs = await rig.fs.mknod(ROOT_INO, b"f", stat.S_IFREG | 0o644, 0, ROOT)
    await rig.fs.unlink(ROOT_INO, b"f")
    rig.fs.forget(attrs.ino, 1)
    with trio.fail_after(5):
        while attrs.ino in rig.backing_files():
            await trio.sleep(0.05)


async def test_errors_are_namespace_errors(rig: Rig) -> None:
    await rig.fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    with pytest.raises(NamespaceError) as info:
        await rig.fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    assert info.value.errno == errno.EEXIST
    with pytest.raises(NamespaceError) as info:
        rig.fs.lookup(ROOT_INO, b"missing")
    assert info.value.errno == errno.ENOENT


async def test_setgid_directory_passes_on_its_group(rig: Rig) -> None:
    d = await rig.fs.mkdir(ROOT_INO, b"shared", 0o2775, ROOT)
    await rig.fs.setattr(d.ino, AttrChanges(gid=4242), None)
    sub = await rig.fs.mkdir(d.ino, b"sub", 0o755, USER)
    assert sub.gid == 4242 and sub.mode & stat.S_ISGID
    _, f = await rig.fs.create(d.ino, b"f", 0o2755, os.O_RDWR, USER)
    assert f.gid == 4242 and not f.mode & stat.S_ISGID  # USER is not in group 4242


async def test_truncate_and_times_go_to_the_backing_file(rig: Rig) -> None:
    fh, attrs = await rig.fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, ROOT)
    await rig.fs.write(fh, 0, b"x" * 100)
    changed = await rig.fs.setattr(attrs.ino, AttrChanges(size_bytes=10, mtime_ns=5 * 10**9),
                                   fh)
    assert changed.size_bytes == 10 and changed.mtime_ns == 5 * 10**9
    assert os.stat(rig.blockdir.path(attrs.ino)).st_size == 10
    rig.fs.release(fh)


async def test_readdir_lists_everything_with_dot_entries(rig: Rig) -> None:
    for i in range(300):
        await rig.fs.mknod(ROOT_INO, f"n{i}".encode(), stat.S_IFIFO | 0o644, 0, ROOT)
    entries = list(rig.fs.readdir(ROOT_INO, 0))
    names = [e.name for e in entries]
    assert names[:2] == [b".", b".."] and len(names) == 302
    resumed = list(rig.fs.readdir(ROOT_INO, entries[150].next_id))
    assert [e.name for e in resumed] == names[151:]


async def test_open_keeps_cache_only_for_unchanged_data(rig: Rig) -> None:
    fh, attrs = await rig.fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, ROOT)
    await rig.fs.write(fh, 0, b"one")
    rig.fs.release(fh)
    fh, keep = rig.fs.open(attrs.ino, os.O_RDONLY, ROOT)
    assert keep
    rig.fs.release(fh)
    with open(rig.blockdir.path(attrs.ino), "ab") as other_node:
        other_node.write(b"more")
    fh, keep = rig.fs.open(attrs.ino, os.O_RDONLY, ROOT)
    assert not keep
    rig.fs.release(fh)


async def test_settle_repairs_the_block_directory(rig: Rig) -> None:
    """What a crash leaves between commits and the block directory, repaired once the node
    serves: a backing file not made, one not removed, an orphan not purged."""
    outcomes = commit_batch(rig.store, [
        r.MakeNode(ROOT_INO, b"kept", stat.S_IFREG | 0o644, 0, 0, 0, 1),
        r.MakeNode(ROOT_INO, b"lost", stat.S_IFREG | 0o644, 0, 0, 0, 2),
        r.Unlink(ROOT_INO, b"lost", 3),
        r.MakeNode(ROOT_INO, b"gone", stat.S_IFREG | 0o644, 0, 0, 0, 4),
        r.Unlink(ROOT_INO, b"gone", 5),
        r.MakeDir(ROOT_INO, b"dir", 0o755, 0, 0, 6),
    ])
    kept, lost, gone, directory = (outcomes[i].ino for i in (0, 1, 3, 5))  # type: ignore[union-attr]
    commit_batch(rig.store, [r.Purge(gone)])
    rig.blockdir.create_empty(lost)
    rig.blockdir.create_empty(gone)  # a backing file whose inode was purged before a crash
    rig.blockdir.create_empty(directory)  # a spare nobody removed
    rig.blockdir.create_empty(directory + 1)  # a spare for the next inode: not an orphan
    report = fsck.check(rig.store, rig.blockdir)
    assert report.missing_backing == [kept]
    assert report.orphan_backing == [gone, directory]
    assert report.unpurged_inodes == [lost]
    recover(rig.store, rig.blockdir)  # before serving: nothing yet
    assert fsck.check(rig.store, rig.blockdir) == report
    await rig.fs.settle()
    rig.fs.committer.commit_queued()  # type: ignore[union-attr]
    rig.fs.remove_purged_now()
    assert fsck.check(rig.store, rig.blockdir).clean
    assert rig.backing_files() == {kept, directory + 1}


async def test_create_without_backing_file_leaves_no_entry(rig: Rig) -> None:
    with rig.store.read() as view:
        next_ino = view.get_counter(b"next_ino")
    fan = Path(rig.blockdir.path(next_ino)).parent
    shutil.rmtree(fan)
    fan.write_bytes(b"")  # the block directory cannot take the new backing file
    with pytest.raises(OSError) as info:
        await rig.fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, ROOT)
    assert info.value.errno == errno.ENOTDIR
    with pytest.raises(NamespaceError):
        rig.fs.lookup(ROOT_INO, b"f")


async def test_new_file_has_the_create_time_even_on_an_unadopted_spare(rig: Rig) -> None:
    """The spares task may have made the next backing file without adopting it yet; the new
    file still carries the time of its create, not the spare's."""
    with rig.store.read() as view:
        next_ino = view.get_counter(b"next_ino")
    rig.blockdir.create_empty(next_ino)
    os.utime(rig.blockdir.path(next_ino), ns=(1_000_000_000, 1_000_000_000))
    before_ns = time.time_ns()
    fh, attrs = await rig.fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, ROOT)
    rig.fs.release(fh)
    assert attrs.ino == next_ino
    got = rig.fs.getattr(attrs.ino)
    assert before_ns <= got.atime_ns and before_ns <= got.mtime_ns
