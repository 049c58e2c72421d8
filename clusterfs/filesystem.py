"""The file system layer under the FUSE handlers: reads from the replica, changes as records.

Reads (lookup, getattr, readdir, xattrs) come straight from the local replica. Every change
is captured as a namespace record and handed to the committer; the call returns when the record
is durable. File data never passes through here as records: open handles read and write the
backing file in the common block directory directly.

Node-local state lives here too: kernel lookup counts and open handles. An inode whose last
name was removed stays (as an orphan in the replica, with its backing file) until the kernel
here has forgotten it and the last handle in the cluster is closed; then a lazy `Purge` record
deletes it. Every open backing fd holds a shared OFD lock, so any node can tell whether
another node still has the file open (see `blockdir`).

Records are applied on every node, whichever node captured them (`on_applied`). Only the
capturing node opens a new backing file or removes a purged one; every node drops what its
kernel caches about the entries and inodes that another node's record changed.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import itertools
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import trio

from clusterfs import fsck
from clusterfs import records as r
from clusterfs.attributes import Attributes, Caller, from_inode, may_access
from clusterfs.blockdir import BlockDir, hold_shared
from clusterfs.committer import Committer
from clusterfs.namespace import NAME_MAX_BYTES, ROOT_INO, Applied, NamespaceError
from clusterfs.spares import Spares
from clusterfs.store import Inode, Store

log = logging.getLogger(__name__)

READDIR_CHUNK = 128
_BACKING_OPEN_FLAGS = os.O_APPEND | os.O_SYNC | os.O_DSYNC


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: bytes
    attrs: Attributes
    next_id: int
    counts_lookup: bool  # False for "." and "..", whose lookup count the kernel does not hold


@dataclass(frozen=True, slots=True)
class AttrChanges:
    """The attributes a setattr call changes; None leaves one as it is."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size_bytes: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


@dataclass(slots=True)
class OpenFile:
    ino: int
    fd: int
    drops_setgid: bool = False  # the first write clears S_ISGID (see `_drops_setgid`)


@dataclass(frozen=True, slots=True)
class StatFs:
    block_size: int
    fragment_size: int
    blocks: int
    blocks_free: int
    blocks_available: int
    files: int
    files_free: int
    name_max: int


_CREATING = (r.MakeNode, r.MakeDir, r.MakeSymlink, r.Link)


class Invalidator(Protocol):
    """Drops what the kernel caches (see `fuse_ops.KernelInvalidator`); `entry` and `inode`
    never block or raise, since they run on the event loop while requests are in flight."""

    def entry(self, parent: int, name: bytes) -> None: ...

    def inode(self, ino: int) -> None: ...

    async def drained(self) -> None: ...


class NoInvalidator:
    """Not mounted: no kernel holds anything to invalidate."""

    def entry(self, parent: int, name: bytes) -> None:
        pass

    def inode(self, ino: int) -> None:
        pass

    async def drained(self) -> None:
        pass


def _errno(code: int) -> NamespaceError:
    return NamespaceError(code)


XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")


def check_xattr_name(name: bytes) -> None:
    """Only the namespaces ext4 stores; system.* (POSIX ACLs) is not supported."""
    if not name.startswith(XATTR_NAMESPACES):
        raise _errno(errno.EOPNOTSUPP)


def supplementary_groups(pid: int) -> frozenset[int]:
    """The calling process's groups, read from /proc (empty if it has already gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return frozenset()


DataVersion = tuple[int, int]  # (mtime_ns, size) of a backing file


def _data_version(st: os.stat_result) -> DataVersion:
    """What tells one version of a file's data from another (as well as timestamps with
    the block directory's clock granularity can: see docs/clusterfs.md, Coherence)."""
    return st.st_mtime_ns, st.st_size


def _held(fd: int) -> int:
    """`fd`, marked as open for the whole cluster; closed again if that fails."""
    try:
        hold_shared(fd)
    except OSError:
        os.close(fd)
        raise
    return fd


def _drops_setgid(inode: Inode, flags: int, caller: Caller) -> bool:
    """ext4 (Linux >= 6.2) clears S_ISGID without group execute when a process outside the
    file's group writes; FUSE's kernel side only handles S_ISUID and S_ISGID|S_IXGRP, so the
    file system does this case itself, for the credentials the file was opened with."""
    if caller.is_root or not flags & os.O_ACCMODE:
        return False
    if inode.mode & (stat.S_ISGID | stat.S_IXGRP) != stat.S_ISGID:
        return False
    return inode.gid != caller.gid and inode.gid not in supplementary_groups(caller.pid)


