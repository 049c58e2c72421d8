"""The sector interface every disk image offers, and the plain-file image.

The SCSI target, the NBD server and `vhdshare convert` speak only `BlockImage`:
sectors of 512 bytes addressed by LBA. `RawImage` is a plain file used as a
disk; the VHD images in `vhdshare.image` implement the same protocol. An image
object is not thread-safe: one owner performs its I/O.

Helpers shared by the file-backed images live here too: range checks, full
pread/pwrite loops, hole punching (sparse unmap), and SEEK_DATA/SEEK_HOLE maps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, Self, runtime_checkable

from clusterfs.pieces import Buffer
from vhdshare import directio

SECTOR_SIZE = 512

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK_BYTES = 1 << 20

F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock: type, whence, start, length, pid
assert _FLOCK.size == 32, "struct flock layout of this platform is not known"

Runs = list[tuple[int, int, bool]]  # (start, count, flag) in sectors or bytes


class ImageError(Exception):
    """A disk image cannot do what was asked: bad request or bad image."""


@runtime_checkable
class BlockImage(Protocol):
    """A disk addressed by 512-byte sectors. `writes_in_place`: every write, unmap and
    zeroing changes only the sectors' own bytes in the file (no allocation, no metadata), so
    several may run at once."""

    sector_size: int
    size_bytes: int
    writes_in_place: bool

    def read(self, lba: int, count: int) -> bytes: ...

    def write(self, lba: int, data: Buffer) -> None: ...

    def flush(self) -> None: ...

    def unmap(self, lba: int, count: int) -> None: ...

    def allocated(self, lba: int, count: int) -> list[tuple[int, int, bool]]: ...

    def close(self) -> None: ...


def check_range(lba: int, count: int, size_bytes: int, error: type[ImageError]) -> None:
    """Raise `error` unless sectors [lba, lba+count) lie inside the disk."""
    total_sectors = size_bytes // SECTOR_SIZE
    if lba < 0 or count < 0 or lba + count > total_sectors:
        raise error(f"sectors {lba}..{lba + count} are outside the disk of {total_sectors} sectors")


def check_write_data(data: Buffer, error: type[ImageError]) -> int:
    """Return the sector count of `data`; raise `error` for a partial sector."""
    if len(data) % SECTOR_SIZE:
        raise error(f"write of {len(data)} bytes is not a multiple of {SECTOR_SIZE}")
    return len(data) // SECTOR_SIZE


def pread_exact(fd: int, length_bytes: int, offset_bytes: int, error: type[ImageError]) -> bytes:
    """Read exactly `length_bytes` or raise `error` (the file is shorter than it claims).
    Files opened with O_DIRECT are read through `directio`."""
    read = directio.pread if directio.is_direct(fd) else os.pread
    data = read(fd, length_bytes, offset_bytes)
    if len(data) == length_bytes:
        return data
    parts = [data]
    got = len(data)
    while got < length_bytes:
        more = read(fd, length_bytes - got, offset_bytes + got)
        if not more:
            raise error(f"file ends inside a read of {length_bytes} bytes at {offset_bytes}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset_bytes: int) -> None:
    """Write all of `data` at `offset_bytes` (pwrite may write less than asked)."""
    if directio.is_direct(fd):
        directio.pwrite(fd, data, offset_bytes)
        return
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset_bytes)
        view = view[written:]
        offset_bytes += written


def _load_fallocate() -> object | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


_fallocate = _load_fallocate()


def zero_range(fd: int, offset_bytes: int, length_bytes: int) -> None:
    """Make a byte range read as zeros, freeing its space where the file system can."""
    if length_bytes <= 0:
        return
    if _fallocate is not None:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _fallocate(fd, mode, offset_bytes, length_bytes) == 0:  # type: ignore[operator]
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err))
    zeros = bytes(min(length_bytes, _ZERO_CHUNK_BYTES))
    end = offset_bytes + length_bytes
    while offset_bytes < end:
        chunk = min(len(zeros), end - offset_bytes)
        pwrite_all(fd, memoryview(zeros)[:chunk], offset_bytes)
        offset_bytes += chunk


@contextmanager
def byte_lock(fd: int, offset_bytes: int) -> Iterator[None]:
    """Hold an exclusive lock on one byte of `fd`'s file, waiting for it as long as it takes.

    An OFD lock: it belongs to this open file description, so it excludes every other one
    (other processes, other nodes on a shared file system, other opens in this process), and
    the kernel drops it when the holder dies. Locking a byte past the end of the file is
    allowed and touches no data."""
    fcntl.fcntl(fd, F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset_bytes, 1, 0))
    try:
        yield
    finally:
        fcntl.fcntl(fd, F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset_bytes, 1, 0))


def data_runs(fd: int, offset_bytes: int, length_bytes: int) -> list[tuple[int, int, bool]]:
    """Map [offset, offset+length) of a file into (offset, length, has_data) runs.

    Uses SEEK_DATA/SEEK_HOLE; where the file system cannot tell, all is data.
    """
    end = offset_bytes + length_bytes
    runs: list[tuple[int, int, bool]] = []
    pos = offset_bytes
    while pos < end:
        try:
            data_start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to the end of the file
                runs.append((pos, end - pos, False))
                break
            return [(offset_bytes, length_bytes, True)]
        data_start = min(data_start, end)
        if data_start > pos:
            runs.append((pos, data_start - pos, False))
        if data_start >= end:
            break
        hole_start = min(os.lseek(fd, data_start, os.SEEK_HOLE), end)
        runs.append((data_start, hole_start - data_start, True))
        pos = hole_start
    return runs


def sector_runs(byte_runs: Runs, base_bytes: int) -> Runs:
    """Turn byte runs into sector runs (partly-data sectors count as data), merged."""
    runs: list[tuple[int, int, bool]] = []
    for offset_bytes, length_bytes, has_data in byte_runs:
        first = (offset_bytes - base_bytes) // SECTOR_SIZE
        last = -(-(offset_bytes - base_bytes + length_bytes) // SECTOR_SIZE)
        if not has_data:
            first = -(-(offset_bytes - base_bytes) // SECTOR_SIZE)
            last = (offset_bytes - base_bytes + length_bytes) // SECTOR_SIZE
        if runs and runs[-1][0] + runs[-1][1] > first:
            first = runs[-1][0] + runs[-1][1]
        if last > first:
            append_run(runs, first, last - first, has_data)
    return runs


def append_run(runs: list[tuple[int, int, bool]], lba: int, count: int, flag: bool) -> None:
    """Append (lba, count, flag) to `runs`, merging with the last run when they touch."""
    if count <= 0:
        return
    if runs and runs[-1][2] == flag and runs[-1][0] + runs[-1][1] == lba:
        runs[-1] = (runs[-1][0], runs[-1][1] + count, flag)
    else:
        runs.append((lba, count, flag))


def fill_gaps(runs: Runs, lba: int, count: int) -> Runs:
    """Make `runs` cover exactly [lba, lba+count), treating gaps as data (conservative)."""
    out: list[tuple[int, int, bool]] = []
    pos = lba
    for run_lba, run_count, flag in runs:
        if run_lba > pos:
            append_run(out, pos, run_lba - pos, True)
        append_run(out, run_lba, run_count, flag)
        pos = run_lba + run_count
    if pos < lba + count:
        append_run(out, pos, lba + count - pos, True)
    return out


class RawImage:
    """A plain file used as a disk: sector n is at byte n*512."""

    sector_size = SECTOR_SIZE
    writes_in_place = True

    def __init__(self, path: str | os.PathLike[str], writable: bool = False,
                 direct: bool = False) -> None:
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            self._fd = directio.open_direct(os.fspath(path), flags) if direct \
                else os.open(path, flags)
        except OSError as exc:
            raise ImageError(f"cannot open {os.fspath(path)}: {exc.strerror}") from None
        self.writable = writable
        self.size_bytes = os.fstat(self._fd).st_size
        if self.size_bytes % SECTOR_SIZE:
            os.close(self._fd)
            raise ImageError(
                f"{os.fspath(path)}: raw image size {self.size_bytes} is not a multiple of 512"
            )

    @classmethod
    def create(cls, path: str | os.PathLike[str], size_bytes: int) -> RawImage:
        """Create a sparse raw image of `size_bytes` (an existing file is an error)."""
        if size_bytes < 0 or size_bytes % SECTOR_SIZE:
            raise ImageError(f"raw image size {size_bytes} is not a multiple of 512")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ImageError(f"cannot create {os.fspath(path)}: {exc.strerror}") from None
        try:
            os.ftruncate(fd, size_bytes)
        finally:
            os.close(fd)
        return cls(path, writable=True)

    def read(self, lba: int, count: int) -> bytes:
        check_range(lba, count, self.size_bytes, ImageError)
        return pread_exact(self._fd, count * SECTOR_SIZE, lba * SECTOR_SIZE, ImageError)

    def write(self, lba: int, data: Buffer) -> None:
        self._check_writable()
        count = check_write_data(data, ImageError)
        check_range(lba, count, self.size_bytes, ImageError)
        pwrite_all(self._fd, data, lba * SECTOR_SIZE)

    def flush(self) -> None:
        if self.writable:
            os.fsync(self._fd)

    def unmap(self, lba: int, count: int) -> None:
        self._check_writable()
        check_range(lba, count, self.size_bytes, ImageError)
        zero_range(self._fd, lba * SECTOR_SIZE, count * SECTOR_SIZE)

    def allocated(self, lba: int, count: int) -> list[tuple[int, int, bool]]:
        check_range(lba, count, self.size_bytes, ImageError)
        byte_runs = data_runs(self._fd, lba * SECTOR_SIZE, count * SECTOR_SIZE)
        runs = sector_runs(byte_runs, lba * SECTOR_SIZE)
        return fill_gaps([(first + lba, n, flag) for first, n, flag in runs], lba, count)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _check_writable(self) -> None:
        if not self.writable:
            raise ImageError("image is open read-only")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
