"""The tunnel codec: packets whole, byte by byte, with trailing bytes; round trips;
strict validation; and a bounded fuzz where only TunnelProtocolError may escape.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_scsi_target import (
    MemoryImage,
    inquiry,
    pr_out,
    pr_out_params,
    read10,
    read16,
    tur,
    write10,
    write16,
)
from vhdshare.scsi import OpClass, Status
from vhdshare.target import Target
from vhdshare.tunnel import (
    NEED_DATA,
    REQUEST_HEADER,
    RESPONSE_HEADER,
    ConnectionClosed,
    Direction,
    HostConnection,
    NodeConnection,
    TunnelProtocolError,
    TunnelRequest,
    TunnelResponse,
    pack_request,
    pack_request_pieces,
    pack_response,
    pack_response_pieces,
    unpack_request,
    unpack_response,
)

READ = TunnelRequest(1, "iqn.2024-01.org.example:vm1", read10(8, 2), Direction.DATA_IN, 1024)
WRITE = TunnelRequest(2, "vm1", write16(4, 1), Direction.DATA_OUT, 512, b"\x5a" * 512)
RESERVE = TunnelRequest(3, "vm2", pr_out(1, 1), Direction.DATA_OUT, 24, pr_out_params(7))
INQUIRY = TunnelRequest(4, "vm2", inquiry(True, 0x83, 64), Direction.DATA_IN, 64)
NO_DATA = TunnelRequest(2**64 - 1, "ü", tur(), Direction.NONE, 0)
SAMPLES = [READ, WRITE, RESERVE, INQUIRY, NO_DATA]
RESPONSES = [
    TunnelResponse(1, Status.GOOD, b"", bytes(range(256)) * 4),
    TunnelResponse(2, Status.CHECK_CONDITION, bytes(18)),
    TunnelResponse(3, Status.RESERVATION_CONFLICT),
]


def drain(connection: NodeConnection | HostConnection) -> list[object]:
    events: list[object] = []
    while (event := connection.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


# --- whole, byte by byte, trailing bytes -----------------------------------------------------


@pytest.mark.parametrize("request_", SAMPLES, ids=lambda r: r.cdb[:1].hex())
def test_request_whole_bytewise_and_with_trailing_bytes(request_: TunnelRequest) -> None:
    packet = pack_request(request_)
    whole = NodeConnection()
    whole.receive_data(packet)
    assert drain(whole) == [request_]

    bytewise = NodeConnection()
    for index in range(len(packet)):
        assert bytewise.next_event() is NEED_DATA
        bytewise.receive_data(packet[index : index + 1])
    assert bytewise.next_event() == request_
    bytewise.receive_data(b"")
    assert bytewise.next_event() == ConnectionClosed()

    trailing = NodeConnection()
    trailing.receive_data(packet + packet[:5])  # the start of another packet
    assert trailing.next_event() == request_
    assert trailing.next_event() is NEED_DATA
    trailing.receive_data(b"")
    with pytest.raises(TunnelProtocolError, match="header"):
        trailing.next_event()

    garbage = NodeConnection()
    garbage.receive_data(packet + b"junk!")
    assert garbage.next_event() == request_
    with pytest.raises(TunnelProtocolError, match="magic"):
        garbage.next_event()
    with pytest.raises(TunnelProtocolError):
        unpack_request(packet + b"\0")


@pytest.mark.parametrize("response", RESPONSES, ids=lambda r: str(r.status))
def test_response_whole_bytewise_and_with_trailing_bytes(response: TunnelResponse) -> None:
    packet = pack_response(response)
    assert unpack_response(packet) == response
    host = HostConnection()
    host.send_request(TunnelRequest(response.request_id, "h", read10(0, 2), Direction.DATA_IN,
                                    1024))
    for index in range(len(packet)):
        assert host.next_event() is NEED_DATA
        host.receive_data(packet[index : index + 1])
    assert host.next_event() == response
    with pytest.raises(TunnelProtocolError):
        unpack_response(packet + b"\0")


def test_several_packets_in_one_chunk() -> None:
    node = NodeConnection()
    node.receive_data(b"".join(pack_request(r) for r in SAMPLES))
    node.receive_data(b"")
    assert drain(node) == [*SAMPLES, ConnectionClosed()]
    assert node.outstanding == {r.request_id for r in SAMPLES}


# --- round trips -------------------------------------------------------------------------------

_initiators = st.text(min_size=1, max_size=40)
_ids = st.integers(0, 2**64 - 1)


@st.composite
def requests(draw: st.DrawFn) -> TunnelRequest:
    request_id, initiator = draw(_ids), draw(_initiators)
    kind = draw(st.sampled_from(["read", "write", "inquiry", "none", "opaque"]))
    if kind == "read":
        count = draw(st.integers(0, 8))
        cdb = draw(st.sampled_from([read10, read16]))(draw(st.integers(0, 2**32 - 1)), count)
        return TunnelRequest(request_id, initiator, cdb,
                             Direction.DATA_IN if count else Direction.NONE, count * 512)
    if kind == "write":
        count = draw(st.integers(1, 3))
        cdb = draw(st.sampled_from([write10, write16]))(draw(st.integers(0, 2**32 - 1)), count)
        data = draw(st.binary(min_size=count * 512, max_size=count * 512))
        return TunnelRequest(request_id, initiator, cdb, Direction.DATA_OUT, count * 512, data)
    if kind == "inquiry":
        alloc = draw(st.integers(1, 2000))
        return TunnelRequest(request_id, initiator, inquiry(alloc=alloc), Direction.DATA_IN,
                             alloc)
    if kind == "none":
        return TunnelRequest(request_id, initiator, tur(), Direction.NONE, 0)
    cdb = bytes([0xC0 | draw(st.integers(0, 0x3F))]) + draw(st.binary(min_size=5, max_size=15))
    data = draw(st.binary(max_size=64))
    return TunnelRequest(request_id, initiator, cdb, Direction.DATA_OUT if data else
                         Direction.NONE, len(data), data)


@st.composite
def responses(draw: st.DrawFn) -> TunnelResponse:
    status = draw(st.sampled_from(list(Status)))
    sense = draw(st.binary(max_size=252)) if status == Status.CHECK_CONDITION else b""
    return TunnelResponse(draw(_ids), status, sense, draw(st.binary(max_size=2048)))


@settings(max_examples=200, deadline=None)
@given(requests())
def test_request_round_trip(request_: TunnelRequest) -> None:
    assert unpack_request(pack_request(request_)) == request_


@settings(max_examples=200, deadline=None)
@given(responses())
def test_response_round_trip(response: TunnelResponse) -> None:
    assert unpack_response(pack_response(response)) == response


def test_packets_in_pieces_carry_their_data_uncopied() -> None:
    pieces = pack_request_pieces(WRITE)
    assert b"".join(pieces) == pack_request(WRITE) and pieces[-1] is WRITE.data_out
    response = TunnelResponse(3, Status.GOOD, b"", b"\x33" * 4096)
    pieces = pack_response_pieces(response)
    assert b"".join(pieces) == pack_response(response) and pieces[-1] is response.data_in


def test_unpacked_data_is_a_view_of_the_packet() -> None:
    """A node unpacks a 1 MiB write where the message landed, and a host its read data."""
    packet = bytearray(pack_request(WRITE))
    data_out = unpack_request(packet).data_out
    assert isinstance(data_out, memoryview) and data_out.obj is packet
    packet[-1] ^= 0xFF  # the view sees the packet's bytes themselves
    assert bytes(data_out) == b"\x5a" * 511 + bytes([0x5a ^ 0xFF])
    reply = bytearray(pack_response(TunnelResponse(3, Status.GOOD, b"", b"\x33" * 512)))
    data_in = unpack_response(reply).data_in
    assert isinstance(data_in, memoryview) and data_in.obj is reply and data_in == b"\x33" * 512


@settings(max_examples=50, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=4, unique_by=lambda r: r.request_id),
       st.data())
def test_stream_in_random_chunks(batch: list[TunnelRequest], data: st.DataObject) -> None:
    stream = b"".join(pack_request(r) for r in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    node, events, start = NodeConnection(), [], 0
    for cut in [*cuts, len(stream)]:
        if cut == start:
            continue  # b"" would mean the end of the stream
        node.receive_data(stream[start:cut])
        start = cut
        events += drain(node)
    assert events == batch


# --- strict validation -------------------------------------------------------------------------


def _patched_request(request_: TunnelRequest, **fields: int | bytes) -> bytes:
    packet = pack_request(request_)
    names = ["magic", "version", "kind", "direction", "cdb_len", "request_id",
             "initiator_len", "reserved", "data_len", "payload_len"]
    values = dict(zip(names, REQUEST_HEADER.unpack(packet[: REQUEST_HEADER.size]), strict=True))
    values.update(fields)
    return REQUEST_HEADER.pack(*values.values()) + packet[REQUEST_HEADER.size :]


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        (_patched_request(READ, version=2), "version"),
        (_patched_request(READ, magic=b"VHDX"), "magic"),
        (_patched_request(READ, kind=2), "request packet"),
        (_patched_request(READ, payload_len=1000), "payload length"),
        (_patched_request(WRITE, data_len=1024), "payload length"),
        (_patched_request(READ, data_len=2048), "CDB transfers"),
        (_patched_request(READ, data_len=1 << 30), "exceeds"),
        (_patched_request(READ, direction=0), "direction"),
        (_patched_request(READ, direction=7), "direction"),
        (_patched_request(READ, reserved=1), "reserved"),
        (_patched_request(WRITE, direction=2, payload_len=3 + 16), "CDB transfers"),
        (pack_request(READ)[:-1], "payload"),
        (pack_request(READ)[:10], "header"),
    ],
)
def test_invalid_request_packets(packet: bytes, message: str) -> None:
    with pytest.raises(TunnelProtocolError, match=message):
        unpack_request(packet)


@pytest.mark.parametrize(
    "request_",
    [
        TunnelRequest(1, "", tur(), Direction.NONE, 0),
        TunnelRequest(1, "x" * 224, tur(), Direction.NONE, 0),
        TunnelRequest(1, "a", b"\0" * 5, Direction.NONE, 0),
        TunnelRequest(1, "a", b"\0" * 17, Direction.NONE, 0),
        TunnelRequest(1, "a", tur(), Direction.NONE, 5),
        TunnelRequest(1, "a", tur(), Direction.DATA_OUT, 1, b"x"),
        TunnelRequest(1, "a", write10(0, 1), Direction.DATA_OUT, 511, bytes(511)),
        TunnelRequest(1, "a", write10(0, 1), Direction.DATA_OUT, 512, b""),
        TunnelRequest(1, "a", read10(0, 1), Direction.DATA_OUT, 512, bytes(512)),
        TunnelRequest(-1, "a", tur(), Direction.NONE, 0),
        TunnelRequest(1, "a", read16(0, 2**24), Direction.DATA_IN, 2**33),
    ],
)
def test_invalid_requests_are_refused_when_packing(request_: TunnelRequest) -> None:
    with pytest.raises(TunnelProtocolError):
        pack_request(request_)


def test_initiator_must_be_utf8() -> None:
    packet = bytearray(pack_request(TunnelRequest(1, "ab", tur(), Direction.NONE, 0)))
    packet[REQUEST_HEADER.size] = 0xFF
    with pytest.raises(TunnelProtocolError, match="UTF-8"):
        unpack_request(bytes(packet))


def test_oversized_limit_is_configurable() -> None:
    big = TunnelRequest(1, "a", read16(0, 64), Direction.DATA_IN, 64 * 512)
    with pytest.raises(TunnelProtocolError, match="exceeds"):
        pack_request(big, max_transfer_bytes=16 * 512)
    node = NodeConnection(max_transfer_bytes=16 * 512)
    node.receive_data(pack_request(big)[: REQUEST_HEADER.size])  # refused before the payload
    with pytest.raises(TunnelProtocolError, match="exceeds"):
        node.next_event()


def test_broken_connection_stays_broken_and_eof_is_final() -> None:
    node = NodeConnection()
    node.receive_data(b"XXXX")
    with pytest.raises(TunnelProtocolError):
        node.next_event()
    with pytest.raises(TunnelProtocolError):
        node.next_event()
    with pytest.raises(TunnelProtocolError):
        node.receive_data(pack_request(READ))
    closed = NodeConnection()
    closed.receive_data(b"")
    assert closed.next_event() == ConnectionClosed()
    with pytest.raises(TunnelProtocolError):
        closed.receive_data(b"more")


def test_request_ids() -> None:
    node = NodeConnection()
    node.receive_data(pack_request(READ) + pack_request(READ))
    assert node.next_event() == READ
    with pytest.raises(TunnelProtocolError, match="outstanding"):
        node.next_event()
    fresh = NodeConnection()
    fresh.receive_data(pack_request(READ))
    fresh.next_event()
    with pytest.raises(TunnelProtocolError, match="no outstanding"):
        fresh.send_response(TunnelResponse(99, Status.GOOD))
    with pytest.raises(TunnelProtocolError, match="takes"):
        fresh.send_response(TunnelResponse(READ.request_id, Status.GOOD, b"", bytes(1025)))
    fresh.send_response(TunnelResponse(READ.request_id, Status.GOOD, b"", bytes(1024)))
    assert fresh.outstanding == frozenset()
    # a request id can be reused once answered
    fresh.receive_data(pack_request(READ))
    assert fresh.next_event() == READ


def test_host_side_checks_responses() -> None:
    host = HostConnection()
    host.send_request(READ)
    with pytest.raises(TunnelProtocolError, match="outstanding"):
        host.send_request(READ)
    host.receive_data(pack_response(TunnelResponse(77, Status.GOOD)))
    with pytest.raises(TunnelProtocolError, match="unknown request"):
        host.next_event()
    too_much = HostConnection()
    too_much.send_request(READ)
    too_much.receive_data(pack_response(TunnelResponse(1, Status.GOOD, b"", bytes(1025))))
    with pytest.raises(TunnelProtocolError, match="asked"):
        too_much.next_event()


@pytest.mark.parametrize(
    "response",
    [TunnelResponse(1, 0x77), TunnelResponse(1, Status.GOOD, b"sense"),
     TunnelResponse(1, Status.CHECK_CONDITION, bytes(253))],
)
def test_invalid_responses(response: TunnelResponse) -> None:
    with pytest.raises(TunnelProtocolError):
        pack_response(response)
    header = RESPONSE_HEADER.pack(b"VHDT", 1, 2, response.status, len(response.sense) & 0xFF,
                                  1, 0, 0, len(response.data_in),
                                  (len(response.sense) & 0xFF) + len(response.data_in))
    with pytest.raises(TunnelProtocolError):
        unpack_response(header + response.sense[:255] + response.data_in)


# --- features ---------------------------------------------------------------------------------


def test_features() -> None:
    assert READ.features.op_class is OpClass.READ
    assert (READ.features.lba, READ.features.block_count) == (8, 2)
    assert READ.features.transfer_length_bytes == 1024
    assert (WRITE.features.op_class, WRITE.features.lba) == (OpClass.WRITE, 4)
    assert RESERVE.features.op_class is OpClass.RESERVATION
    assert INQUIRY.features.op_class is OpClass.INQUIRY and INQUIRY.features.lba is None
    opaque = TunnelRequest(5, "a", bytes([0xC5]) + bytes(9), Direction.NONE, 0)
    assert opaque.features.op_class is OpClass.OTHER


# --- end to end through the target -------------------------------------------------------------


def test_host_to_node_to_target_and_back() -> None:
    host, node = HostConnection(), NodeConnection()
    target = Target(MemoryImage(64), "tunnel-disk")
    node.receive_data(b"".join(host.send_request(WRITE) + host.send_request(
        TunnelRequest(9, "vm1", read16(4, 1), Direction.DATA_IN, 512))))
    answers = b""
    for request_ in drain(node):
        assert isinstance(request_, TunnelRequest)
        result = target.execute(request_.initiator, request_.cdb, request_.data_out,
                                request_.data_length_bytes)
        answers += node.send_response(
            TunnelResponse(request_.request_id, result.status, result.sense, result.data_in))
    host.receive_data(answers)
    write_done, read_done = drain(host)
    assert isinstance(read_done, TunnelResponse) and read_done.data_in == b"\x5a" * 512
    assert write_done == TunnelResponse(2, Status.GOOD)


# --- bounded fuzz: arbitrary and mutated bytes --------------------------------------------------


def _feed(connection: NodeConnection | HostConnection, data: bytes, chunk: int) -> None:
    try:
        for start in range(0, len(data), chunk):
            connection.receive_data(data[start : start + chunk])
            drain(connection)
        connection.receive_data(b"")
        drain(connection)
    except TunnelProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 64))
def test_fuzz_arbitrary_bytes(data: bytes, chunk: int) -> None:
    _feed(NodeConnection(), data, chunk)
    host = HostConnection()
    host.send_request(READ)
    _feed(host, data, chunk)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SAMPLES),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(1, 64))
def test_fuzz_mutated_packets(request_: TunnelRequest, flips: list[tuple[int, int]],
                              chunk: int) -> None:
    packet = bytearray(pack_request(request_))
    for position, value in flips:
        packet[position % len(packet)] = value
    _feed(NodeConnection(), bytes(packet), chunk)
    response = bytearray(pack_response(RESPONSES[0]))
    for position, value in flips:
        response[position % len(response)] = value
    host = HostConnection()
    host.send_request(READ)
    _feed(host, bytes(response), chunk)


def test_header_sizes() -> None:
    assert REQUEST_HEADER.size == RESPONSE_HEADER.size == 28
    assert struct.calcsize(REQUEST_HEADER.format) == 28


def test_host_takes_whole_packets_with_the_streams_checks() -> None:
    host = HostConnection()
    host.send_request(TunnelRequest(5, "h", read10(0, 2), Direction.DATA_IN, 1024))
    answer = TunnelResponse(5, Status.GOOD, b"", bytes(1024))
    assert host.receive_packet(pack_response(answer)) == answer
    assert host.outstanding == frozenset()
    with pytest.raises(TunnelProtocolError, match="unknown request"):
        host.receive_packet(pack_response(answer))  # answered already
    with pytest.raises(TunnelProtocolError, match="broken"):
        host.receive_data(b"")  # a protocol error breaks the connection for good
    greedy = HostConnection()
    greedy.send_request(TunnelRequest(6, "h", read10(0, 1), Direction.DATA_IN, 512))
    with pytest.raises(TunnelProtocolError, match="asked 512"):
        greedy.receive_packet(pack_response(TunnelResponse(6, Status.GOOD, b"", bytes(1024))))
