"""The thin pyfuse3 `Operations` class: translate arguments, call the file system layer,
translate results. This is the FUSE layer's one error boundary: a domain error becomes its
errno, and anything unexpected becomes EIO and a log line, because an exception escaping a
pyfuse3 handler would kill the daemon.

Kernel caching: entries and attributes are cached for ENTRY_TIMEOUT_S / ATTR_TIMEOUT_S, not
pyfuse3's 300 s default, because other nodes change the namespace and the data; cached pages
are kept across opens only while a file's data is unchanged (close-to-open).
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from clusterfs.attributes import Attributes, Caller
from clusterfs.filesystem import AttrChanges, FileSystem
from clusterfs.namespace import NamespaceError

log = logging.getLogger(__name__)

ENTRY_TIMEOUT_S = 1.0
ATTR_TIMEOUT_S = 1.0

P = ParamSpec("P")
T = TypeVar("T")
Entry = pyfuse3.EntryAttributes


def boundary(
    handler: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(handler)
    async def wrapped(*args: P.args, **kwargs: P.kwargs) -> T:
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
    async def flush(self, fh: int) -> None:
        self.fs.flush(fh)

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
        "allow_other", "default_permissions", f"fsname={fsname}", "subtype=clusterfs"}
    options.update(o for o in extra if o)
    return options


