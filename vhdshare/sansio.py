"""What the sans-IO protocol cores (tunnel, NBD, iSCSI) share: the "feed me more bytes" answer.

`next_event()` of each core returns `NEED_DATA` when its buffer holds no whole message, as
h11 does; the driver then reads from its socket and calls `receive_data`.
"""

from __future__ import annotations


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()
