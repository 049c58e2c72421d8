"""The vhdshare tunnel codec: SCSI requests and responses as versioned packets.

Theory of operation, in the manner of h11 (sans-IO: bytes in, events out):
the VM host packs each SCSI command into a request packet and a node answers
with a response packet.  Both start with a fixed 28-byte header (magic,
version, kind, lengths) followed by a payload whose length the header states:

    request:  header | initiator id (UTF-8) | CDB | data-out (WRITE direction only)
    response: header | sense data | data-in

`NodeConnection` (node side) and `HostConnection` (VM-host side) are fed bytes
in arbitrary chunks with `receive_data` (b"" means end of stream) and hand out
typed events with `next_event`: a `TunnelRequest` / `TunnelResponse`,
`ConnectionClosed`, or `NEED_DATA`.  The framing states and their transitions
are in one table, `_TRANSITIONS`.  Everything is checked strictly — magic,
version, kind, every length against every other, transfer limits, the CDB's
own transfer length against the declared one, request ids — and any violation
raises `TunnelProtocolError`, after which the connection stays broken.  No
other exception escapes the codec.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from clusterfs.pieces import Buffer
from vhdshare.sansio import NEED_DATA, NeedData
from vhdshare.scsi import CheckCondition, OpClass, Status
from vhdshare.scsi_cdb import (
    Read,
    Write,
    data_out_length_bytes,
    decode_cdb,
    lba_range,
)

MAGIC = b"VHDT"
VERSION = 1
SECTOR_SIZE = 512
DEFAULT_MAX_TRANSFER_BYTES = 32 << 20  # the target's maximum transfer length
MAX_INITIATOR_BYTES = 223  # the longest iSCSI name
MIN_CDB_BYTES, MAX_CDB_BYTES = 6, 16
MAX_SENSE_BYTES = 252

# magic, version, kind, direction, CDB length, request id, initiator length, -,
# data length, payload length
REQUEST_HEADER = struct.Struct(">4sBBBBQHHII")
assert REQUEST_HEADER.size == 28
# magic, version, kind, status, sense length, request id, -, -, data length, payload length
RESPONSE_HEADER = struct.Struct(">4sBBBBQHHII")
assert RESPONSE_HEADER.size == 28
HEADER_BYTES = REQUEST_HEADER.size


class TunnelProtocolError(Exception):
    """The peer (or the caller) broke the tunnel protocol."""


class Kind(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2


class Direction(enum.IntEnum):
    NONE = 0
    DATA_OUT = 1  # host → device (writes)
    DATA_IN = 2  # device → host (reads)


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer ended the stream cleanly between packets."""


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    op_class: OpClass
    lba: int | None
    block_count: int
    transfer_length_bytes: int


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    request_id: int
    initiator: str
    cdb: bytes
    direction: Direction
    data_length_bytes: int  # data-out carried, or data-in the host can take
    data_out: Buffer = b""  # unpacked: a view of the packet (bulk data is not copied)

    @property
    def features(self) -> RequestFeatures:
        return request_features(self.cdb, self.data_length_bytes)


@dataclass(frozen=True, slots=True)
class TunnelResponse:
    request_id: int
    status: int
    sense: bytes = b""
    data_in: Buffer = b""  # unpacked: a view of the packet


def request_features(cdb: bytes, transfer_length_bytes: int) -> RequestFeatures:
    """What a request does, from its CDB; an undecodable CDB is OTHER."""
    try:
        command = decode_cdb(cdb)
    except CheckCondition:
        return RequestFeatures(OpClass.OTHER, None, 0, transfer_length_bytes)
    extent = lba_range(command)
    lba, block_count = extent if extent is not None else (None, 0)
    return RequestFeatures(command.op_class, lba, block_count, transfer_length_bytes)


# --- validation shared by packing and unpacking------------------------------------------


def _fail(message: str) -> TunnelProtocolError:
    return TunnelProtocolError(message)


