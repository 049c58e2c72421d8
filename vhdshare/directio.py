"""Reads and writes that bypass the page cache (O_DIRECT), for disks that several hosts share.

Why: a node writes a shared disk's file in the common block directory while other hosts
read it; a page cache on each host would serve stale data (rule 6 of the design: shared VM
disks bypass the page cache). O_DIRECT moves data between the device and the caller's
buffer, so every read sees what the storage holds.

O_DIRECT wants the buffer, the offset and the length aligned to the device's logical block.
`open_direct` opens with O_DIRECT and checks that an aligned read of `ALIGN_BYTES` works;
where the file system refuses O_DIRECT (tmpfs) or needs a larger alignment, it opens the file
without it and says so (the caller learns it from `is_direct`). `pread` and `pwrite` take
any offset and length: buffers come from anonymous mmaps (page-aligned), and a write that
does not cover whole aligned blocks reads the blocks around it first (read-modify-write), so
the caller must hold whatever lock keeps others from writing those bytes meanwhile (in the
VHD code only BAT entries are such writes, and they are written under the growth lock).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading

ALIGN_BYTES = 512
MIN_BUFFER_BYTES = 1 << 20
O_DIRECT = getattr(os, "O_DIRECT", 0)


def open_direct(path: str, flags: int) -> int:
    """`os.open(path, flags)`, with O_DIRECT where the file system takes it."""
    if O_DIRECT:
        try:
            fd = os.open(path, flags | O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        else:
            if _aligned_read_works(fd):
                return fd
            os.close(fd)
    return os.open(path, flags)


def is_direct(fd: int) -> bool:
    return bool(O_DIRECT) and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)


def _aligned_read_works(fd: int) -> bool:
    buffer = mmap.mmap(-1, ALIGN_BYTES)
    try:
        os.preadv(fd, [buffer], 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        buffer.close()
    return True


def _span(offset_bytes: int, length_bytes: int) -> tuple[int, int]:
    """The aligned byte range [start, end) that covers [offset, offset+length)."""
    start = offset_bytes - offset_bytes % ALIGN_BYTES
    end = -(-(offset_bytes + length_bytes) // ALIGN_BYTES) * ALIGN_BYTES
    return start, end


class _Buffers(threading.local):
    """One page-aligned buffer per thread, kept: a fresh mmap costs a page fault per 4 KiB
    on first touch, which made a 1 MiB direct write take three times its device time."""

    buffer: mmap.mmap | None = None

    def get(self, length_bytes: int) -> mmap.mmap:
        if self.buffer is None or len(self.buffer) < length_bytes:
            if self.buffer is not None:
                self.buffer.close()
            self.buffer = mmap.mmap(-1, max(length_bytes, MIN_BUFFER_BYTES))
        return self.buffer


_buffers = _Buffers()


def pread(fd: int, length_bytes: int, offset_bytes: int) -> bytes:
    """Up to `length_bytes` at `offset_bytes` (fewer at the end of the file), as os.pread."""
    if length_bytes <= 0:
        return b""
    start, end = _span(offset_bytes, length_bytes)
    with memoryview(_buffers.get(end - start))[:end - start] as window:
        got = os.preadv(fd, [window], start)
        skip = offset_bytes - start
        return bytes(window[skip:max(skip, min(got, skip + length_bytes))])


def pwrite(fd: int, data: bytes | bytearray | memoryview, offset_bytes: int) -> None:
    """Write all of `data` at `offset_bytes`."""
    view = memoryview(data).cast("B")
    if not view:
        return
    start, end = _span(offset_bytes, len(view))
    with memoryview(_buffers.get(end - start))[:end - start] as window:
        if (start, end) != (offset_bytes, offset_bytes + len(view)):
            os.preadv(fd, [window], start)  # the bytes around the write
            # Past the end of the file there is nothing to read: those bytes must be zeros.
            got_to = max(0, os.fstat(fd).st_size - start)
            window[got_to:] = bytes(max(0, len(window) - got_to))
        skip = offset_bytes - start
        window[skip:skip + len(view)] = view
        file_end = os.fstat(fd).st_size
        done = 0
        while start + done < end:
            done += os.pwritev(fd, [window[done:]], start + done)
        if end > file_end:
            # Writing whole blocks may have grown the file past the data's end: cut it back.
            os.ftruncate(fd, max(file_end, offset_bytes + len(view)))
