#!/usr/bin/env python3
"""A plain pyfuse3 pass-through file system: the yardstick for tools/bench_fs.py.

Usage: python tools/passthrough.py SOURCE MOUNTPOINT [--entry-timeout-s 1] [--attr-timeout-s 1]

Theory of operation (after pyfuse3's examples/passthroughfs.py): the kernel
names files by inode number, the source directory by path, so the file system
keeps an inode -> paths map, filled by every reply that gives the kernel an
inode (lookup, create, mkdir, readdirplus, ...) and emptied by `forget`. The
FUSE inode number is the source file's own inode number, except that the
source root and the FUSE root (1) swap numbers. File handles are the file
descriptors of the source files. Every handler calls os.* inline: cheap
syscalls are much faster inline than through trio.to_thread (DESIGN.md s. 7).

It runs in the foreground with allow_other and default_permissions (as
clusterfs does) and exits cleanly on umount, SIGTERM and SIGINT. It serves one
source file system: mount points inside SOURCE are not crossed safely.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import os
import signal
import stat
import sys
from collections.abc import Iterator, Sequence

import pyfuse3
import trio
from pyfuse3 import (
    EntryAttributes,
    FileInfo,
    FUSEError,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
)

log = logging.getLogger("passthrough")

ROOT_INODE: int = pyfuse3.ROOT_INODE
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def _fuse_error(exc: OSError) -> FUSEError:
    return FUSEError(exc.errno or errno.EIO)


def _renameat2(old: bytes, new: bytes, flags: int) -> None:
    """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE, which os.rename lacks."""
    if _libc.renameat2(_AT_FDCWD, old, _AT_FDCWD, new, ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Passthrough(pyfuse3.Operations):
    """Mirror SOURCE; every handler is a thin wrapper around one or two syscalls."""

    def __init__(self, source: str, entry_timeout_s: float, attr_timeout_s: float) -> None:
        super().__init__()
        self._source = os.fsencode(os.path.abspath(source))
        self._root_ino = os.lstat(self._source).st_ino
        self._entry_timeout_s = entry_timeout_s
        self._attr_timeout_s = attr_timeout_s
        self._paths: dict[int, set[bytes]] = {ROOT_INODE: {self._source}}
        self._lookups: dict[int, int] = {ROOT_INODE: 1}
        self._fd_inode: dict[int, int] = {}
        self._inode_fds: dict[int, set[int]] = {}
        self._dirs: dict[int, list[bytes]] = {}
        self._dir_paths: dict[int, bytes] = {}
        self._next_dir_fh = 1

    # ----- inode <-> path bookkeeping -------------------------------------------------

    def _fuse_ino(self, source_ino: int) -> int:
        if source_ino == self._root_ino:
            return ROOT_INODE
        if source_ino == ROOT_INODE:
            return self._root_ino
        return source_ino

    def _path(self, inode: int) -> bytes:
        paths = self._paths.get(inode)
        if not paths:
            raise FUSEError(errno.ENOENT)
        return next(iter(paths))

    def _child(self, parent_inode: int, name: bytes) -> bytes:
        return self._path(parent_inode) + b"/" + name

    def _remember(self, inode: int, path: bytes) -> None:
        """Count one kernel lookup of *inode*, reachable at *path*."""
        self._lookups[inode] = self._lookups.get(inode, 0) + 1
        paths = self._paths.get(inode)
        if paths is None:
            self._paths[inode] = {path}
        else:
            paths.add(path)

    def _forget_path(self, inode: int, path: bytes) -> None:
        paths = self._paths.get(inode)
        if paths is not None:
            paths.discard(path)

    def _move_subtree(self, old: bytes, new: bytes) -> None:
        """Rewrite known paths under a renamed directory."""
        prefix = old + b"/"
        for paths in self._paths.values():
            stale = [p for p in paths if p.startswith(prefix)]
            for p in stale:
                paths.discard(p)
                paths.add(new + p[len(old) :])

    def _attrs(self, st: os.stat_result) -> EntryAttributes:
        entry = EntryAttributes()
        entry.st_ino = self._fuse_ino(st.st_ino)
        entry.generation = 0
        entry.entry_timeout = self._entry_timeout_s
        entry.attr_timeout = self._attr_timeout_s
        entry.st_mode = st.st_mode
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = st.st_blksize
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    def _stat_inode(self, inode: int) -> os.stat_result:
        """lstat the inode's path; an unlinked but open file is fstat'ed instead."""
        paths = self._paths.get(inode)
        if paths:
            try:
                return os.lstat(next(iter(paths)))
            except FileNotFoundError:
                pass
        fds = self._inode_fds.get(inode)
        if fds:
            return os.fstat(next(iter(fds)))
        raise FUSEError(errno.ENOENT)

    def _new_entry(self, path: bytes, ctx: RequestContext) -> EntryAttributes:
        """Give a just-created *path* to the caller and return its attributes."""
        if ctx.uid != 0 or ctx.gid != 0:
            os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)
        st = os.lstat(path)
        attrs = self._attrs(st)
        self._remember(attrs.st_ino, path)
        return attrs

    # ----- namespace ------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        if name == b".":
            path = self._path(parent_inode)
        elif name == b"..":
            path = os.path.dirname(self._path(parent_inode))
            if len(path) < len(self._source):
                path = self._source
        else:
            path = self._child(parent_inode, name)
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise _fuse_error(exc) from None
        attrs = self._attrs(st)
        self._remember(attrs.st_ino, path)
        return attrs

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            left = self._lookups.get(inode, 0) - nlookup
            if left > 0:
                self._lookups[inode] = left
            elif inode != ROOT_INODE:
                self._lookups.pop(inode, None)
                self._paths.pop(inode, None)

    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        try:
            return self._attrs(self._stat_inode(inode))
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def setattr(
        self,
        inode: int,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: int | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        try:
            target: int | bytes = fh if fh is not None else self._path(inode)
            if fields.update_size:
                os.truncate(target, attr.st_size)
            if fields.update_mode:
                os.chmod(target, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                if isinstance(target, int):
                    os.fchown(target, uid, gid)
                else:
                    os.chown(target, uid, gid, follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                self._set_times(target, attr, fields)
            return self._attrs(self._stat_inode(inode))
        except OSError as exc:
            raise _fuse_error(exc) from None

    def _set_times(self, target: int | bytes, attr: EntryAttributes, fields: SetattrFields) -> None:
        st = os.fstat(target) if isinstance(target, int) else os.lstat(target)
        atime_ns = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
        mtime_ns = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
        if isinstance(target, int):
            os.utime(target, ns=(atime_ns, mtime_ns))
        else:
            os.utime(target, ns=(atime_ns, mtime_ns), follow_symlinks=False)

    async def readlink(self, inode: int, ctx: RequestContext) -> bytes:
        try:
            return os.readlink(self._path(inode))
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.mknod(path, mode, rdev)
            return self._new_entry(path, ctx)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: RequestContext
    ) -> EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode)
            return self._new_entry(path, ctx)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: RequestContext
    ) -> EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.symlink(target, path)
            return self._new_entry(path, ctx)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: RequestContext
    ) -> EntryAttributes:
        path = self._child(new_parent_inode, new_name)
        try:
            os.link(self._path(inode), path, follow_symlinks=False)
            attrs = self._attrs(os.lstat(path))
        except OSError as exc:
            raise _fuse_error(exc) from None
        self._remember(attrs.st_ino, path)
        return attrs

    async def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        path = self._child(parent_inode, name)
        try:
            inode = self._fuse_ino(os.lstat(path).st_ino)
            os.unlink(path)
        except OSError as exc:
            raise _fuse_error(exc) from None
        self._forget_path(inode, path)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        path = self._child(parent_inode, name)
        try:
            inode = self._fuse_ino(os.lstat(path).st_ino)
            os.rmdir(path)
        except OSError as exc:
            raise _fuse_error(exc) from None
        self._forget_path(inode, path)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: RequestContext,
    ) -> None:
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        try:
            st_old = os.lstat(old)
            try:
                st_new: os.stat_result | None = os.lstat(new)
            except FileNotFoundError:
                st_new = None
            if flags:
                _renameat2(old, new, flags)
            else:
                os.rename(old, new)
        except OSError as exc:
            raise _fuse_error(exc) from None
        self._renamed(st_old, st_new, old, new, flags)

    def _renamed(
        self,
        st_old: os.stat_result,
        st_new: os.stat_result | None,
        old: bytes,
        new: bytes,
        flags: int,
    ) -> None:
        moved = self._fuse_ino(st_old.st_ino)
        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        if st_new is not None:
            other = self._fuse_ino(st_new.st_ino)
            self._forget_path(other, new)
            if exchange:
                self._paths.get(other, set()).add(old)
        self._forget_path(moved, old)
        if moved in self._paths:
            self._paths[moved].add(new)
        if exchange:
            tmp = old + b"\0"
            self._move_subtree(old, tmp)
            self._move_subtree(new, old)
            self._move_subtree(tmp, new)
        elif stat.S_ISDIR(st_old.st_mode):
            self._move_subtree(old, new)

    # ----- files ----------------------------------------------------------------------

    def _opened(self, inode: int, fd: int) -> FileInfo:
        self._fd_inode[fd] = inode
        fds = self._inode_fds.get(inode)
        if fds is None:
            self._inode_fds[inode] = {fd}
        else:
            fds.add(fd)
        return FileInfo(fh=fd)

    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        try:
            fd = os.open(self._path(inode), flags & ~os.O_CREAT)
        except OSError as exc:
            raise _fuse_error(exc) from None
        return self._opened(inode, fd)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        path = self._child(parent_inode, name)
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_TRUNC, mode)
        except OSError as exc:
            raise _fuse_error(exc) from None
        try:
            attrs = self._new_entry(path, ctx)
        except OSError as exc:
            os.close(fd)
            raise _fuse_error(exc) from None
        return self._opened(attrs.st_ino, fd), attrs

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return os.pread(fh, size, off)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            return os.pwrite(fh, buf, off)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            if datasync:
                os.fdatasync(fh)
            else:
                os.fsync(fh)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def release(self, fh: int) -> None:
        inode = self._fd_inode.pop(fh, -1)
        fds = self._inode_fds.get(inode)
        if fds is not None:
            fds.discard(fh)
            if not fds:
                del self._inode_fds[inode]
        try:
            os.close(fh)
        except OSError as exc:
            raise _fuse_error(exc) from None

    # ----- directories ----------------------------------------------------------------

    async def opendir(self, inode: int, ctx: RequestContext) -> int:
        path = self._path(inode)
        try:
            names = [os.fsencode(e.name) for e in os.scandir(path)]
        except OSError as exc:
            raise _fuse_error(exc) from None
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = names
        self._dir_paths[fh] = path
        return fh

    def _dir_entries(self, fh: int, start_id: int) -> Iterator[tuple[int, bytes, bytes]]:
        path = self._dir_paths[fh]
        names = self._dirs[fh]
        for index in range(start_id, len(names)):
            yield index + 1, names[index], path + b"/" + names[index]

    async def readdir(self, fh: int, start_id: int, token: ReaddirToken) -> None:
        for next_id, name, path in self._dir_entries(fh, start_id):
            try:
                attrs = self._attrs(os.lstat(path))
            except FileNotFoundError:
                continue  # removed since opendir
            except OSError as exc:
                raise _fuse_error(exc) from None
            if not pyfuse3.readdir_reply(token, name, attrs, next_id):
                return
            self._remember(attrs.st_ino, path)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)
        self._dir_paths.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        try:
            sv = os.statvfs(self._source)
        except OSError as exc:
            raise _fuse_error(exc) from None
        data = StatvfsData()
        data.f_bsize = sv.f_bsize
        data.f_frsize = sv.f_frsize
        data.f_blocks = sv.f_blocks
        data.f_bfree = sv.f_bfree
        data.f_bavail = sv.f_bavail
        data.f_files = sv.f_files
        data.f_ffree = sv.f_ffree
        data.f_favail = sv.f_favail
        data.f_namemax = sv.f_namemax
        return data


async def _serve() -> None:
    """Run the FUSE loop until umount, or until SIGTERM/SIGINT ends it."""

    async def stop_on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("source", help="directory to mirror")
    parser.add_argument("mountpoint", help="where to mount it")
    parser.add_argument("--entry-timeout-s", type=float, default=1.0,
                        help="kernel entry cache timeout (default 1, as clusterfs)")
    parser.add_argument("--attr-timeout-s", type=float, default=1.0,
                        help="kernel attribute cache timeout (default 1, as clusterfs)")
    parser.add_argument("--debug", action="store_true", help="log at DEBUG level")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not os.path.isdir(args.source):
        print(f"passthrough: {args.source}: not a directory", file=sys.stderr)
        return 1
    os.umask(0)  # the kernel has already applied the caller's umask to every mode
    ops = Passthrough(args.source, args.entry_timeout_s, args.attr_timeout_s)
    options = set(pyfuse3.default_options)
    options |= {"fsname=passthrough", "allow_other", "default_permissions"}
    try:
        pyfuse3.init(ops, args.mountpoint, options)
    except RuntimeError as exc:
        print(f"passthrough: cannot mount {args.mountpoint}: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(_serve)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