def _check_request(request: TunnelRequest, max_transfer_bytes: int) -> None:
    if not 0 <= request.request_id < 1 << 64:
        raise _fail(f"request id {request.request_id} out of range")
    initiator_bytes = len(request.initiator.encode("utf-8", "surrogatepass"))
    if not 1 <= initiator_bytes <= MAX_INITIATOR_BYTES:
        raise _fail(f"initiator id of {initiator_bytes} bytes")
    if not MIN_CDB_BYTES <= len(request.cdb) <= MAX_CDB_BYTES:
        raise _fail(f"CDB of {len(request.cdb)} bytes")
    if not 0 <= request.data_length_bytes <= max_transfer_bytes:
        raise _fail(f"transfer of {request.data_length_bytes} bytes exceeds the limit")
    carried = request.data_length_bytes if request.direction is Direction.DATA_OUT else 0
    if len(request.data_out) != carried:
        raise _fail("data-out length disagrees with the direction and data length")
    if request.direction is Direction.NONE and request.data_length_bytes:
        raise _fail("a request without data direction declares a data length")
    _check_cdb_agrees(request)


def _check_cdb_agrees(request: TunnelRequest) -> None:
    """The CDB's own transfer length must match the declared direction and length."""
    try:
        command = decode_cdb(request.cdb)
    except CheckCondition:
        return  # the target answers CHECK CONDITION; nothing to compare
    if isinstance(command, Read):
        expected_in = command.block_count * SECTOR_SIZE
        _expect(request, Direction.DATA_IN, expected_in)
        return
    expected_out = data_out_length_bytes(command, SECTOR_SIZE)
    if isinstance(command, Write) or expected_out:
        _expect(request, Direction.DATA_OUT, expected_out)
    elif request.direction is Direction.DATA_OUT:
        raise _fail("data-out sent with a command that takes none")


def _expect(request: TunnelRequest, direction: Direction, length_bytes: int) -> None:
    wanted = direction if length_bytes else Direction.NONE
    if request.direction is not wanted or request.data_length_bytes != length_bytes:
        raise _fail(
            f"CDB transfers {length_bytes} bytes ({wanted.name}), the packet declares "
            f"{request.data_length_bytes} ({request.direction.name})"
        )


def _check_response(response: TunnelResponse, max_transfer_bytes: int) -> None:
    if not 0 <= response.request_id < 1 << 64:
        raise _fail(f"request id {response.request_id} out of range")
    if response.status not in Status._value2member_map_:
        raise _fail(f"unknown SCSI status {response.status:#x}")
    if len(response.sense) > MAX_SENSE_BYTES:
        raise _fail(f"sense data of {len(response.sense)} bytes")
    if response.sense and response.status != Status.CHECK_CONDITION:
        raise _fail("sense data without CHECK CONDITION")
    if len(response.data_in) > max_transfer_bytes:
        raise _fail(f"data-in of {len(response.data_in)} bytes exceeds the limit")


# --- packing-----------------------------------------------------------------------------


def pack_request(
    request: TunnelRequest, max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES
) -> bytes:
    return b"".join(pack_request_pieces(request, max_transfer_bytes))


def pack_request_pieces(
    request: TunnelRequest, max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES
) -> list[Buffer]:
    """The request packet as [everything before the data, the data]: the data not copied."""
    _check_request(request, max_transfer_bytes)
    initiator = request.initiator.encode("utf-8", "surrogatepass")
    payload_bytes = len(initiator) + len(request.cdb) + len(request.data_out)
    header = REQUEST_HEADER.pack(
        MAGIC, VERSION, Kind.REQUEST, request.direction, len(request.cdb), request.request_id,
        len(initiator), 0, request.data_length_bytes, payload_bytes,
    )
    return [b"".join((header, initiator, request.cdb)), request.data_out]


def pack_response(
    response: TunnelResponse, max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES
) -> bytes:
    return b"".join(pack_response_pieces(response, max_transfer_bytes))


def pack_response_pieces(
    response: TunnelResponse, max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES
) -> list[Buffer]:
    """The response packet as [everything before the data, the data]: the data not
    copied."""
    _check_response(response, max_transfer_bytes)
    header = RESPONSE_HEADER.pack(
        MAGIC, VERSION, Kind.RESPONSE, response.status, len(response.sense),
        response.request_id, 0, 0, len(response.data_in),
        len(response.sense) + len(response.data_in),
    )
    return [header + response.sense, response.data_in]


# --- unpacking one frame-----------------------------------------------------------------


