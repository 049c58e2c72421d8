"""Process-wide malloc settings for processes that move large buffers (nodes, VM-host front
ends).

glibc hands out every allocation of 128 KiB or more as a fresh mmap and returns it to the
kernel when freed, so each 1 MiB message, packet or disk buffer costs 256 page faults and
zeroed pages before its first byte is written: measured on this project's 2-core VM, 1 MiB
NBD writes through the tunnel took 945 minor faults and 8 ms of CPU per MiB in the front end,
and 6 faults and 4.8 ms with these settings (docs/benchmarks.md, front ends). Keeping freed
memory in the heap trades some resident memory (up to `TRIM_THRESHOLD_BYTES` beyond the
peak in use) for that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's upper limit on 64-bit hosts
TRIM_THRESHOLD_BYTES = 128 << 20


def keep_freed_memory() -> bool:
    """Serve buffers up to 32 MiB from the heap and keep freed ones; False where the C
    library is not glibc (nothing changes then)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) \
        and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not done:
        log.debug("mallopt refused the settings; large buffers stay mmapped")
    return done
