"""The NBD wire format, as the server core sees it: everything about bytes, no state.

The magic numbers and limits; one `struct.Struct` per record of the protocol spec,
size asserted; the enums for flags, options, option replies, info types, commands,
reply types and errors; `Export`, what the server offers under one name; the typed
events `vhdshare.nbd.NbdServerConnection` hands out, with `NEED_DATA`; and the parsers
for option data, which raise `Malformed` on anything that does not parse.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from vhdshare.sansio import NEED_DATA, NeedData  # noqa: F401 (re-exported with the events)

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

ZERO_PAD_BYTES = 124
MAX_STRING_BYTES = 4096
MAX_OPTION_BYTES = 64 << 10
DOS_PAYLOAD_BYTES = 32 << 20  # writes up to this long are consumed even when refused
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1
STATE_HOLE, STATE_ZERO = 1, 2
REPLY_FLAG_DONE = 1

# NBDMAGIC, IHAVEOPT, handshake flags
GREETING = struct.Struct(">8s8sH")
assert GREETING.size == 18
CLIENT_FLAGS = struct.Struct(">I")
assert CLIENT_FLAGS.size == 4
# IHAVEOPT, option, data length
OPTION_HEADER = struct.Struct(">8sII")
assert OPTION_HEADER.size == 16
# magic, option, reply type, data length
OPTION_REPLY_HEADER = struct.Struct(">QIII")
assert OPTION_REPLY_HEADER.size == 20
# size, transmission flags (then 124 zero bytes unless NO_ZEROES)
EXPORT_NAME_REPLY = struct.Struct(">QH")
assert EXPORT_NAME_REPLY.size == 10
# NBD_INFO_EXPORT, size, transmission flags
INFO_EXPORT = struct.Struct(">HQH")
assert INFO_EXPORT.size == 12
# NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
INFO_BLOCK_SIZE = struct.Struct(">HIII")
assert INFO_BLOCK_SIZE.size == 14
# magic, command flags, type, handle, offset, length
REQUEST_HEADER = struct.Struct(">IHHQQI")
assert REQUEST_HEADER.size == 28
# magic, error, handle
SIMPLE_REPLY = struct.Struct(">IIQ")
assert SIMPLE_REPLY.size == 16
# magic, flags, type, handle, payload length
STRUCTURED_REPLY_HEADER = struct.Struct(">IHHQI")
assert STRUCTURED_REPLY_HEADER.size == 20
OFFSET_DATA_PREFIX = struct.Struct(">Q")
assert OFFSET_DATA_PREFIX.size == 8
# error, message length (then the message)
ERROR_CHUNK_PREFIX = struct.Struct(">IH")
assert ERROR_CHUNK_PREFIX.size == 6
# extent length, status flags
BLOCK_DESCRIPTOR = struct.Struct(">II")
assert BLOCK_DESCRIPTOR.size == 8
U16, U32 = struct.Struct(">H"), struct.Struct(">I")


class NbdProtocolError(Exception):
    """The client (or the caller) broke the NBD protocol."""


# Masks are inverted as plain ints: ~ on an IntFlag keeps only its defined bits,
# which would let unknown bits from the peer through.
class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1
    NO_ZEROES = 2


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1
    NO_ZEROES = 2


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class OptionReply(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_TOO_BIG = (1 << 31) + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class NbdError(enum.IntEnum):
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


@dataclass(frozen=True, slots=True)
class Export:
    """What the server offers under one name; block sizes as advertised to clients."""

    size_bytes: int
    read_only: bool = False
    multi_conn: bool = False
    description: str = ""
    min_block_bytes: int = 512
    preferred_block_bytes: int = 4096
    max_block_bytes: int = 32 << 20

    def __post_init__(self) -> None:
        low, high = self.min_block_bytes, self.max_block_bytes
        preferred = self.preferred_block_bytes
        if not 0 <= self.size_bytes < 1 << 63 or self.size_bytes % low:
            raise ValueError(f"export size {self.size_bytes} is not a multiple of {low}")
        if low & (low - 1) or not 1 <= low <= 1 << 16:
            raise ValueError(f"minimum block size {low} is not a power of 2 up to 64 KiB")
        if preferred & (preferred - 1) or preferred < max(low, 512):
            raise ValueError(f"preferred block size {preferred} is invalid")
        if high % low or not low <= high <= 1 << 31:
            raise ValueError(f"maximum block size {high} is invalid")
        if len(self.description.encode()) > MAX_STRING_BYTES:
            raise ValueError("export description too long")


@dataclass(frozen=True, slots=True)
class OptionGo:
    """Negotiation ended (NBD_OPT_GO, or NBD_OPT_EXPORT_NAME); transmission begins."""

    export_name: str
    size_bytes: int
    transmission_flags: int
    structured_replies: bool
    contexts: tuple[str, ...]  # selected metadata contexts: () or ("base:allocation",)
    via_export_name: bool = False


@dataclass(frozen=True, slots=True)
class ReadRequest:
    handle: int
    offset_bytes: int
    length_bytes: int


@dataclass(frozen=True, slots=True)
class WriteRequest:
    handle: int
    offset_bytes: int
    data: bytes
    fua: bool


@dataclass(frozen=True, slots=True)
class FlushRequest:
    handle: int


@dataclass(frozen=True, slots=True)
class TrimRequest:
    handle: int
    offset_bytes: int
    length_bytes: int
    fua: bool


@dataclass(frozen=True, slots=True)
class WriteZeroesRequest:
    handle: int
    offset_bytes: int
    length_bytes: int
    fua: bool
    no_hole: bool


@dataclass(frozen=True, slots=True)
class BlockStatusRequest:
    """Answer with `send_block_status`: extents of the "base:allocation" context."""

    handle: int
    offset_bytes: int
    length_bytes: int
    req_one: bool
    contexts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC or NBD_OPT_ABORT: answer what is in flight, then close."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client ended the stream between messages."""


Request = (ReadRequest | WriteRequest | FlushRequest | TrimRequest | WriteZeroesRequest
           | BlockStatusRequest)
Event = OptionGo | Request | Disconnect | ConnectionClosed


class Malformed(Exception):
    """Option data that does not parse; answered with NBD_REP_ERR_INVALID."""


class _Reader:
    """Reads fields from option data; anything missing or left over is `Malformed`."""

    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def take(self, size: int) -> bytes:
        if size > len(self._data) - self._at:
            raise Malformed("option data too short")
        self._at += size
        return self._data[self._at - size : self._at]

    def u16(self) -> int:
        return int(U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(U32.unpack(self.take(4))[0])

    def string(self, size: int) -> str:
        text = decode_string(self.take(size))
        if text is None:
            raise Malformed("string is too long, not UTF-8, or contains NUL")
        return text

    def end(self) -> None:
        if self._at != len(self._data):
            raise Malformed("trailing bytes in option data")


def decode_string(raw: bytes) -> str | None:
    if len(raw) > MAX_STRING_BYTES or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_info_request(data: bytes) -> tuple[str, frozenset[int]]:
    reader = _Reader(data)
    name = reader.string(reader.u32())
    items = frozenset(reader.u16() for _ in range(reader.u16()))
    reader.end()
    return name, items


def parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    reader = _Reader(data)
    name = reader.string(reader.u32())
    count = reader.u32()
    if count > len(data) // 4:
        raise Malformed(f"{count} queries cannot fit")
    queries = [reader.string(reader.u32()) for _ in range(count)]
    reader.end()
    return name, queries
