"""The NBD server state machine: `NbdServerConnection` and its one state table, sans-IO.

Theory of operation, in the manner of h11 and `vhdshare.tunnel` (bytes in, events
out): `NbdServerConnection` is fed the client's bytes in arbitrary chunks with
`receive_data` (b"" means end of stream), hands out typed events with
`next_event`, and collects everything the server must send in one outgoing buffer
that the driver empties with `data_to_send` after each round of events.

    handshake:     server greeting → client flags → options … → NBD_OPT_GO (or
                   NBD_OPT_EXPORT_NAME) → `OptionGo`
    transmission:  request headers (+ write payload) → `ReadRequest`, `WriteRequest`,
                   `FlushRequest`, `TrimRequest`, `WriteZeroesRequest`,
                   `BlockStatusRequest`; NBD_CMD_DISC → `Disconnect`

Negotiation is answered by the core itself: NBD_OPT_INFO/GO (NBD_INFO_EXPORT and
NBD_INFO_BLOCK_SIZE, always sent), NBD_OPT_EXPORT_NAME, NBD_OPT_ABORT,
NBD_OPT_LIST, NBD_OPT_STRUCTURED_REPLY and NBD_OPT_{LIST,SET}_META_CONTEXT for
"base:allocation"; any other option gets NBD_REP_ERR_UNSUP, an unknown export
NBD_REP_ERR_UNKNOWN (or, for NBD_OPT_EXPORT_NAME, which cannot fail softly, a
protocol error so the driver hangs up as the spec requires).  The exports are a
mapping from name to `Export` given to the constructor ("" is the default export).

The core also answers every request it can prove invalid — unknown command or flag
(EINVAL), write to a read-only export (EPERM), zero length, misalignment to the
advertised minimum block size or a length over the maximum (EINVAL), a range past
the end (ENOSPC for writes, EINVAL otherwise), block status without a negotiated
context (EINVAL) — so the driver sees only requests it can execute.  A refused
write's payload is still consumed, keeping the stream in sync, up to 32 MiB (the
spec's denial-of-service threshold); a longer write header breaks the connection.
The driver answers each valid request exactly once by handle, in any order, with
`send_read_reply`, `send_ok`, `send_error` or `send_block_status`; the core picks
simple or structured replies as negotiated.  Several requests may be in flight; a
handle that is reused while in flight breaks the connection.

Framing states and transitions are in one table, `_TRANSITIONS`.  Bytes that break
the protocol raise `NbdProtocolError` and leave the connection broken; a caller
that misuses the reply methods gets `NbdProtocolError` too, without breaking it.
No other exception escapes for any input bytes.  The wire format — records, codes,
`Export` and the events — is in `vhdshare.nbd_wire`.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from clusterfs.pieces import Buffer
from vhdshare.nbd_wire import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    BLOCK_DESCRIPTOR,
    CLIENT_FLAGS,
    DOS_PAYLOAD_BYTES,
    ERROR_CHUNK_PREFIX,
    EXPORT_NAME_REPLY,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_OPTION_BYTES,
    MAX_STRING_BYTES,
    NBDMAGIC,
    NEED_DATA,
    OFFSET_DATA_PREFIX,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_REPLY_HEADER,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    ZERO_PAD_BYTES,
    BlockStatusRequest,
    ClientFlag,
    Command,
    CommandFlag,
    ConnectionClosed,
    Disconnect,
    Event,
    Export,
    FlushRequest,
    HandshakeFlag,
    Info,
    Malformed,
    NbdError,
    NbdProtocolError,
    NeedData,
    Option,
    OptionGo,
    OptionReply,
    ReadRequest,
    ReplyType,
    Request,
    TransmissionFlag,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
    decode_string,
    parse_info_request,
    parse_meta_request,
)

_SERVED = frozenset({Command.READ, Command.WRITE, Command.FLUSH, Command.TRIM,
                     Command.WRITE_ZEROES, Command.BLOCK_STATUS})
_WRITING = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_MAX_BLOCK_LIMITED = frozenset({Command.READ, Command.WRITE, Command.WRITE_ZEROES})
_EXTRA_FLAGS = {Command.READ: CommandFlag.DF, Command.WRITE_ZEROES: CommandFlag.NO_HOLE,
                Command.BLOCK_STATUS: CommandFlag.REQ_ONE}


def _fail(message: str) -> NbdProtocolError:
    return NbdProtocolError(message)


def _matching_contexts(queries: list[str], listing: bool) -> list[str]:
    """Contexts a LIST (wildcards allowed) or SET query selects; unknown ones are ignored."""
    if listing and not queries:
        return [BASE_ALLOCATION]
    for query in queries:
        if ":" not in query:
            raise Malformed(f"query {query!r} has no namespace")
    wanted = {BASE_ALLOCATION, "base:"} if listing else {BASE_ALLOCATION}
    return [BASE_ALLOCATION] if wanted.intersection(queries) else []


# --- the one state table --------------------------------------------------------------------


class State(enum.Enum):
    AWAIT_CLIENT_FLAGS = "await client flags"
    NEGOTIATING = "negotiating options"
    TRANSMISSION = "transmission"
    DISCONNECTED = "disconnected"  # the client asked to end; replies may still go out
    CLOSED = "closed"
    ERROR = "error"


class Input(enum.Enum):
    CLIENT_FLAGS = "valid client flags"
    OPTION = "option answered"
    GO = "export chosen"
    ABORT = "NBD_OPT_ABORT"
    REQUEST = "request"
    DISC = "NBD_CMD_DISC"
    EOF = "end of stream"
    INVALID = "protocol violation"


_TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.AWAIT_CLIENT_FLAGS, Input.CLIENT_FLAGS): State.NEGOTIATING,
    (State.AWAIT_CLIENT_FLAGS, Input.EOF): State.CLOSED,
    (State.NEGOTIATING, Input.OPTION): State.NEGOTIATING,
    (State.NEGOTIATING, Input.GO): State.TRANSMISSION,
    (State.NEGOTIATING, Input.ABORT): State.DISCONNECTED,
    (State.NEGOTIATING, Input.EOF): State.CLOSED,
    (State.TRANSMISSION, Input.REQUEST): State.TRANSMISSION,
    (State.TRANSMISSION, Input.DISC): State.DISCONNECTED,
    (State.TRANSMISSION, Input.EOF): State.CLOSED,
    (State.DISCONNECTED, Input.EOF): State.CLOSED,
}  # anything else, INVALID included, leads to ERROR


class _Received:
    """Bytes received and not yet parsed, kept as the pieces they came in: a 1 MiB write
    arrives in pieces of ~200 KiB (the client's socket buffer), and appending them to one
    growing buffer would copy the payload again at every reallocation. Taking copies once."""

    def __init__(self) -> None:
        self._pieces: collections.deque[bytes] = collections.deque()
        self._start = 0  # where the first piece's unread part begins
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        if data:
            self._pieces.append(data)
            self._size += len(data)

    def peek(self, size: int) -> bytes:
        """The first `size` bytes (fewer if fewer are here), left in place."""
        first = self._pieces[0] if self._pieces else b""
        if len(first) - self._start >= size:
            return first[self._start : self._start + size]
        return self._join(min(size, self._size), consume=False)

    def take(self, size: int) -> bytes:
        """The first `size` bytes (all here), removed."""
        first = self._pieces[0] if self._pieces else b""
        if self._start == 0 and len(first) == size:  # a piece that is exactly the payload
            self._pieces.popleft()
            self._size -= size
            return first
        return self._join(size, consume=True)

    def _join(self, size: int, consume: bool) -> bytes:
        parts, needed, start = [], size, self._start
        for piece in self._pieces:
            if not needed:
                break
            view = memoryview(piece)[start : start + needed]
            parts.append(view)
            needed -= len(view)
            start = 0
        data = b"".join(parts)
        if consume:
            self._consume(size)
        return data

    def _consume(self, size: int) -> None:
        self._size -= size
        while size:
            room = len(self._pieces[0]) - self._start
            if size < room:
                self._start += size
                return
            size -= room
            self._pieces.popleft()
            self._start = 0


@dataclass(frozen=True, slots=True)
class _Pending:
    command: Command
    offset_bytes: int
    length_bytes: int
    flags: int


class NbdServerConnection:
    """The server side of one NBD connection."""

    def __init__(self, exports: Mapping[str, Export]) -> None:
        self.exports = exports
        self.state = State.AWAIT_CLIENT_FLAGS
        self._buffer = _Received()
        self._eof = False
        self._out = bytearray(GREETING.pack(NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE
                                            | HandshakeFlag.NO_ZEROES))
        self._fixed_newstyle = self._no_zeroes = self._structured = False
        self._meta_export: str | None = None
        self._meta_contexts: tuple[str, ...] = ()
        self.export: Export | None = None
        self.transmission_flags = 0
        self._pending: dict[int, _Pending] = {}
        self._queued: list[Buffer] = []  # output before `_out`: large replies, uncopied

    @property
    def outstanding(self) -> frozenset[int]:
        return frozenset(self._pending)

    def _move(self, event: Input) -> None:
        self.state = _TRANSITIONS.get((self.state, event), State.ERROR)

    def data_to_send(self) -> bytes:
        return b"".join(self.chunks_to_send())

    def chunks_to_send(self) -> list[Buffer]:
        """`data_to_send` in pieces, in order, without copying read data into one buffer
        (a driver may send them one by one: a 1 MiB copy costs more than a system call)."""
        chunks = self._queued
        self._queued = []
        if self._out:
            chunks.append(bytes(self._out))
            self._out.clear()
        return chunks

    def _emit_large(self, head: bytes, data: Buffer) -> None:
        if self._out:
            self._queued.append(bytes(self._out))
            self._out.clear()
        self._queued += (head, data)

    def receive_data(self, data: bytes) -> None:
        if self.state is State.ERROR:
            raise _fail("the connection is broken")
        if self._eof:
            self._move(Input.INVALID)
            raise _fail("data after the end of the stream")
        if not data:
            self._eof = True
            return
        self._buffer.append(data)

    def next_event(self) -> Event | NeedData:
        while True:
            if self.state is State.ERROR:
                raise _fail("the connection is broken")
            if self.state is State.CLOSED:
                return ConnectionClosed()
            try:
                event = self._step()
            except NbdProtocolError:
                self._move(Input.INVALID)
                raise
            if event is not None:
                return event

    # --- reading ----------------------------------------------------------------------------

    def _step(self) -> Event | NeedData | None:
        if not self._buffer and self._eof:
            self._move(Input.EOF)  # a clean end between messages
            return None
        if self.state is State.AWAIT_CLIENT_FLAGS:
            return self._read_client_flags()
        if self.state is State.NEGOTIATING:
            return self._read_option()
        if self.state is State.TRANSMISSION:
            return self._read_request()
        if self._buffer:
            raise _fail("data after the client asked to disconnect")
        return NEED_DATA

    def _available(self, size: int, what: str) -> bool:
        if len(self._buffer) >= size:
            return True
        if self._eof:
            raise _fail(f"stream ends inside {what}")
        return False

    def _take(self, size: int) -> bytes:
        return self._buffer.take(size)

    def _read_client_flags(self) -> NeedData | None:
        if not self._available(CLIENT_FLAGS.size, "the client flags"):
            return NEED_DATA
        (flags,) = CLIENT_FLAGS.unpack(self._take(CLIENT_FLAGS.size))
        if flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
            raise _fail(f"unknown client flags {flags:#x}")
        self._fixed_newstyle = bool(flags & ClientFlag.FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._move(Input.CLIENT_FLAGS)
        return None

    def _read_option(self) -> Event | NeedData | None:
        if not IHAVEOPT.startswith(self._buffer.peek(8)):
            raise _fail(f"bad option magic {self._buffer.peek(8)!r}")
        if not self._available(OPTION_HEADER.size, "an option header"):
            return NEED_DATA
        _, option, length = OPTION_HEADER.unpack(self._buffer.peek(OPTION_HEADER.size))
        if length > MAX_OPTION_BYTES:
            raise _fail(f"option {option} carries {length} bytes")
        if not self._available(OPTION_HEADER.size + length, "option data"):
            return NEED_DATA
        data = self._take(OPTION_HEADER.size + length)[OPTION_HEADER.size :]
        if option != Option.EXPORT_NAME and not self._fixed_newstyle:
            raise _fail(f"option {option} from a client without fixed newstyle")
        return self._answer_option(option, data)

    def _read_request(self) -> Event | NeedData | None:
        prefix = self._buffer.peek(4)
        if not REQUEST_MAGIC.to_bytes(4, "big").startswith(prefix):
            raise _fail(f"bad request magic {prefix!r}")
        if not self._available(REQUEST_HEADER.size, "a request header"):
            return NEED_DATA
        _, flags, kind, handle, offset, length = REQUEST_HEADER.unpack(
            self._buffer.peek(REQUEST_HEADER.size))
        payload_bytes = length if kind == Command.WRITE else 0
        if payload_bytes > max(DOS_PAYLOAD_BYTES, self._limits().max_block_bytes):
            raise _fail(f"write payload of {length} bytes")
        if not self._available(REQUEST_HEADER.size + payload_bytes, "a write payload"):
            return NEED_DATA
        self._buffer.take(REQUEST_HEADER.size)
        payload = self._take(payload_bytes) if payload_bytes else b""
        if kind == Command.DISC:  # no reply, so its handle may be anything
            if offset or length or flags & ~int(CommandFlag.FUA):
                raise _fail("NBD_CMD_DISC with offset, length or flags")
            self._move(Input.DISC)
            return Disconnect()
        if handle in self._pending:
            raise _fail(f"handle {handle:#x} is already in flight")
        self._move(Input.REQUEST)
        refusal = self._refusal(kind, flags, offset, length)
        if refusal is not None:
            self._out += self._error_reply(handle, *refusal)
            return None
        command = Command(kind)
        self._pending[handle] = _Pending(command, offset, length, flags)
        return _request_event(command, handle, flags, offset, length, payload,
                              self._meta_contexts)

    def _limits(self) -> Export:
        assert self.export is not None  # only called in transmission
        return self.export

    def _refusal(self, kind: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        """The error the core answers an invalid request with, or None if it is valid."""
        if kind not in _SERVED:
            return NbdError.EINVAL, f"unsupported command {kind}"
        command, export = Command(kind), self._limits()
        allowed = int(CommandFlag.FUA | _EXTRA_FLAGS.get(command, 0))
        if not self.transmission_flags & TransmissionFlag.SEND_DF:
            allowed &= ~int(CommandFlag.DF)
        if flags & ~allowed:
            return NbdError.EINVAL, f"flags {flags:#x} not valid for {command.name}"
        if command is Command.FLUSH:
            return (NbdError.EINVAL, "flush with offset or length") if offset or length else None
        if command in _WRITING and export.read_only:
            return NbdError.EPERM, "the export is read-only"
        if command is Command.BLOCK_STATUS and not self._meta_contexts:
            return NbdError.EINVAL, "no metadata context was negotiated"
        if length == 0:
            return NbdError.EINVAL, "zero-length request"
        if offset % export.min_block_bytes or length % export.min_block_bytes:
            return NbdError.EINVAL, f"not aligned to {export.min_block_bytes} bytes"
        if command in _MAX_BLOCK_LIMITED and length > export.max_block_bytes:
            return NbdError.EINVAL, f"longer than {export.max_block_bytes} bytes"
        if offset + length > export.size_bytes:
            writing = command in (Command.WRITE, Command.WRITE_ZEROES)
            return NbdError.ENOSPC if writing else NbdError.EINVAL, "beyond the end of the export"
        return None

    # --- negotiation ------------------------------------------------------------------------

    def _answer_option(self, option: int, data: bytes) -> Event | None:
        if option == Option.EXPORT_NAME:
            return self._export_name(data)
        if option == Option.ABORT:
            self._option_reply(option, OptionReply.ACK)
            self._move(Input.ABORT)
            return Disconnect()
        event = None
        try:
            if option in (Option.INFO, Option.GO):
                event = self._info_or_go(option, *parse_info_request(data))
            elif option == Option.LIST:
                self._list(data)
            elif option == Option.STRUCTURED_REPLY:
                self._structured_reply(data)
            elif option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
                self._meta_context(option, data)
            else:
                self._option_reply(option, OptionReply.ERR_UNSUP, f"option {option} unsupported")
        except Malformed as error:
            self._option_reply(option, OptionReply.ERR_INVALID, str(error))
        if event is None:
            self._move(Input.OPTION)
        return event

    def _option_reply(self, option: int, reply: OptionReply, data: bytes | str = b"") -> None:
        payload = data.encode() if isinstance(data, str) else data
        self._out += OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(payload))
        self._out += payload

    def _flags_for(self, export: Export) -> int:
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
        if export.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
        if self._structured:
            flags |= TransmissionFlag.SEND_DF
        if export.multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        return int(flags)

    def _export_name(self, data: bytes) -> OptionGo:
        name = decode_string(data)
        export = None if name is None else self.exports.get(name)
        if name is None or export is None:
            raise _fail(f"NBD_OPT_EXPORT_NAME for unknown export {data[:64]!r}")
        flags = self._flags_for(export)
        self._out += EXPORT_NAME_REPLY.pack(export.size_bytes, flags)
        self._out += b"" if self._no_zeroes else bytes(ZERO_PAD_BYTES)
        return self._go(name, export, flags, via_export_name=True)

    def _info_or_go(self, option: int, name: str, items: frozenset[int]) -> OptionGo | None:
        export = self.exports.get(name)
        if export is None:
            self._option_reply(option, OptionReply.ERR_UNKNOWN, f"no export named {name!r}")
            return None
        flags = self._flags_for(export)
        self._option_reply(option, OptionReply.INFO,
                           INFO_EXPORT.pack(Info.EXPORT, export.size_bytes, flags))
        self._option_reply(option, OptionReply.INFO, INFO_BLOCK_SIZE.pack(
            Info.BLOCK_SIZE, export.min_block_bytes, export.preferred_block_bytes,
            export.max_block_bytes))
        if Info.DESCRIPTION in items and export.description:
            self._option_reply(option, OptionReply.INFO,
                               U16.pack(Info.DESCRIPTION) + export.description.encode())
        self._option_reply(option, OptionReply.ACK)
        if option == Option.INFO:
            return None
        return self._go(name, export, flags, via_export_name=False)

    def _go(self, name: str, export: Export, flags: int, via_export_name: bool) -> OptionGo:
        self.export, self.transmission_flags = export, flags
        if self._meta_export != name:
            self._meta_contexts = ()  # contexts were negotiated for another export
        self._move(Input.GO)
        return OptionGo(name, export.size_bytes, flags, self._structured, self._meta_contexts,
                        via_export_name)

    def _list(self, data: bytes) -> None:
        if data:
            raise Malformed("NBD_OPT_LIST carries data")
        for name in self.exports:
            encoded = name.encode()
            self._option_reply(Option.LIST, OptionReply.SERVER, U32.pack(len(encoded)) + encoded)
        self._option_reply(Option.LIST, OptionReply.ACK)

    def _structured_reply(self, data: bytes) -> None:
        if data or self._structured:
            raise Malformed("NBD_OPT_STRUCTURED_REPLY with data or repeated")
        self._structured = True
        self._option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK)

    def _meta_context(self, option: int, data: bytes) -> None:
        setting = option == Option.SET_META_CONTEXT
        if setting:  # replaces the previous selection, even when it fails
            self._meta_export, self._meta_contexts = None, ()
        if not self._structured:
            raise Malformed("negotiate structured replies first")
        name, queries = parse_meta_request(data)
        if name not in self.exports:
            self._option_reply(option, OptionReply.ERR_UNKNOWN, f"no export named {name!r}")
            return
        contexts = _matching_contexts(queries, listing=not setting)
        for context in contexts:
            context_id = BASE_ALLOCATION_ID if setting else 0
            self._option_reply(option, OptionReply.META_CONTEXT,
                               U32.pack(context_id) + context.encode())
        if setting:
            self._meta_export, self._meta_contexts = name, tuple(contexts)
        self._option_reply(option, OptionReply.ACK)

    # --- replies ----------------------------------------------------------------------------

    def _pending_for(self, handle: int, *commands: Command) -> _Pending:
        pending = self._pending.get(handle)
        if pending is None:
            raise _fail(f"no request with handle {handle:#x} in flight")
        if pending.command not in commands:
            raise _fail(f"{pending.command.name} request {handle:#x} cannot take this reply")
        return pending

    def _chunk(self, handle: int, kind: ReplyType, payload: bytes) -> bytes:
        return STRUCTURED_REPLY_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, kind,
                                            handle, len(payload)) + payload

    def _error_reply(self, handle: int, error: int, message: str) -> bytes:
        if not self._structured:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
        text = message.encode()[:MAX_STRING_BYTES]
        return self._chunk(handle, ReplyType.ERROR,
                           ERROR_CHUNK_PREFIX.pack(error, len(text)) + text)

    def send_read_reply(self, handle: int, data: Buffer) -> None:
        pending = self._pending_for(handle, Command.READ)
        if len(data) != pending.length_bytes:
            raise _fail(f"read reply of {len(data)} bytes, {pending.length_bytes} requested")
        if self._structured:
            prefix = OFFSET_DATA_PREFIX.pack(pending.offset_bytes)
            head = STRUCTURED_REPLY_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                                ReplyType.OFFSET_DATA, handle,
                                                len(prefix) + len(data))
            self._emit_large(head + prefix, data)
        else:
            self._emit_large(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle), data)
        del self._pending[handle]

    def send_ok(self, handle: int) -> None:
        self._pending_for(handle, Command.WRITE, Command.FLUSH, Command.TRIM,
                          Command.WRITE_ZEROES)
        self._out += SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)
        del self._pending[handle]

    def send_error(self, handle: int, error: int, message: str = "") -> None:
        self._pending_for(handle, *Command)
        if error not in NbdError._value2member_map_:
            raise _fail(f"{error} is not an NBD error code")
        self._out += self._error_reply(handle, error, message)
        del self._pending[handle]

    def send_block_status(self, handle: int, extents: Sequence[tuple[int, int]]) -> None:
        """Extents (length_bytes, STATE_* flags) from the request's offset on.

        They are clipped to the requested range (to one extent for REQ_ONE) and
        neighbours with equal flags are merged.
        """
        pending = self._pending_for(handle, Command.BLOCK_STATUS)
        descriptors = _clip_extents(pending, extents, self._limits().min_block_bytes)
        payload = U32.pack(BASE_ALLOCATION_ID) + b"".join(
            BLOCK_DESCRIPTOR.pack(length, flags) for length, flags in descriptors)
        self._out += self._chunk(handle, ReplyType.BLOCK_STATUS, payload)
        del self._pending[handle]


def _clip_extents(pending: _Pending, extents: Sequence[tuple[int, int]],
                  min_block_bytes: int) -> list[tuple[int, int]]:
    clipped: list[tuple[int, int]] = []
    covered = 0
    for length, flags in extents:
        if length <= 0 or length % min_block_bytes or flags & ~(STATE_HOLE | STATE_ZERO):
            raise _fail(f"invalid extent ({length}, {flags})")
        length = min(length, pending.length_bytes - covered)
        if clipped and clipped[-1][1] == flags:
            clipped[-1] = (clipped[-1][0] + length, flags)
        elif clipped and pending.flags & CommandFlag.REQ_ONE:
            break
        else:
            clipped.append((length, flags))
        covered += length
        if covered == pending.length_bytes:
            break
    if not clipped:
        raise _fail("block status needs at least one extent")
    return clipped


def _request_event(command: Command, handle: int, flags: int, offset: int, length: int,
                   payload: bytes, contexts: tuple[str, ...]) -> Request:
    fua = bool(flags & CommandFlag.FUA)
    if command is Command.READ:
        return ReadRequest(handle, offset, length)
    if command is Command.WRITE:
        return WriteRequest(handle, offset, payload, fua)
    if command is Command.FLUSH:
        return FlushRequest(handle)
    if command is Command.TRIM:
        return TrimRequest(handle, offset, length, fua)
    if command is Command.WRITE_ZEROES:
        return WriteZeroesRequest(handle, offset, length, fua, bool(flags & CommandFlag.NO_HOLE))
    return BlockStatusRequest(handle, offset, length, bool(flags & CommandFlag.REQ_ONE), contexts)
