"""Paths of the file protocol, checked before anything looks them up.

A protocol path is absolute and names a place in the cluster namespace, never on a host:
it is split into names here and looked up name by name in the replica (`Resolver`), from
the cluster's root, so no path can reach outside the namespace (".." of the root is the
root, as on any file system) and nothing in the block directory is ever named by a client.
Symbolic links are not followed while resolving (a link in the middle of a path answers
ENOTDIR); `Readlink` reads them.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from clusterfs.attributes import Attributes
from clusterfs.namespace import NAME_MAX_BYTES, ROOT_INO, NamespaceError

PATH_MAX_BYTES = 4096

Find = Callable[[int, bytes], Attributes]  # FileSystem.find: (directory, name) -> attributes


def split(path: str) -> list[bytes]:
    """The names of an absolute path ("." and empty names dropped, ".." kept)."""
    raw = os.fsencode(path)
    if not raw.startswith(b"/"):
        raise NamespaceError(errno.EINVAL, f"not an absolute path: {path[:80]!r}")
    if len(raw) > PATH_MAX_BYTES:
        raise NamespaceError(errno.ENAMETOOLONG)
    if b"\0" in raw:
        raise NamespaceError(errno.EINVAL, "NUL in a path")
    names = [name for name in raw.split(b"/") if name not in (b"", b".")]
    if any(len(name) > NAME_MAX_BYTES for name in names):
        raise NamespaceError(errno.ENAMETOOLONG)
    return names


def split_parent(path: str) -> tuple[list[bytes], bytes]:
    """The parent's names and the last name, which must be a real name."""
    names = split(path)
    if not names:
        raise NamespaceError(errno.EBUSY, "the root")
    if names[-1] == b"..":
        raise NamespaceError(errno.EINVAL, f"{path[:80]!r} ends in ..")
    return names[:-1], names[-1]


class Resolver:
    """Walks names from the root through `find`, without following symbolic links."""

    def __init__(self, find: Find, root_attrs: Callable[[], Attributes]) -> None:
        self._find = find
        self._root_attrs = root_attrs

    def walk(self, names: list[bytes]) -> Attributes:
        attrs = self._root_attrs()
        for name in names:
            if not stat.S_ISDIR(attrs.mode):
                raise NamespaceError(errno.ENOTDIR)
            attrs = self._find(attrs.ino, name)
        return attrs

    def attrs(self, path: str) -> Attributes:
        return self.walk(split(path))

    def directory(self, names: list[bytes]) -> int:
        attrs = self.walk(names)
        if not stat.S_ISDIR(attrs.mode):
            raise NamespaceError(errno.ENOTDIR)
        return attrs.ino

    def parent(self, path: str) -> tuple[int, bytes]:
        """The inode of the directory that holds `path`'s last name, and that name."""
        names, name = split_parent(path)
        return self.directory(names), name


__all__ = ["ROOT_INO", "Resolver", "split", "split_parent"]
