"""The thin pyfuse3 `Operations` class: translate arguments, call the file system layer,
translate results. This is the FUSE layer's one error boundary: a domain error becomes its
errno, and anything unexpected becomes EIO and a log line, because an exception escaping a
pyfuse3 handler would kill the daemon.

Kernel caching: entries and attributes are cached for ENTRY_TIMEOUT_S / ATTR_TIMEOUT_S, not
pyfuse3's 300 s default, because other nodes change the namespace and the data; cached pages
are kept across opens only while a file's data is unchanged (close-to-open). Records from
other nodes also invalidate what they changed at once (`KernelInvalidator`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from clusterfs.attributes import Attributes, Caller
from clusterfs.filesystem import AttrChanges, FileSystem, NoInvalidator
from clusterfs.namespace import NamespaceError

log = logging.getLogger(__name__)

ENTRY_TIMEOUT_S = 1.0
ATTR_TIMEOUT_S = 1.0
INVALIDATOR_STOP_TIMEOUT_S = 2.0
DRAIN_TIMEOUT_S = 0.1  # longest wait for the kernel to drop entries before a commit's ack

P = ParamSpec("P")
T = TypeVar("T")
Entry = pyfuse3.EntryAttributes


# Calls that only let go of this node's own state: they work while the node is offline.
_CLEANUP = frozenset({"release", "releasedir"})


def boundary(
    handler: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    cleanup = handler.__name__ in _CLEANUP

    @functools.wraps(handler)
    async def wrapped(*args: P.args, **kwargs: P.kwargs) -> T:
        if not cleanup and cast(Operations, args[0]).fs.offline_reason:
            raise pyfuse3.FUSEError(errno.EIO)  # offline means offline: reads included
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except NamespaceError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapped


def entry(attrs: Attributes) -> Entry:
    out = pyfuse3.EntryAttributes()
    out.st_ino = attrs.ino
    out.generation = 0
    out.entry_timeout = ENTRY_TIMEOUT_S
    out.attr_timeout = ATTR_TIMEOUT_S
    out.st_mode = attrs.mode
    out.st_nlink = attrs.nlink
    out.st_uid = attrs.uid
    out.st_gid = attrs.gid
    out.st_rdev = attrs.rdev
    out.st_size = attrs.size_bytes
    out.st_blksize = 4096
    out.st_blocks = attrs.blocks_512
    out.st_atime_ns = attrs.atime_ns
    out.st_mtime_ns = attrs.mtime_ns
    out.st_ctime_ns = attrs.ctime_ns
    return out


def caller(ctx: Any) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.pid, ctx.umask)


def changes(attr: Any, fields: Any) -> AttrChanges:
    return AttrChanges(
        mode=attr.st_mode if fields.update_mode else None,
        uid=attr.st_uid if fields.update_uid else None,
        gid=attr.st_gid if fields.update_gid else None,
        size_bytes=attr.st_size if fields.update_size else None,
        atime_ns=attr.st_atime_ns if fields.update_atime else None,
        mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
    )


class Operations(pyfuse3.Operations):
    """No `flush`: every write reaches the backing file before it returns (no writeback
    cache), so a close has nothing to flush. pyfuse3's default answers ENOSYS, after which
    the kernel sends no FLUSH on close (it still writes back dirty mmap pages first), one
    request and one wake-up fewer per close."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: FileSystem) -> None:
        super().__init__()
        self.fs = fs

    @boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Entry:
        return entry(self.fs.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for ino, count in inode_list:
                self.fs.forget(ino, count)
        except Exception:  # forget must not raise (pyfuse3)
            log.exception("forget failed")

    @boundary
    async def getattr(self, inode: int, ctx: Any) -> Entry:
        return entry(self.fs.getattr(inode))

    @boundary
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Entry:
        return entry(await self.fs.setattr(inode, changes(attr, fields), fh))

    @boundary
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.fs.readlink(inode)

    @boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Entry:
        return entry(await self.fs.mknod(parent_inode, name, mode, rdev, caller(ctx)))

    @boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Entry:
        return entry(await self.fs.mkdir(parent_inode, name, mode, caller(ctx)))

    @boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.unlink(parent_inode, name)

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.rmdir(parent_inode, name)

    @boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Entry:
        return entry(await self.fs.symlink(parent_inode, name, target, caller(ctx)))

    @boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Entry:
        return entry(await self.fs.link(inode, new_parent_inode, new_name))

    @boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        fh, keep_cache = self.fs.open(inode, flags, caller(ctx))
        if not keep_cache:
            # Data changed since this node last saw it (maybe on another node, which sends
            # no record for data), so the kernel's size and mtime may be stale too: drop
            # them before the first read (close-to-open, like NFS's GETATTR on open).
            _invalidate(inode, None)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    @boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        fh, attrs = await self.fs.create(parent_inode, name, mode, flags, caller(ctx))
        return pyfuse3.FileInfo(fh=fh), entry(attrs)

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.fs.read(fh, off, size)

    @boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @boundary
    async def release(self, fh: int) -> None:
        self.fs.release(fh)

    @boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh, datasync)

    @boundary
    async def opendir(self, inode: int, ctx: Any) -> int:
        return self.fs.opendir(inode)

    @boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for item in self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, item.name, entry(item.attrs), item.next_id):
                return
            if item.counts_lookup:
                self.fs.remember(item.attrs.ino)

    @boundary
    async def releasedir(self, fh: int) -> None:
        return None

    @boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None  # every namespace change is synced when it commits

    @boundary
    async def statfs(self, ctx: Any) -> Any:
        st = self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize, out.f_frsize = st.block_size, st.fragment_size
        out.f_blocks, out.f_bfree, out.f_bavail = st.blocks, st.blocks_free, st.blocks_available
        out.f_files, out.f_ffree, out.f_favail = st.files, st.files_free, st.files_free
        out.f_namemax = st.name_max
        return out

    @boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self.fs.setxattr(inode, name, value)

    @boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return self.fs.getxattr(inode, name)

    @boundary
    async def listxattr(self, inode: int, ctx: Any) -> Sequence[bytes]:
        return self.fs.listxattr(inode)

    @boundary
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.removexattr(inode, name)

    @boundary
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return self.fs.access(inode, mode, caller(ctx))


