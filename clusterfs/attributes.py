"""File attributes as the file system reports them, and the callers it reports them to.

A regular file's size and times come from its backing file, so every node that reads the
common block directory sees the same values; its ctime is the later of the replica's (mode,
owner and link changes) and the backing file's (writes, truncation, utime).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from clusterfs.store import Inode

BLOCK_SIZE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request: the kernel's credentials of the calling process."""

    uid: int
    gid: int
    pid: int
    umask: int = 0o022

    @property
    def is_root(self) -> bool:
        return self.uid == 0


@dataclass(frozen=True, slots=True)
class Attributes:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size_bytes: int
    blocks_512: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


def from_inode(inode: Inode, backing: os.stat_result | None) -> Attributes:
    if backing is None:
        size, atime, mtime, ctime = inode.size_bytes, inode.atime_ns, inode.mtime_ns, inode.ctime_ns
        blocks = (size + 511) // 512 if stat.S_ISDIR(inode.mode) else 0
    else:
        size, atime, mtime = backing.st_size, backing.st_atime_ns, backing.st_mtime_ns
        ctime = max(inode.ctime_ns, backing.st_ctime_ns)
        blocks = backing.st_blocks
    return Attributes(inode.ino, inode.mode, inode.nlink, inode.uid, inode.gid, inode.rdev,
                      size, blocks, atime, mtime, ctime)


def may_access(attrs: Attributes, caller: Caller, groups: frozenset[int], mode: int) -> bool:
    """access(2) as the kernel decides it from mode bits (root may do all but execute
    a file that nobody may execute)."""
    if caller.is_root:
        return not (mode & os.X_OK) or stat.S_ISDIR(attrs.mode) or bool(attrs.mode & 0o111)
    if caller.uid == attrs.uid:
        granted = (attrs.mode >> 6) & 7
    elif attrs.gid == caller.gid or attrs.gid in groups:
        granted = (attrs.mode >> 3) & 7
    else:
        granted = attrs.mode & 7
    return (mode & granted) == mode