def _check_prefix(header: bytes, kind: Kind) -> None:
    magic, version, got_kind = header[:4], header[4], header[5]
    if magic != MAGIC:
        raise _fail(f"bad magic {magic!r}")
    if version != VERSION:
        raise _fail(f"unsupported tunnel version {version}")
    if got_kind != kind:
        raise _fail(f"expected a {kind.name.lower()} packet, got kind {got_kind}")


def _request_payload_length(header: bytes, max_transfer_bytes: int) -> int:
    _check_prefix(header, Kind.REQUEST)
    _, _, _, direction, cdb_len, _, initiator_len, reserved, data_len, payload_len = (
        REQUEST_HEADER.unpack(header)
    )
    if direction not in Direction._value2member_map_ or reserved:
        raise _fail("bad direction or reserved field")
    if data_len > max_transfer_bytes:
        raise _fail(f"transfer of {data_len} bytes exceeds the limit")
    carried = data_len if direction == Direction.DATA_OUT else 0
    if payload_len != initiator_len + cdb_len + carried:
        raise _fail("payload length disagrees with the header's lengths")
    return int(payload_len)


def _response_payload_length(header: bytes, max_transfer_bytes: int) -> int:
    _check_prefix(header, Kind.RESPONSE)
    _, _, _, _, sense_len, _, reserved1, reserved2, data_len, payload_len = (
        RESPONSE_HEADER.unpack(header)
    )
    if reserved1 or reserved2:
        raise _fail("reserved field set")
    if data_len > max_transfer_bytes:
        raise _fail(f"data-in of {data_len} bytes exceeds the limit")
    if payload_len != sense_len + data_len:
        raise _fail("payload length disagrees with the header's lengths")
    return int(payload_len)


def _parse_request(header: bytes, payload: Buffer, max_transfer_bytes: int) -> TunnelRequest:
    _, _, _, direction, cdb_len, request_id, initiator_len, _, data_len, _ = (
        REQUEST_HEADER.unpack(header)
    )
    try:
        initiator = bytes(payload[:initiator_len]).decode("utf-8")
    except UnicodeDecodeError:
        raise _fail("initiator id is not UTF-8") from None
    cdb = bytes(payload[initiator_len : initiator_len + cdb_len])
    data_out = payload[initiator_len + cdb_len :]
    request = TunnelRequest(request_id, initiator, cdb, Direction(direction), data_len, data_out)
    _check_request(request, max_transfer_bytes)
    return request


def _parse_response(header: bytes, payload: Buffer, max_transfer_bytes: int
                    ) -> TunnelResponse:
    _, _, _, status, sense_len, request_id, _, _, _, _ = RESPONSE_HEADER.unpack(header)
    response = TunnelResponse(request_id, status, bytes(payload[:sense_len]),
                              payload[sense_len:])
    _check_response(response, max_transfer_bytes)
    return response


def _one_frame(data: Buffer, kind: Kind, max_transfer_bytes: int) -> tuple[bytes, memoryview]:
    """The header and payload of `data`, which must be exactly one packet of `kind`. The
    framer's checks without its buffer: every copy of a large payload costs (page faults)."""
    if not MAGIC.startswith(bytes(data[: len(MAGIC)])):
        raise _fail(f"bad magic {bytes(data[: len(MAGIC)])!r}")
    if len(data) < HEADER_BYTES:
        raise _fail("stream ends inside a packet header")
    header = bytes(data[:HEADER_BYTES])
    if kind is Kind.REQUEST:
        payload_bytes = _request_payload_length(header, max_transfer_bytes)
    else:
        payload_bytes = _response_payload_length(header, max_transfer_bytes)
    if len(data) < HEADER_BYTES + payload_bytes:
        raise _fail("stream ends inside a packet payload")
    return header, memoryview(data)[HEADER_BYTES : HEADER_BYTES + payload_bytes]


def _no_more(data: Buffer, payload: memoryview, kind: Kind) -> None:
    if len(data) > HEADER_BYTES + len(payload):
        raise _fail(f"not exactly one {kind.name.lower()} packet: bytes after it")


def unpack_request(
    data: Buffer, max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES
) -> TunnelRequest:
    """Exactly one request packet, nothing before or after it."""
    header, payload = _one_frame(data, Kind.REQUEST, max_transfer_bytes)
    with payload:
        request = _parse_request(header, payload, max_transfer_bytes)
        _no_more(data, payload, Kind.REQUEST)
    return request


