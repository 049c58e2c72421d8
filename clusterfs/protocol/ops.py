"""The file operations of the protocol, executed on this node's namespace layer.

One `FileOps` serves every session of the node. It calls the same `FileSystem` as the FUSE
handlers, so namespace changes go through the same 2PC path and data goes straight to the
backing files; a session's open files are `FileSystem` handles, which count as open on
this node (a file unlinked elsewhere keeps its data until the session closes it). Clients
hold the cluster's credentials: they act as root in the cluster namespace, and only there
(paths are resolved by `paths.Resolver`).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable

from clusterfs.attributes import Attributes, Caller
from clusterfs.filesystem import AttrChanges, FileSystem
from clusterfs.namespace import ROOT_INO, NamespaceError
from clusterfs.pieces import Buffer
from clusterfs.protocol import messages as m
from clusterfs.protocol.paths import Resolver

# A tunnel service (vhdshare's unpacker) answers opaque payloads on an open file.
# (ino, fd, payload) -> the reply, in pieces (sent without joining them)
TunnelService = Callable[[int, int, memoryview], Awaitable[list[Buffer]]]

# Served at once by the server when nothing of the session is pending (`run_now`).
ImmediateOp = (m.Ping | m.Stat | m.Lookup | m.Readdir | m.Read | m.Close | m.Readlink
               | m.GetXattr | m.ListXattr)
IMMEDIATE_OPS = (m.Ping, m.Stat, m.Lookup, m.Readdir, m.Read, m.Close, m.Readlink, m.GetXattr,
                 m.ListXattr)

_OPEN_FLAGS = os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND
_REOPEN_FLAGS = os.O_ACCMODE | os.O_APPEND


def _attrs(attrs: Attributes) -> m.Attrs:
    return m.Attrs(attrs.ino, attrs.mode, attrs.nlink, attrs.uid, attrs.gid, attrs.size_bytes,
                   attrs.mtime_ns, attrs.ctime_ns)


class FileOps:
    def __init__(self, fs: FileSystem, tunnel: TunnelService | None = None) -> None:
        self.fs = fs
        self.tunnel = tunnel
        self.paths = Resolver(fs.find, lambda: fs.getattr(ROOT_INO))
        self._root = Caller(0, 0, os.getpid(), umask=0)

    async def run(self, op: m.Op, handles: set[int]) -> m.Value | m.DataPieces:
        """Execute `op` for a session whose open handles are `handles` (updated here)."""
        if isinstance(op, IMMEDIATE_OPS):
            return self.run_now(op, handles)
        match op:
            case m.Mkdir(path, mode):
                parent, name = self.paths.parent(path)
                return _attrs(await self.fs.mkdir(parent, name, stat.S_IMODE(mode), self._root))
            case m.Open(path, flags, mode):
                return await self._open(path, flags & _OPEN_FLAGS, mode, handles)
            case m.Reopen(ino, flags):
                fh, _keep_cache = self.fs.open(ino, flags & _REOPEN_FLAGS, self._root)
                handles.add(fh)
                return m.Handle(fh, _attrs(self.fs.getattr(ino)))
            case m.Write(handle, offset, data):
                self._check(handle, handles)
                _check_io(offset, len(data))
                return m.Count(await self.fs.write(handle, offset, data))
            case m.Truncate(path, size):
                if size < 0:
                    raise NamespaceError(errno.EINVAL)
                ino = self.paths.attrs(path).ino
                return _attrs(await self.fs.setattr(ino, AttrChanges(size_bytes=size), None))
            case m.Fsync(handle, datasync):
                self._check(handle, handles)
                await self.fs.fsync(handle, datasync)
                return None
            case m.Tunnel(handle, payload):
                return m.DataPieces(await self._tunnel(handle, payload, handles))
            case _:
                return await self._change(op)

    async def _change(self, op: m.Op) -> m.Value:
        """The namespace changes that name paths only."""
        match op:
            case m.Unlink(path):
                await self.fs.unlink(*self.paths.parent(path))
            case m.Rmdir(path):
                await self.fs.rmdir(*self.paths.parent(path))
            case m.Rename(old, new, flags):
                await self.fs.rename(*self.paths.parent(old), *self.paths.parent(new), flags)
            case m.Symlink(path, target):
                parent, name = self.paths.parent(path)
                return _attrs(await self.fs.symlink(parent, name, os.fsencode(target),
                                                    self._root))
            case m.SetXattr(path, name, value):
                await self.fs.setxattr(self.paths.attrs(path).ino, name, value)
            case m.RemoveXattr(path, name):
                await self.fs.removexattr(self.paths.attrs(path).ino, name)
            case _:
                raise NamespaceError(errno.ENOSYS, f"unknown operation {type(op).__name__}")
        return None

    def run_now(self, op: ImmediateOp, handles: set[int]) -> m.Value:
        """The operations that never wait (reads of the replica or a backing file)."""
        match op:
            case m.Ping():
                return None
            case m.Stat(path):
                return _attrs(self.paths.attrs(path))
            case m.Lookup(dir_path, child):
                return _attrs(self.paths.attrs(f"{dir_path.rstrip('/')}/{child}"))
            case m.Readdir(path, cookie, limit):
                return self._readdir(path, cookie, limit)
            case m.Read(handle, offset, size):
                self._check(handle, handles)
                _check_io(offset, size)
                return m.Data(memoryview(self.fs.read(handle, offset, size)))
            case m.Close(handle):
                self._check(handle, handles)
                handles.discard(handle)
                self.fs.release(handle)
                return None
            case m.Readlink(path):
                return m.Text(os.fsdecode(self.fs.readlink(self.paths.attrs(path).ino)))
            case m.GetXattr(path, name):
                return m.Data(memoryview(self.fs.getxattr(self.paths.attrs(path).ino, name)))
            case m.ListXattr(path):
                return m.Names(self.fs.listxattr(self.paths.attrs(path).ino))
        raise AssertionError(op)

    def _readdir(self, path: str, cookie: int, limit: int) -> m.Entries:
        ino = self.paths.attrs(path).ino
        self.fs.opendir(ino)
        limit = max(1, min(limit, m.MAX_READDIR_ENTRIES))
        entries: list[m.DirEntry] = []
        for item in self.fs.readdir(ino, cookie):
            if item.name in (b".", b".."):
                continue
            if len(entries) == limit:
                return m.Entries(entries, entries[-1].cookie)
            entries.append(m.DirEntry(os.fsdecode(item.name), item.attrs.ino, item.attrs.mode,
                                      item.next_id))
        return m.Entries(entries, 0)

    async def _open(self, path: str, flags: int, mode: int, handles: set[int]) -> m.Handle:
        parent, name = self.paths.parent(path)
        if flags & os.O_CREAT:
            try:
                fh, attrs = await self.fs.create(parent, name, stat.S_IMODE(mode), flags,
                                                 self._root)
            except NamespaceError as exc:
                if exc.errno != errno.EEXIST or flags & os.O_EXCL:
                    raise
            else:
                handles.add(fh)
                return m.Handle(fh, _attrs(attrs))
        attrs = self.fs.find(parent, name)
        fh, _keep_cache = self.fs.open(attrs.ino, flags, self._root)
        handles.add(fh)
        return m.Handle(fh, _attrs(self.fs.getattr(attrs.ino)))

    async def _tunnel(self, handle: int, payload: memoryview, handles: set[int]
                      ) -> list[Buffer]:
        self._check(handle, handles)
        if self.tunnel is None:
            raise NamespaceError(errno.EOPNOTSUPP, "no tunnel service on this node")
        ino, fd = self.fs.handle_file(handle)
        return await self.tunnel(ino, fd, payload)

    @staticmethod
    def _check(handle: int, handles: set[int]) -> None:
        if handle not in handles:
            raise NamespaceError(errno.EBADF, "not a handle of this session")

    def close_all(self, handles: set[int]) -> None:
        for handle in handles:
            self.fs.release(handle)
        handles.clear()


def _check_io(offset: int, size: int) -> None:
    if offset < 0 or size < 0:
        raise NamespaceError(errno.EINVAL)
    if size > m.MAX_IO_BYTES:
        raise NamespaceError(errno.EMSGSIZE, f"at most {m.MAX_IO_BYTES} bytes per call")
