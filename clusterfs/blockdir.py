"""The common block directory: a format marker and one backing file per inode.

Layout:

    BLOCKDIR/clusterfs.format   JSON: format name, version, cluster id
    BLOCKDIR/cluster/           the cluster's credentials, registry, witness, snapshots
    BLOCKDIR/data/XX/INO        backing file of regular inode INO (hex), XX = INO mod 256

Backing files are named by inode number only, so no user-chosen name ever reaches a path in
here and nothing can escape the block directory. The fan-out directories are made when the
directory is formatted, which keeps directory creation off the create path.

Open files across the cluster: every node holds a shared OFD lock (open file description
lock, Linux >= 3.15) on each backing file it has open. An unlinked inode may be purged only
when no such lock is left anywhere (`is_held_elsewhere`). OFD locks belong to the open file
description, not the process, so closing another fd of the same file keeps them, and the
kernel drops them on the last close or when the process dies (kill -9 included).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clusterfs.credentials import create_credentials

FORMAT_FILE = "clusterfs.format"
FORMAT_NAME = "clusterfs-blockdir"
FORMAT_VERSION = 1
FANOUT = 256
BACKING_MODE = 0o600

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock (x86_64, aarch64): short l_type, l_whence; off_t l_start, l_len; pid_t l_pid
_FLOCK = struct.Struct("@hhqqi4x")
assert _FLOCK.size == 32, "struct flock layout of this platform is not known"


class BlockDirError(Exception):
    """The block directory is missing, not formatted, or of another format."""


@dataclass(frozen=True)
class BlockDir:
    root: Path
    cluster_id: str

    @property
    def data(self) -> Path:
        return self.root / "data"

    def path(self, ino: int) -> str:
        return f"{self.root}/data/{ino % FANOUT:02x}/{ino:x}"

    def create(self, ino: int) -> int:
        """Create (or open, after a crash) the backing file of `ino`; returns an fd."""
        return os.open(self.path(ino), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, BACKING_MODE)

    def create_empty(self, ino: int) -> None:
        os.close(self.create(ino))

    def open(self, ino: int, flags: int) -> int:
        return os.open(self.path(ino), flags | os.O_CLOEXEC)

    def stat(self, ino: int) -> os.stat_result:
        return os.stat(self.path(ino))

    def remove(self, ino: int) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # nothing there
            os.unlink(self.path(ino))

    def is_held_elsewhere(self, ino: int) -> bool:
        """True if some node (this one included) still has `ino`'s backing file open."""
        return is_locked(self.path(ino))

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.root)

    def iter_backing(self) -> Iterator[tuple[int, str]]:
        """Every (ino, path) of a backing file in the data area."""
        for ino, path in self.iter_data():
            if ino is not None:
                yield ino, path

    def iter_data(self) -> Iterator[tuple[int | None, str]]:
        """Everything in the data area: (ino, path) for a backing file, (None, path) for
        anything that cannot be one (a wrong name, or a name in the wrong fan-out dir)."""
        for fan in sorted(os.listdir(self.data)):
            fan_path = f"{self.data}/{fan}"
            if not os.path.isdir(fan_path):
                yield None, fan_path
                continue
            for name in os.listdir(fan_path):
                yield _backing_ino(fan, name), f"{fan_path}/{name}"


def _flock(lock_type: int, length_bytes: int = 0) -> bytes:
    """A lock from byte 0 (length 0: the whole file); l_pid must be 0 for OFD locks."""
    return _FLOCK.pack(lock_type, os.SEEK_SET, 0, length_bytes, 0)


def hold_shared(fd: int) -> None:
    """Mark `fd`'s backing file as open on this node until `fd` is closed. Shared locks
    never conflict with each other, so this does not block or fail on a busy file. Only
    byte 0 is locked: locks elsewhere in the file stay free for the file's users (vhdshare
    serialises the growth of a shared dynamic disk with one)."""
    fcntl.fcntl(fd, F_OFD_SETLK, _flock(fcntl.F_RDLCK, 1))


def is_locked(path: str) -> bool:
    """True if any open file description (of any process, on any node) holds a lock on the
    file at `path`; False if nothing does or the file is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        # GETLK asks "would an exclusive lock conflict?" without taking one; a fresh open
        # file description holds no lock of its own, so any holder is another one.
        answer = fcntl.fcntl(fd, F_OFD_GETLK, _flock(fcntl.F_WRLCK))
    finally:
        os.close(fd)
    return int(_FLOCK.unpack(answer)[0]) != fcntl.F_UNLCK


def _backing_ino(fan: str, name: str) -> int | None:
    try:
        ino = int(name, 16)
    except ValueError:
        return None
    return ino if name == f"{ino:x}" and fan == f"{ino % FANOUT:02x}" else None


def format_blockdir(root: Path) -> BlockDir:
    """Initialise an empty (or missing) directory as a block directory."""
    if root.exists() and not root.is_dir():
        raise BlockDirError(f"{root}: not a directory")
    if (root / FORMAT_FILE).exists():
        raise BlockDirError(f"{root}: already formatted")
    if root.exists() and any(root.iterdir()):
        raise BlockDirError(f"{root}: directory is not empty")
    root.mkdir(parents=True, exist_ok=True)
    for fan in range(FANOUT):
        (root / "data" / f"{fan:02x}").mkdir(parents=True, exist_ok=True)
    cluster_id = str(uuid.uuid4())
    marker = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "cluster_id": cluster_id}
    tmp = root / (FORMAT_FILE + ".tmp")
    tmp.write_text(json.dumps(marker) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    create_credentials(root)  # before the marker: a formatted directory always has them
    tmp.rename(root / FORMAT_FILE)
    return BlockDir(root, cluster_id)


def open_blockdir(root: Path) -> BlockDir:
    """Open a formatted block directory, or say in one line why it cannot be used."""
    if not root.exists():
        raise BlockDirError(f"{root}: block directory does not exist")
    if not root.is_dir():
        raise BlockDirError(f"{root}: not a directory")
    try:
        marker = json.loads((root / FORMAT_FILE).read_text())
    except FileNotFoundError:
        raise BlockDirError(
            f"{root}: not a clusterfs block directory (run 'clusterfs format {root}')"
        ) from None
    except (OSError, ValueError) as exc:
        raise BlockDirError(f"{root}: unreadable format marker: {exc}") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
        raise BlockDirError(f"{root}: not a clusterfs block directory")
    if marker.get("version") != FORMAT_VERSION:
        raise BlockDirError(f"{root}: format version {marker.get('version')} is not supported")
    if not (root / "data").is_dir():
        raise BlockDirError(f"{root}: data area is missing")
    return BlockDir(root, str(marker["cluster_id"]))
