"""The NBD server core against a scripted client: exact bytes of whole sessions fed
whole, byte by byte and with trailing bytes; every option; the requests the core
refuses itself; reply-method misuse; and a fuzz where only NbdProtocolError escapes.

The client side is built here with plain struct calls, independent of the module's
own record definitions, so a misread of the spec shows up as a byte mismatch.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhdshare.nbd import NbdServerConnection, State
from vhdshare.nbd_wire import (
    NEED_DATA,
    BlockStatusRequest,
    ConnectionClosed,
    Disconnect,
    Export,
    FlushRequest,
    NbdProtocolError,
    OptionGo,
    ReadRequest,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)

SIZE = 1 << 20
EXPORTS = {"": Export(SIZE, description="the default disk"), "ro": Export(SIZE, read_only=True)}

# option and reply numbers from the spec, spelled out independently of the module
EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO = 1, 2, 3, 5, 6, 7
STRUCTURED_REPLY, LIST_META, SET_META, EXTENDED_HEADERS = 8, 9, 10, 11
ACK, SERVER, REP_INFO, META_CONTEXT = 1, 2, 3, 4
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN = 2**31 + 1, 2**31 + 3, 2**31 + 6
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
EPERM, EINVAL, ENOSPC, EIO = 1, 22, 28, 5
# HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES (+ SEND_DF when structured)
FLAGS_SIMPLE = 1 | 4 | 8 | 32 | 64
FLAGS_STRUCTURED = FLAGS_SIMPLE | 128

GREETING = b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3)


# --- the scripted client ----------------------------------------------------------------------


def opt(option: int, data: bytes = b"") -> bytes:
    return b"IHAVEOPT" + struct.pack(">II", option, len(data)) + data


def s32(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">I", len(raw)) + raw


def info_data(name: str, *items: int) -> bytes:
    return s32(name) + struct.pack(">H", len(items)) + b"".join(struct.pack(">H", i) for i in items)


def meta_data(name: str, *queries: str) -> bytes:
    return s32(name) + struct.pack(">I", len(queries)) + b"".join(s32(q) for q in queries)


def req(kind: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0,
        payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, kind, handle, offset, length) + payload


# --- what the server must send ----------------------------------------------------------------


def rep(option: int, reply: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", 0x3E889045565A9, option, reply, len(data)) + data


def info_replies(option: int, size: int, flags: int) -> bytes:
    return (rep(option, REP_INFO, struct.pack(">HQH", 0, size, flags))
            + rep(option, REP_INFO, struct.pack(">HIII", 3, 512, 4096, 32 << 20)))


def simple(handle: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", 0x67446698, error, handle) + data


def chunk(handle: int, kind: int, payload: bytes, flags: int = 1) -> bytes:
    return struct.pack(">IHHQI", 0x668E33EF, flags, kind, handle, len(payload)) + payload


def error_chunk(handle: int, error: int, message: str) -> bytes:
    text = message.encode()
    return chunk(handle, 0x8001, struct.pack(">IH", error, len(text)) + text)


# --- a driver over an in-memory disk ----------------------------------------------------------


class Disk:
    """Answers every request; block status says the first 64 KiB are data."""

    def __init__(self) -> None:
        self.data = bytearray(SIZE)
        self.flushes = 0

    def answer(self, conn: NbdServerConnection, event: object) -> None:
        if isinstance(event, ReadRequest):
            start = event.offset_bytes
            conn.send_read_reply(event.handle, bytes(self.data[start : start + event.length_bytes]))
        elif isinstance(event, WriteRequest):
            self.data[event.offset_bytes : event.offset_bytes + len(event.data)] = event.data
            conn.send_ok(event.handle)
        elif isinstance(event, TrimRequest | WriteZeroesRequest):
            end = event.offset_bytes + event.length_bytes
            self.data[event.offset_bytes : end] = bytes(event.length_bytes)
            conn.send_ok(event.handle)
        elif isinstance(event, FlushRequest):
            self.flushes += 1
            conn.send_ok(event.handle)
        elif isinstance(event, BlockStatusRequest):
            conn.send_block_status(event.handle, [(65536, 0), (SIZE - 65536, 3)][
                event.offset_bytes >= 65536 :])


def drain(conn: NbdServerConnection, disk: Disk | None = None) -> list[object]:
    events: list[object] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if disk is not None:
            disk.answer(conn, event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def serve(chunks: Iterable[bytes], exports: dict[str, Export] | None = None,
          ) -> tuple[list[object], bytes, NbdServerConnection]:
    conn, disk = NbdServerConnection(EXPORTS if exports is None else exports), Disk()
    events: list[object] = []
    out = conn.data_to_send()
    for piece in chunks:
        conn.receive_data(piece)
        events += drain(conn, disk)
        out += conn.data_to_send()
    return events, out, conn


def state_of(conn: NbdServerConnection) -> State:
    return conn.state


def one_chunk(*parts: bytes) -> list[bytes]:
    return [b"".join(parts)]


HANDSHAKE = b"".join([
    struct.pack(">I", 3),
    opt(STRUCTURED_REPLY),
    opt(SET_META, meta_data("", "base:allocation")),
    opt(GO, info_data("", 3)),
])
HANDSHAKE_REPLY = b"".join([
    GREETING,
    rep(STRUCTURED_REPLY, ACK),
    rep(SET_META, META_CONTEXT, struct.pack(">I", 1) + b"base:allocation"),
    rep(SET_META, ACK),
    info_replies(GO, SIZE, FLAGS_STRUCTURED),
    rep(GO, ACK),
])
GO_EVENT = OptionGo("", SIZE, FLAGS_STRUCTURED, True, ("base:allocation",))

PATTERN = bytes(range(256)) * 16  # 4 KiB
SESSION = b"".join([
    req(WRITE, 1, 4096, 4096, FUA, PATTERN),
    req(READ, 2, 4096, 4096),
    req(FLUSH, 3),
    req(TRIM, 4, 8192, 4096),
    req(WRITE_ZEROES, 5, 12288, 8192, NO_HOLE),
    req(BLOCK_STATUS, 6, 0, SIZE),
    req(BLOCK_STATUS, 7, 65536, 4096, REQ_ONE),
    req(DISC, 8),
])
SESSION_EVENTS = [
    GO_EVENT,
    WriteRequest(1, 4096, PATTERN, True),
    ReadRequest(2, 4096, 4096),
    FlushRequest(3),
    TrimRequest(4, 8192, 4096, False),
    WriteZeroesRequest(5, 12288, 8192, False, True),
    BlockStatusRequest(6, 0, SIZE, False, ("base:allocation",)),
    BlockStatusRequest(7, 65536, 4096, True, ("base:allocation",)),
    Disconnect(),
]
SESSION_REPLY = b"".join([
    simple(1),
    chunk(2, 1, struct.pack(">Q", 4096) + PATTERN),
    simple(3),
    simple(4),
    simple(5),
    chunk(6, 5, struct.pack(">IIIII", 1, 65536, 0, SIZE - 65536, 3)),
    chunk(7, 5, struct.pack(">III", 1, 4096, 3)),  # clipped to the request
])


# --- whole sessions ---------------------------------------------------------------------------


def test_session_fed_whole_gives_exact_bytes() -> None:
    events, out, conn = serve(one_chunk(HANDSHAKE, SESSION))
    assert events == SESSION_EVENTS
    assert out == HANDSHAKE_REPLY + SESSION_REPLY
    assert conn.state is State.DISCONNECTED and not conn.outstanding
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert state_of(conn) is State.CLOSED


def test_session_fed_byte_by_byte() -> None:
    stream = HANDSHAKE + SESSION
    events, out, _ = serve(stream[i : i + 1] for i in range(len(stream)))
    assert events == SESSION_EVENTS
    assert out == HANDSHAKE_REPLY + SESSION_REPLY


def test_a_large_write_in_pieces_comes_out_whole_and_in_order() -> None:
    # As a client's socket delivers a 1 MiB write: pieces of ~200 KiB, the fifth ending
    # inside the next request's header; then a payload that is exactly one piece.
    big = (bytes(range(251)) * 4178)[: 1 << 20]
    second = req(WRITE, 2, 0, 4096, 0, PATTERN)
    rest = req(WRITE, 1, 0, len(big), 0, big) + second + req(DISC, 3)
    pieces = [HANDSHAKE, *(rest[i : i + 209_722] for i in range(0, len(rest), 209_722))]
    events, _, _ = serve(pieces)
    assert events == [GO_EVENT, WriteRequest(1, 0, big, False),
                      WriteRequest(2, 0, PATTERN, False), Disconnect()]
    events, _, _ = serve([HANDSHAKE, second[:28], PATTERN, req(DISC, 3)])
    assert events == [GO_EVENT, WriteRequest(2, 0, PATTERN, False), Disconnect()]


def test_session_with_trailing_bytes() -> None:
    events, _, conn = serve(one_chunk(HANDSHAKE, SESSION[:-28], req(READ, 9, 0, 512)[:10]))
    assert events == SESSION_EVENTS[:-1]
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(NbdProtocolError, match="inside a request header"):
        conn.next_event()
    with pytest.raises(NbdProtocolError, match="broken"):
        conn.next_event()

    conn = NbdServerConnection(EXPORTS)
    conn.receive_data(HANDSHAKE + req(FLUSH, 1) + b"junk")
    assert conn.next_event() == GO_EVENT
    assert conn.next_event() == FlushRequest(1)
    conn.send_ok(1)
    with pytest.raises(NbdProtocolError, match="magic"):
        conn.next_event()
    assert conn.data_to_send() == HANDSHAKE_REPLY + simple(1)  # what came before still goes out


def test_replies_in_any_order_with_several_in_flight() -> None:
    conn = NbdServerConnection(EXPORTS)
    conn.receive_data(HANDSHAKE + req(READ, 10, 0, 512) + req(WRITE, 11, 512, 512, 0, b"w" * 512)
                      + req(READ, 12, 1024, 512))
    assert drain(conn)[1:] == [ReadRequest(10, 0, 512), WriteRequest(11, 512, b"w" * 512, False),
                               ReadRequest(12, 1024, 512)]
    assert conn.outstanding == {10, 11, 12}
    conn.data_to_send()
    conn.send_read_reply(12, b"c" * 512)
    conn.send_error(10, EIO, "media error")
    conn.send_ok(11)
    assert conn.data_to_send() == (chunk(12, 1, struct.pack(">Q", 1024) + b"c" * 512)
                                   + error_chunk(10, EIO, "media error") + simple(11))
    assert not conn.outstanding


def test_disconnect_with_requests_in_flight() -> None:
    conn = NbdServerConnection(EXPORTS)
    conn.receive_data(HANDSHAKE + req(READ, 1, 0, 512) + req(DISC, 2))
    assert drain(conn)[1:] == [ReadRequest(1, 0, 512), Disconnect()]
    conn.send_read_reply(1, bytes(512))  # what is in flight is still answered
    conn.receive_data(b"x")
    with pytest.raises(NbdProtocolError, match="after the client asked to disconnect"):
        conn.next_event()


# --- negotiation ------------------------------------------------------------------------------


def test_info_then_go() -> None:
    events, out, conn = serve([struct.pack(">I", 1), opt(INFO, info_data("nope")),
                               opt(INFO, info_data("", 2, 3, 77)), opt(GO, info_data(""))])
    assert out == b"".join([
        GREETING,
        rep(INFO, ERR_UNKNOWN, b"no export named 'nope'"),
        info_replies(INFO, SIZE, FLAGS_SIMPLE),
        rep(INFO, REP_INFO, struct.pack(">H", 2) + b"the default disk"),
        rep(INFO, ACK),
        info_replies(GO, SIZE, FLAGS_SIMPLE),
        rep(GO, ACK),
    ])
    assert events == [OptionGo("", SIZE, FLAGS_SIMPLE, False, ())]
    assert conn.state is State.TRANSMISSION


@pytest.mark.parametrize("client_flags, padding", [(1, 124), (3, 0), (0, 124)])
def test_export_name_old_style(client_flags: int, padding: int) -> None:
    events, out, _ = serve(one_chunk(struct.pack(">I", client_flags), opt(EXPORT_NAME, b"ro"),
                                        req(READ, 5, 0, 512), req(WRITE, 6, 0, 512, 0, bytes(512))))
    ro_flags = 1 | 2 | 4 | 8  # HAS_FLAGS | READ_ONLY | SEND_FLUSH | SEND_FUA
    assert out == (GREETING + struct.pack(">QH", SIZE, ro_flags) + bytes(padding)
                   + simple(5, 0, bytes(512)) + simple(6, EPERM))
    assert events == [OptionGo("ro", SIZE, ro_flags, False, (), via_export_name=True),
                      ReadRequest(5, 0, 512)]


def test_export_name_for_unknown_export_breaks_the_connection() -> None:
    conn = NbdServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 1) + opt(EXPORT_NAME, b"nope"))
    with pytest.raises(NbdProtocolError, match="unknown export"):
        conn.next_event()
    assert conn.state is State.ERROR


def test_client_without_fixed_newstyle_may_only_send_export_name() -> None:
    conn = NbdServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 0) + opt(LIST))
    with pytest.raises(NbdProtocolError, match="fixed newstyle"):
        conn.next_event()


def test_unknown_options_and_invalid_option_data() -> None:
    events, out, _ = serve(one_chunk(
        struct.pack(">I", 1), opt(99, b"abc"), opt(STARTTLS), opt(EXTENDED_HEADERS),
        opt(LIST, b"x"), opt(LIST), opt(STRUCTURED_REPLY, b"x"), opt(GO, info_data("")[:-1]),
        opt(INFO, s32("") + struct.pack(">H", 2) + b"\0\0"), opt(GO, info_data("") + b"\xff"),
    ))
    assert events == []
    assert out == b"".join([
        GREETING,
        rep(99, ERR_UNSUP, b"option 99 unsupported"),
        rep(STARTTLS, ERR_UNSUP, b"option 5 unsupported"),
        rep(EXTENDED_HEADERS, ERR_UNSUP, b"option 11 unsupported"),
        rep(LIST, ERR_INVALID, b"NBD_OPT_LIST carries data"),
        rep(LIST, SERVER, s32("")), rep(LIST, SERVER, s32("ro")), rep(LIST, ACK),
        rep(STRUCTURED_REPLY, ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY with data or repeated"),
        rep(GO, ERR_INVALID, b"option data too short"),
        rep(INFO, ERR_INVALID, b"option data too short"),
        rep(GO, ERR_INVALID, b"trailing bytes in option data"),
    ])


def test_go_with_a_name_that_is_not_utf8() -> None:
    _, out, _ = serve(one_chunk(struct.pack(">I", 1),
                                opt(GO, struct.pack(">I", 1) + b"\xff" + struct.pack(">H", 0))))
    assert out == GREETING + rep(GO, ERR_INVALID, b"string is too long, not UTF-8, or contains NUL")


def test_abort() -> None:
    events, out, conn = serve(one_chunk(struct.pack(">I", 1), opt(ABORT)))
    assert events == [Disconnect()]
    assert out == GREETING + rep(ABORT, ACK)
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()


def test_meta_contexts() -> None:
    events, out, _ = serve(one_chunk(
        struct.pack(">I", 1),
        opt(SET_META, meta_data("", "base:allocation")),  # before structured replies
        opt(STRUCTURED_REPLY),
        opt(STRUCTURED_REPLY),  # repeated
        opt(LIST_META, meta_data("")),
        opt(LIST_META, meta_data("", "base:", "qemu:dirty-bitmap:x")),
        opt(LIST_META, meta_data("", "nocolon")),
        opt(LIST_META, meta_data("nope", "base:")),
        opt(SET_META, meta_data("", "base:", "x-other:thing")),  # selects nothing
        opt(SET_META, meta_data("ro", "base:allocation")),
        opt(SET_META, meta_data("", "base:allocation") + b"!"),
        opt(SET_META, meta_data("ro", "base:allocation")),
        opt(GO, info_data("")),  # a different export than the contexts were set for
        req(BLOCK_STATUS, 1, 0, 512),
    ))
    ctx = b"base:allocation"
    assert out == b"".join([
        GREETING,
        rep(SET_META, ERR_INVALID, b"negotiate structured replies first"),
        rep(STRUCTURED_REPLY, ACK),
        rep(STRUCTURED_REPLY, ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY with data or repeated"),
        rep(LIST_META, META_CONTEXT, struct.pack(">I", 0) + ctx), rep(LIST_META, ACK),
        rep(LIST_META, META_CONTEXT, struct.pack(">I", 0) + ctx), rep(LIST_META, ACK),
        rep(LIST_META, ERR_INVALID, b"query 'nocolon' has no namespace"),
        rep(LIST_META, ERR_UNKNOWN, b"no export named 'nope'"),
        rep(SET_META, ACK),
        rep(SET_META, META_CONTEXT, struct.pack(">I", 1) + ctx), rep(SET_META, ACK),
        rep(SET_META, ERR_INVALID, b"trailing bytes in option data"),
        rep(SET_META, META_CONTEXT, struct.pack(">I", 1) + ctx), rep(SET_META, ACK),
        info_replies(GO, SIZE, FLAGS_STRUCTURED), rep(GO, ACK),
        error_chunk(1, EINVAL, "no metadata context was negotiated"),
    ])
    assert events == [OptionGo("", SIZE, FLAGS_STRUCTURED, True, ())]


@pytest.mark.parametrize("stream, message", [
    (b"NBDM", "unknown client flags"),
    (struct.pack(">I", 4), "unknown client flags"),
    (struct.pack(">I", 1 << 31 | 1), "unknown client flags"),
    (struct.pack(">I", 1) + b"NBDM", "bad option magic"),  # caught before 8 bytes arrive
    (struct.pack(">I", 1) + b"IHAVEOPX", "bad option magic"),
    (struct.pack(">I", 1) + b"IHAVEOPT" + struct.pack(">II", 7, 1 << 20), "carries"),
])
def test_broken_handshakes(stream: bytes, message: str) -> None:
    conn = NbdServerConnection(EXPORTS)
    conn.receive_data(stream)
    with pytest.raises(NbdProtocolError, match=message):
        conn.next_event()
    with pytest.raises(NbdProtocolError, match="broken"):
        conn.receive_data(b"more")


def test_end_of_stream_between_and_inside_messages() -> None:
    for stream in [b"", struct.pack(">I", 1), struct.pack(">I", 1) + opt(LIST)]:
        conn = NbdServerConnection(EXPORTS)
        conn.receive_data(stream)  # b"" here is already the end of the stream
        if stream:
            conn.receive_data(b"")
        assert drain(conn)[-1] == ConnectionClosed()
    conn = NbdServerConnection(EXPORTS)
    conn.receive_data(struct.pack(">I", 1) + opt(GO, info_data(""))[:-1])
    conn.receive_data(b"")
    with pytest.raises(NbdProtocolError, match="inside option data"):
        conn.next_event()
    conn = NbdServerConnection(EXPORTS)
    conn.receive_data(b"")
    with pytest.raises(NbdProtocolError, match="after the end"):
        conn.receive_data(b"x")


# --- requests the core refuses itself ---------------------------------------------------------


@pytest.mark.parametrize("request_, error, message", [
    (req(READ, 1, SIZE - 512, 1024), EINVAL, "beyond the end of the export"),
    (req(WRITE, 1, SIZE, 512, 0, bytes(512)), ENOSPC, "beyond the end of the export"),
    (req(WRITE_ZEROES, 1, SIZE, 512), ENOSPC, "beyond the end of the export"),
    (req(TRIM, 1, 2**64 - 512, 512), EINVAL, "beyond the end of the export"),
    (req(BLOCK_STATUS, 1, SIZE, 512), EINVAL, "beyond the end of the export"),
    (req(READ, 1, 100, 512), EINVAL, "not aligned to 512 bytes"),
    (req(WRITE, 1, 0, 100, 0, bytes(100)), EINVAL, "not aligned to 512 bytes"),
    (req(READ, 1, 0, 0), EINVAL, "zero-length request"),
    (req(READ, 1, 0, 64 << 20), EINVAL, "longer than 33554432 bytes"),
    (req(CACHE, 1, 0, 512), EINVAL, "unsupported command 5"),
    (req(77, 1, 0, 512), EINVAL, "unsupported command 77"),
    (req(READ, 1, 0, 512, NO_HOLE), EINVAL, "flags 0x2 not valid for READ"),
    (req(WRITE_ZEROES, 1, 0, 512, FAST_ZERO), EINVAL, "flags 0x10 not valid for WRITE_ZEROES"),
    (req(READ, 1, 0, 512, 1 << 9), EINVAL, "flags 0x200 not valid for READ"),  # unknown bit
    (req(FLUSH, 1, 0, 512), EINVAL, "flush with offset or length"),
])
def test_invalid_requests_are_answered_by_the_core(request_: bytes, error: int,
                                                   message: str) -> None:
    events, out, conn = serve(one_chunk(HANDSHAKE, request_, req(FLUSH, 2)))
    assert events == [GO_EVENT, FlushRequest(2)]  # the stream stays in sync
    assert out == HANDSHAKE_REPLY + error_chunk(1, error, message) + simple(2)
    assert not conn.outstanding


def test_simple_error_replies_without_structured_replies() -> None:
    events, out, _ = serve(one_chunk(struct.pack(">I", 3), opt(GO, info_data("")),
                                     req(READ, 1, 0, 512, DF), req(READ, 2, SIZE, 512),
                                     req(BLOCK_STATUS, 3, 0, 512), req(READ, 4, 0, 512)))
    assert out == (GREETING + info_replies(GO, SIZE, FLAGS_SIMPLE) + rep(GO, ACK)
                   + simple(1, EINVAL) + simple(2, EINVAL) + simple(3, EINVAL)
                   + simple(4, 0, bytes(512)))
    assert events[1:] == [ReadRequest(4, 0, 512)]


def test_refused_long_write_is_consumed_but_a_huge_one_breaks() -> None:
    small = {"": Export(64 << 20, max_block_bytes=1 << 20)}
    payload = bytes(2 << 20)
    events, out, _ = serve(one_chunk(HANDSHAKE, req(WRITE, 1, 0, len(payload), 0, payload),
                                     req(FLUSH, 2)), small)
    assert events[1:] == [FlushRequest(2)]
    assert out.endswith(error_chunk(1, EINVAL, "longer than 1048576 bytes") + simple(2))
    conn = NbdServerConnection(EXPORTS)
    conn.receive_data(HANDSHAKE + req(WRITE, 1, 0, (32 << 20) + 512))
    with pytest.raises(NbdProtocolError, match="write payload"):
        drain(conn)


@pytest.mark.parametrize("stream, message", [
    (req(READ, 1, 0, 512) + req(READ, 1, 512, 512), "already in flight"),
    (req(DISC, 1, 0, 512), "NBD_CMD_DISC with offset"),
    (req(DISC, 1, 0, 0, 1 << 8), "NBD_CMD_DISC with offset, length or flags"),
    (b"\x25\x60\x95\x14", "bad request magic"),
    (b"\x26", "bad request magic"),  # caught from its first byte
])
def test_broken_requests(stream: bytes, message: str) -> None:
    conn = NbdServerConnection(EXPORTS)
    conn.receive_data(HANDSHAKE + stream)
    with pytest.raises(NbdProtocolError, match=message):
        drain(conn)
    assert conn.state is State.ERROR


# --- the reply methods ------------------------------------------------------------------------


def test_reply_misuse_raises_without_breaking_the_connection() -> None:
    conn = NbdServerConnection(EXPORTS)
    conn.receive_data(HANDSHAKE + req(READ, 1, 0, 1024) + req(WRITE, 2, 0, 512, 0, bytes(512))
                      + req(BLOCK_STATUS, 3, 0, 4096, REQ_ONE))
    drain(conn)
    conn.data_to_send()
    misuses: list[tuple[Callable[[], None], str]] = [
        (lambda: conn.send_ok(99), "no request"),
        (lambda: conn.send_ok(1), "READ request 0x1 cannot take"),
        (lambda: conn.send_read_reply(2, b""), "WRITE request 0x2 cannot take"),
        (lambda: conn.send_read_reply(1, bytes(512)), "512 bytes, 1024 requested"),
        (lambda: conn.send_error(2, 2), "not an NBD error code"),
        (lambda: conn.send_error(2, 0), "not an NBD error code"),
        (lambda: conn.send_block_status(3, []), "at least one extent"),
        (lambda: conn.send_block_status(3, [(0, 0)]), "invalid extent"),
        (lambda: conn.send_block_status(3, [(100, 0)]), "invalid extent"),
        (lambda: conn.send_block_status(3, [(512, 4)]), "invalid extent"),
    ]
    for misuse, message in misuses:
        with pytest.raises(NbdProtocolError, match=message):
            misuse()
    assert conn.outstanding == {1, 2, 3} and conn.data_to_send() == b""
    conn.send_block_status(3, [(512, 3), (1024, 3), (512, 0), (8192, 3)])  # merged, then one
    conn.send_error(1, EIO)
    assert conn.data_to_send() == (chunk(3, 5, struct.pack(">III", 1, 1536, 3))
                                   + error_chunk(1, EIO, ""))
    assert conn.state is State.TRANSMISSION


def test_block_status_extents_are_clipped_and_merged() -> None:
    conn = NbdServerConnection(EXPORTS)
    conn.receive_data(HANDSHAKE + req(BLOCK_STATUS, 1, 0, 8192))
    drain(conn)
    conn.data_to_send()
    conn.send_block_status(1, [(512, 0), (512, 0), (1024, 2), (1 << 40, 3), (512, 0)])
    assert conn.data_to_send() == chunk(1, 5, struct.pack(">IIIIIII", 1, 1024, 0, 1024, 2,
                                                          6144, 3))


def test_export_rejects_impossible_geometry() -> None:
    for kwargs in [dict(size_bytes=1000), dict(size_bytes=4096, min_block_bytes=3),
                   dict(size_bytes=4096, preferred_block_bytes=256),
                   dict(size_bytes=4096, max_block_bytes=1000)]:
        with pytest.raises(ValueError):
            Export(**kwargs)  # type: ignore[arg-type]


# --- fuzz -------------------------------------------------------------------------------------


def _fuzz(prefix: bytes, data: bytes, chunk_bytes: int) -> None:
    conn, disk = NbdServerConnection(EXPORTS), Disk()
    try:
        conn.receive_data(prefix)
        for start in range(0, len(data), chunk_bytes):
            conn.receive_data(data[start : start + chunk_bytes])
            drain(conn, disk)
        conn.receive_data(b"")
        drain(conn, disk)
    except NbdProtocolError:
        assert conn.state is State.ERROR
    conn.data_to_send()


_requests = st.builds(req, st.integers(0, 9), st.integers(0, 3), st.integers(0, SIZE + 4096),
                      st.integers(0, 8192), st.integers(0, 31))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), _requests), max_size=6), st.integers(1, 64),
       st.booleans())
def test_arbitrary_bytes_after_the_handshake(parts: list[bytes], chunk_bytes: int,
                                             structured: bool) -> None:
    handshake = HANDSHAKE if structured else struct.pack(">I", 3) + opt(GO, info_data(""))
    _fuzz(handshake, b"".join(parts), chunk_bytes)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), st.builds(opt, st.integers(0, 12),
                                                            st.binary(max_size=40))),
                max_size=6), st.integers(1, 64))
def test_arbitrary_bytes_during_negotiation(parts: list[bytes], chunk_bytes: int) -> None:
    _fuzz(struct.pack(">I", 1), b"".join(parts), chunk_bytes)