def unpack_response(
    data: Buffer, max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES
) -> TunnelResponse:
    """Exactly one response packet, nothing before or after it (no request context)."""
    header, payload = _one_frame(data, Kind.RESPONSE, max_transfer_bytes)
    with payload:
        response = _parse_response(header, payload, max_transfer_bytes)
        _no_more(data, payload, Kind.RESPONSE)
    return response


# --- framing: the one state table--------------------------------------------------------


class FramerState(enum.Enum):
    AWAIT_HEADER = "await header"
    AWAIT_PAYLOAD = "await payload"
    CLOSED = "closed"
    ERROR = "error"


class FramerInput(enum.Enum):
    HEADER = "valid header"
    PAYLOAD = "complete payload"
    EOF = "end of stream"
    INVALID = "protocol violation"


_TRANSITIONS: dict[tuple[FramerState, FramerInput], FramerState] = {
    (FramerState.AWAIT_HEADER, FramerInput.HEADER): FramerState.AWAIT_PAYLOAD,
    (FramerState.AWAIT_PAYLOAD, FramerInput.PAYLOAD): FramerState.AWAIT_HEADER,
    (FramerState.AWAIT_HEADER, FramerInput.EOF): FramerState.CLOSED,
    (FramerState.AWAIT_PAYLOAD, FramerInput.EOF): FramerState.ERROR,  # truncated frame
    (FramerState.AWAIT_HEADER, FramerInput.INVALID): FramerState.ERROR,
    (FramerState.AWAIT_PAYLOAD, FramerInput.INVALID): FramerState.ERROR,
}

Frame = tuple[bytes, bytes]  # header, payload


class _Framer:
    """Cuts a byte stream into (header, payload) frames of one kind."""

    def __init__(self, kind: Kind, max_transfer_bytes: int) -> None:
        self.kind = kind
        self.max_transfer_bytes = max_transfer_bytes
        self.state = FramerState.AWAIT_HEADER
        self._buffer = bytearray()
        self._eof = False
        self._header = b""
        self._payload_bytes = 0

    @property
    def has_data(self) -> bool:
        return bool(self._buffer)

    def _move(self, event: FramerInput) -> None:
        self.state = _TRANSITIONS.get((self.state, event), FramerState.ERROR)

    def fail(self, message: str) -> TunnelProtocolError:
        self._move(FramerInput.INVALID)
        return _fail(message)

    def receive_data(self, data: bytes) -> None:
        if self.state is FramerState.ERROR:
            raise _fail("the connection is broken")
        if self._eof:
            raise self.fail("data after the end of the stream")
        if not data:
            self._eof = True
            return
        self._buffer += data

    def next_frame(self) -> Frame | ConnectionClosed | NeedData:
        if self.state is FramerState.ERROR:
            raise _fail("the connection is broken")
        if self.state is FramerState.CLOSED:
            return ConnectionClosed()
        if self.state is FramerState.AWAIT_HEADER:
            waiting = self._take_header()
            if waiting is not None:
                return waiting
        return self._take_payload()

    def _take_header(self) -> ConnectionClosed | NeedData | None:
        prefix = bytes(self._buffer[: len(MAGIC)])
        if not MAGIC.startswith(prefix):  # reject garbage before a whole header arrives
            raise self.fail(f"bad magic {prefix!r}")
        if len(self._buffer) < HEADER_BYTES:
            if not self._eof:
                return NEED_DATA
            if self._buffer:
                raise self.fail("stream ends inside a packet header")
            self._move(FramerInput.EOF)
            return ConnectionClosed()
        header = bytes(self._buffer[:HEADER_BYTES])
        try:
            if self.kind is Kind.REQUEST:
                self._payload_bytes = _request_payload_length(header, self.max_transfer_bytes)
            else:
                self._payload_bytes = _response_payload_length(header, self.max_transfer_bytes)
        except TunnelProtocolError as error:
            raise self.fail(str(error)) from None
        del self._buffer[:HEADER_BYTES]
        self._header = header
        self._move(FramerInput.HEADER)
        return None

    def _take_payload(self) -> Frame | NeedData:
        if len(self._buffer) < self._payload_bytes:
            if self._eof:
                raise self.fail("stream ends inside a packet payload")
            return NEED_DATA
        payload = bytes(self._buffer[: self._payload_bytes])
        del self._buffer[: self._payload_bytes]
        self._move(FramerInput.PAYLOAD)
        return (self._header, payload)