class FileSystem:
    def __init__(self, store: Store, blockdir: BlockDir,
                 committer: Committer | None = None) -> None:
        self._store = store
        self._blockdir = blockdir
        self.committer: Committer | None = committer
        # Set while this node is offline (cut off from the majority, removed): every call
        # but a release answers EIO (see fuse_ops.boundary).
        self.offline_reason = ""
        self.invalidator: Invalidator = NoInvalidator()  # the mount sets a real one
        self._lookups: Counter[int] = Counter()
        self._open_count: Counter[int] = Counter()
        self._handles: dict[int, OpenFile] = {}
        self._next_fh = itertools.count(1)
        self._fresh_fds: dict[int, int] = {}
        self.spares = Spares(store, blockdir)
        # ino -> the data version the kernel here may cache pages of (see `open`)
        self._seen_data: dict[int, DataVersion] = {}
        self._doomed: list[int] = []  # purged inodes whose backing files are still there
        self._doomed_added = trio.Event()
        self._changes_in_flight = 0  # this node's calls waiting for their commit

    # -- reads ------------------------------------------------------------------------------
    def _inode(self, ino: int) -> Inode:
        with self._store.read() as view:
            inode = view.get_inode(ino)
        if inode is None:
            raise _errno(errno.ENOENT)
        return inode

    def _attrs(self, inode: Inode) -> Attributes:
        if not stat.S_ISREG(inode.mode):
            return from_inode(inode, None)
        try:
            return from_inode(inode, self._blockdir.stat(inode.ino))
        except FileNotFoundError:
            if inode.nlink == 0:
                # Unlinked, and purged by another node, whose Purge is not applied here
                # yet; the kernel here still remembers the inode. It is gone: ESTALE makes
                # the kernel look the name up again (and find nothing).
                log.debug("inode %d was purged elsewhere", inode.ino)
                raise _errno(errno.ESTALE) from None
            log.error("backing file of inode %d is missing (run clusterfs fsck)", inode.ino)
            raise _errno(errno.EIO) from None

    def getattr(self, ino: int) -> Attributes:
        return self._attrs(self._inode(ino))

    def lookup(self, parent: int, name: bytes) -> Attributes:
        """`find`, for the kernel: it now holds one more lookup reference to the inode."""
        attrs = self.find(parent, name)
        self.remember(attrs.ino)
        return attrs

    def find(self, parent: int, name: bytes) -> Attributes:
        """The attributes of `name` in directory `parent` (also "." and "..")."""
        if len(name) > NAME_MAX_BYTES:
            raise _errno(errno.ENAMETOOLONG)
        with self._store.read() as view:
            if name == b".":
                inode = view.get_inode(parent)
            elif name == b"..":
                dir_inode = view.get_inode(parent)
                inode = None if dir_inode is None else view.get_inode(dir_inode.parent)
            else:
                entry = view.lookup(parent, name)
                inode = None if entry is None else view.get_inode(entry.ino)
        if inode is None:
            raise _errno(errno.ENOENT)
        return self._attrs(inode)

    def remember(self, ino: int, count: int = 1) -> None:
        """The kernel now holds `count` more lookup references to `ino`."""
        self._lookups[ino] += count

    def forget(self, ino: int, count: int) -> None:
        left = self._lookups[ino] - count
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        self._maybe_purge(ino)

    def readlink(self, ino: int) -> bytes:
        with self._store.read() as view:
            target = view.get_symlink(ino)
        if target is None:
            raise _errno(errno.EINVAL)  # not a symlink
        return target

    def opendir(self, ino: int) -> int:
        if not stat.S_ISDIR(self._inode(ino).mode):
            raise _errno(errno.ENOTDIR)
        return ino

    def readdir(self, ino: int, start_id: int) -> Iterator[DirEntry]:
        """Entries after `start_id` (0, or a `next_id` handed out before), lazily."""
        directory = self._inode(ino)
        if start_id < 1:
            yield DirEntry(b".", self._attrs(directory), 1, False)
        if start_id < 2:
            yield DirEntry(b"..", self.getattr(directory.parent), 2, False)
        after = max(start_id, 2)
        while True:
            with self._store.read() as view:
                chunk = view.list_dir(ino, after, READDIR_CHUNK)
                inodes = [view.get_inode(entry.ino) for entry in chunk]
            for entry, inode in zip(chunk, inodes, strict=True):
                if inode is not None:
                    yield DirEntry(entry.name, self._attrs(inode), entry.cookie, True)
            if len(chunk) < READDIR_CHUNK:
                return
            after = chunk[-1].cookie

    def getxattr(self, ino: int, name: bytes) -> bytes:
        check_xattr_name(name)
        with self._store.read() as view:
            if view.get_inode(ino) is None:
                raise _errno(errno.ENOENT)
            value = view.get_xattr(ino, name)
        if value is None:
            raise _errno(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        with self._store.read() as view:
            if view.get_inode(ino) is None:
                raise _errno(errno.ENOENT)
            return view.list_xattrs(ino)

    def disk_state(self, ino: int) -> bytes:
        """The shared-disk state of regular file `ino` in this replica (b"" if none)."""
        with self._store.read() as view:
            if view.get_inode(ino) is None:
                raise _errno(errno.ENOENT)
            return view.get_disk_state(ino)

    def access(self, ino: int, mode: int, caller: Caller) -> bool:
        attrs = self.getattr(ino)
        return may_access(attrs, caller, supplementary_groups(caller.pid), mode)

    def statfs(self) -> StatFs:
        st = self._blockdir.statvfs()
        return StatFs(st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail,
                      st.f_files, st.f_ffree, 255)

    # -- namespace changes ------------------------------------------------------------------
    async def _commit(self, record: r.Record) -> Applied:
        assert self.committer is not None, "file system has no committer"
        self._changes_in_flight += 1
        try:
            return await self.committer.submit(record)
        finally:
            self._changes_in_flight -= 1

    def _new_owner(self, parent: int, mode: int, caller: Caller, is_dir: bool) -> tuple[int, int]:
        """Mode and group of a new inode: setgid directories pass on their group (as ext4)."""
        directory = self._inode(parent)
        if not directory.mode & stat.S_ISGID:
            return mode, caller.gid
        gid = directory.gid
        if is_dir:
            mode |= stat.S_ISGID
        elif mode & stat.S_ISGID and not caller.is_root and gid != caller.gid \
                and gid not in supplementary_groups(caller.pid):
            mode &= ~stat.S_ISGID
        return mode, gid

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
                    caller: Caller) -> Attributes:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        mode, gid = self._new_owner(parent, mode, caller, is_dir=False)
        applied = await self._commit(
            r.MakeNode(parent, name, mode, caller.uid, gid, rdev, time.time_ns()))
        if stat.S_ISREG(mode):
            os.close(await self._new_backing(applied.ino, parent, name))
        return self._created(applied.ino)

    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     caller: Caller) -> tuple[int, Attributes]:
        mode, gid = self._new_owner(parent, stat.S_IFREG | stat.S_IMODE(mode), caller, False)
        applied = await self._commit(
            r.MakeNode(parent, name, mode, caller.uid, gid, 0, time.time_ns()))
        fd = await self._new_backing(applied.ino, parent, name)
        self._set_backing_flags(fd, flags)
        attrs = self._created(applied.ino)
        self._seen_data[applied.ino] = _data_version(os.fstat(fd))
        return self._new_handle(applied.ino, fd), attrs

    async def _new_backing(self, ino: int, parent: int, name: bytes) -> int:
        """The fd of a new regular file's backing file (made when the record was applied).
        If it cannot be made (a full or failing block directory), the new name is removed
        again and the call fails with that errno: no entry without its data."""
        fd = self._fresh_fds.pop(ino, None)
        if fd is not None:
            return fd
        try:
            return self._take_backing(ino, time.time_ns())
        except OSError as exc:
            log.warning("cannot create the backing file of inode %d: %s", ino, exc)
            await self._commit(r.Unlink(parent, name, time.time_ns()))
            raise

    def _take_backing(self, ino: int, now_ns: int) -> int:
        return _held(self.spares.take(ino, now_ns))

    async def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attributes:
        mode, gid = self._new_owner(parent, stat.S_IMODE(mode), caller, is_dir=True)
        applied = await self._commit(
            r.MakeDir(parent, name, mode, caller.uid, gid, time.time_ns()))
        return self._created(applied.ino)

    async def symlink(self, parent: int, name: bytes, target: bytes,
                      caller: Caller) -> Attributes:
        _, gid = self._new_owner(parent, 0, caller, is_dir=False)
        applied = await self._commit(
            r.MakeSymlink(parent, name, target, caller.uid, gid, time.time_ns()))
        return self._created(applied.ino)

    async def link(self, ino: int, parent: int, name: bytes) -> Attributes:
        await self._commit(r.Link(ino, parent, name, time.time_ns()))
        return self._created(ino)

    def _created(self, ino: int) -> Attributes:
        attrs = self.getattr(ino)
        self.remember(ino)
        return attrs

    async def unlink(self, parent: int, name: bytes) -> None:
        await self._commit(r.Unlink(parent, name, time.time_ns()))

    async def rmdir(self, parent: int, name: bytes) -> None:
        await self._commit(r.RemoveDir(parent, name, time.time_ns()))

    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes,
                     flags: int) -> None:
        await self._commit(
            r.Rename(parent_old, name_old, parent_new, name_new, flags, time.time_ns()))

    async def setattr(self, ino: int, changes: AttrChanges, fh: int | None) -> Attributes:
        inode = self._inode(ino)
        regular = stat.S_ISREG(inode.mode)
        if regular:
            self._set_data_attrs(ino, changes, fh)
        record = r.SetAttr(ino, time.time_ns(), changes.mode, changes.uid, changes.gid,
                           None if regular else changes.size_bytes,
                           None if regular else changes.atime_ns,
                           None if regular else changes.mtime_ns)
        if not regular or any(v is not None for v in (changes.mode, changes.uid, changes.gid)):
            await self._commit(record)
        return self.getattr(ino)

    def _set_data_attrs(self, ino: int, changes: AttrChanges, fh: int | None) -> None:
        """Size and times of a regular file live in its backing file."""
        path = self._blockdir.path(ino)
        if changes.size_bytes is not None:
            handle = self._handles.get(fh) if fh is not None else None
            backing = path if handle is None else handle.fd
            with self._changing_data(ino, backing):
                os.truncate(backing, changes.size_bytes)
        if changes.atime_ns is not None or changes.mtime_ns is not None:
            current = os.stat(path)
            atime = current.st_atime_ns if changes.atime_ns is None else changes.atime_ns
            mtime = current.st_mtime_ns if changes.mtime_ns is None else changes.mtime_ns
            with self._changing_data(ino, path):
                os.utime(path, ns=(atime, mtime))

    async def set_disk_state(self, ino: int, expected: bytes, state: bytes) -> None:
        """Replace the shared-disk state of `ino` on every member if it is still `expected`;
        EAGAIN if another change came first."""
        await self._commit(r.SetDiskState(ino, expected, state))

    def backing_path(self, ino: int) -> str:
        """Where the data of regular file `ino` lives in the block directory."""
        return self._blockdir.path(ino)

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        check_xattr_name(name)
        await self._commit(r.SetXattr(ino, name, value, 0, time.time_ns()))

    async def removexattr(self, ino: int, name: bytes) -> None:
        await self._commit(r.RemoveXattr(ino, name, time.time_ns()))

    # -- data -------------------------------------------------------------------------------
    def open(self, ino: int, flags: int, caller: Caller) -> tuple[int, bool]:
        """Open `ino`'s backing file; also says whether the kernel may keep cached pages:
        only if the data is unchanged since the version this node last saw (close-to-open).

        The version seen is taken here and carried through this node's own writes and
        truncates, never at release: the kernel sends RELEASE after close(2) has returned,
        so by then another node may have written data that the kernel here never read."""
        inode = self._inode(ino)
        if not stat.S_ISREG(inode.mode):
            raise _errno(errno.EISDIR if stat.S_ISDIR(inode.mode) else errno.ENXIO)
        fd = _held(self._blockdir.open(ino, os.O_RDWR | (flags & _BACKING_OPEN_FLAGS)))
        if flags & os.O_TRUNC:  # the kernel passes O_TRUNC through (atomic_o_trunc)
            os.ftruncate(fd, 0)
        version = _data_version(os.fstat(fd))
        keep_cache = self._seen_data.get(ino) == version
        self._seen_data[ino] = version
        fh = self._new_handle(ino, fd)
        self._handles[fh].drops_setgid = _drops_setgid(inode, flags, caller)
        return fh, keep_cache

    def _set_backing_flags(self, fd: int, flags: int) -> None:
        if flags & os.O_APPEND:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)

    def _new_handle(self, ino: int, fd: int) -> int:
        fh = next(self._next_fh)
        self._handles[fh] = OpenFile(ino, fd)
        self._open_count[ino] += 1
        return fh

    def _handle(self, fh: int) -> OpenFile:
        try:
            return self._handles[fh]
        except KeyError:
            raise _errno(errno.EBADF) from None

    def handle_file(self, fh: int) -> tuple[int, int]:
        """The inode and backing file descriptor of handle `fh` (for a tunnel service)."""
        handle = self._handle(fh)
        return handle.ino, handle.fd

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self._handle(fh).fd, size, offset)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handle(fh)
        if handle.drops_setgid:
            handle.drops_setgid = False
            await self._drop_setgid(handle.ino)
        with self._changing_data(handle.ino, handle.fd):
            return os.pwrite(handle.fd, data, offset)

    @contextmanager
    def _changing_data(self, ino: int, backing: int | str) -> Iterator[None]:
        """Carry the version seen through a change of the data made here (the kernel here
        has it), unless the data had changed elsewhere first: then it is unknown."""
        was_seen = self._seen_data.pop(ino, None) == _data_version(os.stat(backing))
        yield
        if was_seen:
            self._seen_data[ino] = _data_version(os.stat(backing))
        else:
            self._seen_data.pop(ino, None)

    async def _drop_setgid(self, ino: int) -> None:
        mode = self._inode(ino).mode
        if mode & stat.S_ISGID:
            await self._commit(r.SetAttr(ino, time.time_ns(), mode=mode & ~stat.S_ISGID))

    async def fsync(self, fh: int, datasync: bool) -> None:
        sync = os.fdatasync if datasync else os.fsync
        await trio.to_thread.run_sync(sync, self._handle(fh).fd)

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        os.close(handle.fd)
        self._open_count[handle.ino] -= 1
        if self._open_count[handle.ino] <= 0:
            del self._open_count[handle.ino]
            self._maybe_purge(handle.ino)

    # -- housekeeping -----------------------------------------------------------------------
    def _maybe_purge(self, ino: int) -> None:
        """Delete an unlinked inode once nothing needs it (lazily: nobody waits for it)."""
        if self._purgeable(ino):
            assert self.committer is not None
            self.committer.submit_lazy(r.Purge(ino))

    def _purgeable(self, ino: int) -> bool:
        """True for an unlinked inode that the kernel here has forgotten, with no handle open
        here and its backing file open on no node (that node calls `_maybe_purge` again
        when it closes its last handle)."""
        if self._lookups.get(ino) or self._open_count.get(ino) or ino in self._fresh_fds \
                or ino == ROOT_INO:
            return False
        self._seen_data.pop(ino, None)
        with self._store.read() as view:
            inode = view.get_inode(ino)
        if inode is None or inode.nlink != 0 or self.committer is None:
            return False
        return not (stat.S_ISREG(inode.mode) and self._open_elsewhere(ino))

    def _open_elsewhere(self, ino: int) -> bool:
        try:
            return self._blockdir.is_held_elsewhere(ino)
        except OSError as exc:  # keep the inode: `settle` tries again at the next start
            log.warning("cannot tell whether inode %d is open elsewhere: %s", ino, exc)
            return True

    def on_applied(self, record: r.Record, applied: Applied, local: bool) -> None:
        """Side effects of a committed record on this node (runs right after the apply, in
        sequence order, before any waiting call resumes); `local`: this node captured it."""
        try:
            self._apply_to_blockdir(record, applied, local)
        except OSError as exc:  # the waiting call sees it too (see `_new_backing`)
            log.warning("block directory: %s", exc)
        for inode in applied.purged:
            self._seen_data.pop(inode.ino, None)
        if not local:
            self._drop_kernel_caches(record, applied)
        for ino in applied.orphaned:
            # The unlinking node purges; a node with the file open purges at its last
            # release instead (one Purge record per unlink, not one per node).
            if local or self._open_count.get(ino):
                self._maybe_purge(ino)

    def _apply_to_blockdir(self, record: r.Record, applied: Applied, local: bool) -> None:
        if isinstance(record, r.MakeNode | r.MakeDir | r.MakeSymlink):
            self._settle_spare(record, applied.ino, local)
        if local:  # the purging node removes the files; the others would only race it
            self._doom([inode.ino for inode in applied.purged if stat.S_ISREG(inode.mode)])

    def _settle_spare(self, record: r.MakeNode | r.MakeDir | r.MakeSymlink, ino: int,
                      local: bool) -> None:
        """The spare made ahead for a new inode's number becomes its backing file (opened by
        the capturing node only: its call is waiting for the fd) or goes. Every node removes
        it, whether or not it counts it as its spare: one made before a crash is counted by
        no node, and a file at the number of an inode without data is never right."""
        if isinstance(record, r.MakeNode) and stat.S_ISREG(record.mode):
            if local:
                self._fresh_fds[ino] = self._take_backing(ino, record.now_ns)
            else:
                self.spares.claimed(ino)
        else:
            self.spares.discard(ino)
            self._doom([ino])

    def _doom(self, inos: list[int]) -> None:
        if inos:
            self._doomed.extend(inos)
            self._doomed_added.set()

    async def caches_dropped(self) -> None:
        """Wait (briefly) until the kernel here has dropped what the records applied so far
        changed; a member awaits this before it acknowledges a batch, so that another
        node's call returns only once its change is visible here too (DESIGN.md rule 6).
        Not while a call of this node waits for a commit: the kernel may hold a directory
        lock for it that the invalidation needs, and the commit needs this acknowledgement
        (the entries are dropped right after it, instead of right before)."""
        if not self._changes_in_flight:
            await self.invalidator.drained()

    def _drop_kernel_caches(self, record: r.Record, applied: Applied) -> None:
        """Another node changed these (DESIGN.md rule 6): the kernel must ask again, and the
        next open must drop cached pages (close-to-open). A name that a record creates was
        not cached here (lookups never answer with cached negative entries), so only the
        parent's attributes change for those."""
        if not isinstance(record, _CREATING):
            for parent, name in dict.fromkeys(applied.changed_entries):
                self.invalidator.entry(parent, name)
        for ino in dict.fromkeys(applied.changed_inodes):
            self._seen_data.pop(ino, None)
            self.invalidator.inode(ino)

    async def remove_purged(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        """Block directory housekeeping while this node serves: `settle` before the node
        reports ready, then remove the backing files of purged inodes, off the path of the
        replies."""
        await self.settle()
        task_status.started()
        try:
            while True:
                await self._doomed_added.wait()
                self._doomed_added = trio.Event()
                self.remove_purged_now()
        finally:
            self.remove_purged_now()

    async def settle(self) -> None:
        """Once the committer serves (the replica has caught up with the cluster): repair
        what a crash, here or on another node, left between a commit and the block
        directory, and purge the orphans no node holds open. Not before: a lagging replica
        would take files made or purged since for damage, and only the committer may change
        the replica."""
        try:
            report = await trio.to_thread.run_sync(fsck.check_live, self._store, self._blockdir)
            for line in dataclasses.replace(report, unpurged_inodes=[]).lines():
                log.warning("settle: %s", line)
            for ino in report.unpurged_inodes:  # usual: purges are lazy, and nodes come and go
                log.info("settle: inode %d: unlinked and not open anywhere; purging it", ino)
            for ino in report.missing_backing:
                self._blockdir.create_empty(ino)
        except OSError as exc:
            log.warning("cannot settle the block directory: %s", exc)
            return
        self._doom(report.orphan_backing)
        for ino in report.unpurged_inodes:
            await self._purge_now(ino)

    async def _purge_now(self, ino: int) -> None:
        if not self._purgeable(ino):
            return
        try:
            await self._commit(r.Purge(ino))
        except NamespaceError as exc:  # the committer failed; the next start tries again
            log.warning("cannot purge inode %d: %s", ino, exc)

    def remove_purged_now(self) -> None:
        doomed, self._doomed = self._doomed, []
        for ino in doomed:
            try:
                self._blockdir.remove(ino)
            except OSError as exc:
                log.error("cannot remove backing file of inode %d: %s (run clusterfs fsck)",
                          ino, exc)

    def close_all(self) -> None:
        for fh in list(self._handles):
            self.release(fh)
        for fd in self._fresh_fds.values():
            os.close(fd)
        self._fresh_fds.clear()
