"""Namespace changes as data: one typed record per kind of change.

A record says everything its application needs (names, modes, owners, the time of the change),
so applying it is deterministic: every replica that applies the same records in the same order
ends up identical. Records are msgspec tagged structs, encoded the same way on every node.
"""

from __future__ import annotations

import msgspec


class Record(msgspec.Struct, tag=True, array_like=True):
    """Base of every namespace change."""


class MakeNode(Record):
    """Create a non-directory inode (regular, fifo, socket, device) and its entry."""

    parent: int
    name: bytes
    mode: int
    uid: int
    gid: int
    rdev: int
    now_ns: int


class MakeDir(Record):
    parent: int
    name: bytes
    mode: int
    uid: int
    gid: int
    now_ns: int


class MakeSymlink(Record):
    parent: int
    name: bytes
    target: bytes
    uid: int
    gid: int
    now_ns: int


class Link(Record):
    ino: int
    parent: int
    name: bytes
    now_ns: int


class Unlink(Record):
    parent: int
    name: bytes
    now_ns: int


class RemoveDir(Record):
    parent: int
    name: bytes
    now_ns: int


class Rename(Record):
    parent_old: int
    name_old: bytes
    parent_new: int
    name_new: bytes
    flags: int  # 0, RENAME_NOREPLACE or RENAME_EXCHANGE
    now_ns: int


class SetAttr(Record):
    """Change metadata kept in the replica. None leaves a field as it is."""

    ino: int
    now_ns: int
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size_bytes: int | None = None  # non-regular inodes only; regular files live in blocks
    atime_ns: int | None = None
    mtime_ns: int | None = None


class SetXattr(Record):
    ino: int
    name: bytes
    value: bytes
    flags: int  # 0, XATTR_CREATE or XATTR_REPLACE
    now_ns: int


class RemoveXattr(Record):
    ino: int
    name: bytes
    now_ns: int


class Purge(Record):
    """Delete an unlinked inode once nothing holds it open any more."""

    ino: int


class SetDiskState(Record):
    """Replace the shared-disk state of a regular file (vhdshare's persistent reservations),
    if it is still `expected`: a compare-and-set, so that nodes deciding from what their
    replica held cannot overwrite each other's changes. The state is opaque here."""

    ino: int
    expected: bytes
    state: bytes


AnyRecord = (
    MakeNode | MakeDir | MakeSymlink | Link | Unlink | RemoveDir | Rename | SetAttr | SetXattr
    | RemoveXattr | Purge | SetDiskState
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyRecord)


def encode(record: Record) -> bytes:
    return _encoder.encode(record)


def decode(raw: bytes) -> AnyRecord:
    return _decoder.decode(raw)