# --- the two ends------------------------------------------------------------------------


class NodeConnection:
    """Node side: request packets in, response packets out."""

    def __init__(self, max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES) -> None:
        self.max_transfer_bytes = max_transfer_bytes
        self._framer = _Framer(Kind.REQUEST, max_transfer_bytes)
        self._data_in_allowance: dict[int, int] = {}  # outstanding request id -> bytes

    @property
    def state(self) -> FramerState:
        return self._framer.state

    @property
    def outstanding(self) -> frozenset[int]:
        return frozenset(self._data_in_allowance)

    def receive_data(self, data: bytes) -> None:
        self._framer.receive_data(bytes(data))

    def next_event(self) -> TunnelRequest | ConnectionClosed | NeedData:
        frame = self._framer.next_frame()
        if not isinstance(frame, tuple):
            return frame
        try:
            request = _parse_request(frame[0], frame[1], self.max_transfer_bytes)
        except TunnelProtocolError as error:
            raise self._framer.fail(str(error)) from None
        if request.request_id in self._data_in_allowance:
            raise self._framer.fail(f"request id {request.request_id} is already outstanding")
        allowance = request.data_length_bytes if request.direction is Direction.DATA_IN else 0
        self._data_in_allowance[request.request_id] = allowance
        return request

    def send_response(self, response: TunnelResponse) -> bytes:
        allowance = self._data_in_allowance.get(response.request_id)
        if allowance is None:
            raise _fail(f"no outstanding request {response.request_id}")
        if len(response.data_in) > allowance:
            raise _fail(f"data-in of {len(response.data_in)} bytes, the host takes {allowance}")
        packet = pack_response(response, self.max_transfer_bytes)
        del self._data_in_allowance[response.request_id]
        return packet


class HostConnection:
    """VM-host side: request packets out, response packets in."""

    def __init__(self, max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES) -> None:
        self.max_transfer_bytes = max_transfer_bytes
        self._framer = _Framer(Kind.RESPONSE, max_transfer_bytes)
        self._data_in_allowance: dict[int, int] = {}

    @property
    def state(self) -> FramerState:
        return self._framer.state

    @property
    def outstanding(self) -> frozenset[int]:
        return frozenset(self._data_in_allowance)

    def send_request(self, request: TunnelRequest) -> list[Buffer]:
        """The request's packet, in pieces (`pack_request_pieces`)."""
        if request.request_id in self._data_in_allowance:
            raise _fail(f"request id {request.request_id} is already outstanding")
        packet = pack_request_pieces(request, self.max_transfer_bytes)
        allowance = request.data_length_bytes if request.direction is Direction.DATA_IN else 0
        self._data_in_allowance[request.request_id] = allowance
        return packet

    def receive_data(self, data: bytes) -> None:
        self._framer.receive_data(bytes(data))

    def receive_packet(self, packet: Buffer) -> TunnelResponse:
        """One whole response packet, as a message-based carrier (the file protocol's
        TUNNEL call) delivers them: the stream's checks without the stream's buffer."""
        if self._framer.state is not FramerState.AWAIT_HEADER or self._framer.has_data:
            raise _fail("packets and stream data cannot be mixed")
        try:
            return self._accept(unpack_response(packet, self.max_transfer_bytes))
        except TunnelProtocolError as error:
            raise self._framer.fail(str(error)) from None

    def next_event(self) -> TunnelResponse | ConnectionClosed | NeedData:
        frame = self._framer.next_frame()
        if not isinstance(frame, tuple):
            return frame
        try:
            response = _parse_response(frame[0], frame[1], self.max_transfer_bytes)
        except TunnelProtocolError as error:
            raise self._framer.fail(str(error)) from None
        return self._accept(response)

    def _accept(self, response: TunnelResponse) -> TunnelResponse:
        allowance = self._data_in_allowance.pop(response.request_id, None)
        if allowance is None:
            raise self._framer.fail(f"response to unknown request {response.request_id}")
        if len(response.data_in) > allowance:
            raise self._framer.fail(f"data-in of {len(response.data_in)} bytes, asked {allowance}")
        return response