def mount_options(extra: Sequence[str], fsname: str) -> set[str]:
    options = set(pyfuse3.default_options) | {
        "allow_other", "default_permissions", f"fsname={_escape_option(fsname)}",
        "subtype=clusterfs"}
    options.update(o for o in extra if o)
    return options


def _escape_option(value: str) -> str:
    """libfuse splits options at commas and reads backslash escapes, octal ones included;
    pyfuse3 passes options as ASCII: escape the rest (a block directory's path may hold
    any byte)."""
    return "".join(chr(b) if 0x20 < b < 0x7F and b not in b",\\" else f"\\{b:03o}"
                   for b in os.fsencode(value))


@contextlib.contextmanager
def invalidating(fs: FileSystem) -> Iterator[KernelInvalidator]:
    """Invalidate `fs`'s kernel caches while mounted: wrap `pyfuse3.main()` in this, inside
    `pyfuse3.init()` ... `pyfuse3.close()`."""
    invalidator = KernelInvalidator()
    invalidator.start(fs)
    try:
        yield invalidator
    finally:
        invalidator.stop(fs)


class KernelInvalidator:
    """Drops what the kernel caches about the entries and inodes another node's record changed.

    An inode's attributes are dropped at once, inline: the kernel takes no lock for that
    which a request in flight could hold (only dropping cached pages would, and records never
    change file data: that is close-to-open, see `open`). A directory entry is different:
    the kernel locks the directory first, and a request in flight on it (a create here,
    waiting for its own commit) holds that lock until this process answers it, so from the
    event loop it could deadlock. Entries therefore go to one long-lived thread through a
    queue whose `put` never blocks, in the order the records were applied; `drained` lets
    the caller wait, briefly, until the kernel has dropped everything queued so far.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="clusterfs-invalidate",
                                        daemon=True)
        self._stopping = False
        self._undrained = False  # entries queued since the last `drained`

    def entry(self, parent: int, name: bytes) -> None:
        self._undrained = True
        self._queue.put(functools.partial(_invalidate, parent, name))

    def inode(self, ino: int) -> None:
        _invalidate(ino, None)

    async def drained(self) -> None:
        """Wait until the entries queued so far are dropped, at most DRAIN_TIMEOUT_S (a
        directory locked by a request that waits for a commit would block it longer)."""
        if self._stopping or self._thread.ident is None or not self._undrained:
            return  # nothing queued since the last wait: no thread round trip
        self._undrained = False
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()
        self._queue.put(functools.partial(_wake, token, done))
        with trio.move_on_after(DRAIN_TIMEOUT_S):
            await done.wait()

    def start(self, fs: FileSystem) -> None:
        """Serve `fs` from now on; call after `pyfuse3.init()`."""
        self._thread.start()
        fs.invalidator = self

    def stop(self, fs: FileSystem) -> None:
        """Skip what is still queued and wait (briefly) for the call in progress; call
        after `pyfuse3.main()` returns and before `pyfuse3.close()` frees the session."""
        fs.invalidator = NoInvalidator()
        self._stopping = True
        self._queue.put(None)
        if self._thread.ident is None:
            return  # never started
        self._thread.join(INVALIDATOR_STOP_TIMEOUT_S)
        if self._thread.is_alive():
            log.debug("kernel invalidation still blocked at unmount")

    def _work(self) -> None:
        while (work := self._queue.get()) is not None:
            if not self._stopping:
                work()


def _wake(token: trio.lowlevel.TrioToken, done: trio.Event) -> None:
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(done.set)


def _invalidate(ino: int, name: bytes | None) -> None:
    """Drop `ino`'s attributes, or with `name` the entry `name` in directory `ino`."""
    try:
        if name is None:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        else:
            pyfuse3.invalidate_entry(ino, name)
    except OSError as exc:  # ENOENT: not cached; ENOTCONN, EINVAL: unmounting or unmounted
        log.debug("invalidate %d %r: %s", ino, name, exc)
    except Exception:  # a bug; the thread must go on serving the next records
        log.exception("invalidate %d %r failed", ino, name)
