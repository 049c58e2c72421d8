"""The iSCSI target core against a scripted initiator: login (one and two stages, failures),
key negotiation, discovery, reads split into Data-In PDUs, writes with immediate data,
unsolicited Data-Out and R2Ts, data-out errors, the CmdSN window, NOP, text, task
management, logout, Rejects, framing fed whole, byte by byte and with trailing bytes, and a
fuzz where only IscsiProtocolError escapes.

The initiator side is built here with plain struct calls, independent of the module's own
records, so a misread of RFC 7143 shows up as a byte mismatch.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhdshare.iscsi import IscsiTargetConnection, State
from vhdshare.iscsi_keys import SessionParams, decode_text, negotiate
from vhdshare.iscsi_wire import (
    NEED_DATA,
    ConnectionClosed,
    IscsiProtocolError,
    LoginComplete,
    LoginRejected,
    LogoutRequested,
    ScsiCommand,
    TaskManagement,
)

TARGET = "iqn.2026-11.test:disk"
OTHER = "iqn.2026-11.test:other"
PORTAL = "192.0.2.7:3260,1"
INITIATOR = "iqn.2026-11.test:host"
ISID = bytes.fromhex("400001370000")
NO_TAG = 0xFFFFFFFF
READ_10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 16, 0])
WRITE_10 = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0])
# what libiscsi offers in its one operational login PDU (small MaxRecvDataSegmentLength)
OFFERS = [("HeaderDigest", "None,CRC32C"), ("DataDigest", "None"), ("InitialR2T", "No"),
          ("ImmediateData", "Yes"), ("MaxBurstLength", "262144"), ("FirstBurstLength", "65536"),
          ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"), ("MaxOutstandingR2T", "1"),
          ("ErrorRecoveryLevel", "0"), ("IFMarker", "No"), ("OFMarker", "No"),
          ("MaxConnections", "1"), ("MaxRecvDataSegmentLength", "8192"),
          ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes")]
LEADING = [("InitiatorName", INITIATOR), ("InitiatorAlias", "host"), ("TargetName", TARGET),
           ("SessionType", "Normal")]


# --- the scripted initiator -------------------------------------------------------------------


def text(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{key}={value}".encode() + b"\0" for key, value in pairs)


def pdu(header: bytes, data: bytes = b"") -> bytes:
    assert len(header) == 48
    return header + data + bytes(-len(data) % 4)


def login_pdu(flags: int, data: bytes, tsih: int = 0, version_min: int = 0) -> bytes:
    header = (struct.pack(">BBBBI", 0x43, flags, 0, version_min, len(data)) + ISID
              + struct.pack(">HIHHII", tsih, 7, 0, 0, 1, 0) + bytes(16))
    return pdu(header, data)


def scsi_command(itt: int, cmd_sn: int, cdb: bytes, expected: int, *, read: bool = False,
                 write: bool = False, final: bool = True, data: bytes = b"", lun: int = 0,
                 immediate: bool = False, ahs: bytes = b"") -> bytes:
    flags = 0x80 * final | 0x40 * read | 0x20 * write | 1
    header = (struct.pack(">BBHI", 0x01 | 0x40 * immediate, flags, 0,
                          (len(ahs) // 4) << 24 | len(data))
              + struct.pack(">QIIII", lun, itt, expected, cmd_sn, 0) + cdb.ljust(16, b"\0"))
    return header + ahs + data + bytes(-len(data) % 4)


def data_out(itt: int, ttt: int, data_sn: int, offset: int, data: bytes,
             final: bool = True) -> bytes:
    header = (struct.pack(">BBHIQ", 0x05, 0x80 * final, 0, len(data), 0)
              + struct.pack(">IIIIIIII", itt, ttt, 0, 0, 0, data_sn, offset, 0))
    return pdu(header, data)


def nop_out(itt: int, cmd_sn: int, data: bytes = b"", immediate: bool = True) -> bytes:
    header = (struct.pack(">BBHIQ", 0x40 * immediate, 0x80, 0, len(data), 0)
              + struct.pack(">IIII", itt, NO_TAG, cmd_sn, 0) + bytes(16))
    return pdu(header, data)


def text_request(itt: int, cmd_sn: int, data: bytes, flags: int = 0x80) -> bytes:
    header = (struct.pack(">BBHIQ", 0x44, flags, 0, len(data), 0)
              + struct.pack(">IIII", itt, NO_TAG, cmd_sn, 0) + bytes(16))
    return pdu(header, data)


def task_management(itt: int, cmd_sn: int, function: int, referenced: int) -> bytes:
    header = (struct.pack(">BBHIQ", 0x42, 0x80 | function, 0, 0, 0)
              + struct.pack(">IIIIII", itt, referenced, cmd_sn, 0, 0, 0) + bytes(8))
    return pdu(header)


def logout(itt: int, cmd_sn: int, reason: int = 0) -> bytes:
    header = (struct.pack(">BBHI8s", 0x46, 0x80 | reason, 0, 0, b"")
              + struct.pack(">IHHII", itt, 0, 0, cmd_sn, 0) + bytes(16))
    return pdu(header)


# --- what the target sends --------------------------------------------------------------------


@dataclass
class Pdu:
    header: bytes
    data: bytes

    @property
    def opcode(self) -> int:
        return self.header[0] & 0x3F

    @property
    def flags(self) -> int:
        return self.header[1]

    def u32(self, offset: int) -> int:
        return int(struct.unpack_from(">I", self.header, offset)[0])

    @property
    def pairs(self) -> dict[str, str]:
        return dict(decode_text(self.data))


def parse(out: bytes) -> list[Pdu]:
    pdus = []
    while out:
        lengths = struct.unpack_from(">I", out, 4)[0]
        start = 48 + (lengths >> 24) * 4
        size = lengths & 0xFFFFFF
        pdus.append(Pdu(out[:48], out[start : start + size]))
        out = out[start + size + (-size % 4) :]
    return pdus


def feed(conn: IscsiTargetConnection, data: bytes, chunk: int = 0) -> list[object]:
    events: list[object] = []
    step = chunk or max(1, len(data))
    for piece in [data[at : at + step] for at in range(0, len(data), step)] or [b""]:
        conn.receive_data(piece)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return events
    return events


def connect(offers: list[tuple[str, str]] = OFFERS) -> IscsiTargetConnection:
    conn = IscsiTargetConnection(TARGET, PORTAL, tsih=5)
    events = feed(conn, login_pdu(0x87, text(LEADING + offers)))
    assert events == [LoginComplete(INITIATOR, "Normal", TARGET, ISID, 5)]
    conn.data_to_send()
    return conn


def answer(conn: IscsiTargetConnection, data: bytes, chunk: int = 0) -> tuple[list[object],
                                                                           list[Pdu]]:
    events = feed(conn, data, chunk)
    return events, parse(conn.data_to_send())


# --- login ------------------------------------------------------------------------------------


def test_one_stage_login_negotiates_and_declares() -> None:
    conn = IscsiTargetConnection(TARGET, PORTAL, tsih=5)
    events, [response] = answer(conn, login_pdu(0x87, text(LEADING + OFFERS + [("X-vendor", "1")])))
    assert events == [LoginComplete(INITIATOR, "Normal", TARGET, ISID, 5)]
    assert response.opcode == 0x23 and response.flags == 0x87
    assert response.header[8:14] == ISID and struct.unpack_from(">H", response.header, 14)[0] == 5
    assert response.u32(16) == 7 and response.header[36:38] == b"\0\0"
    assert (response.u32(28), response.u32(32)) == (1, 32)  # ExpCmdSN, MaxCmdSN (window 32)
    assert response.pairs == {
        "HeaderDigest": "None", "DataDigest": "None", "InitialR2T": "No", "ImmediateData": "Yes",
        "MaxBurstLength": "262144", "FirstBurstLength": "65536", "DefaultTime2Wait": "2",
        "DefaultTime2Retain": "0", "MaxOutstandingR2T": "1", "ErrorRecoveryLevel": "0",
        "IFMarker": "No", "OFMarker": "No", "MaxConnections": "1", "DataPDUInOrder": "Yes",
        "DataSequenceInOrder": "Yes", "X-vendor": "NotUnderstood",
        "TargetPortalGroupTag": "1", "MaxRecvDataSegmentLength": "262144"}
    assert conn.state is State.FULL_FEATURE and conn.params.max_recv_data_segment_length == 8192


def test_two_stage_login_like_open_iscsi() -> None:
    conn = IscsiTargetConnection(TARGET, PORTAL, tsih=9)
    security = text([*LEADING, ("AuthMethod", "CHAP,None")])
    events, [first] = answer(conn, login_pdu(0x81, security))  # T, CSG 0, NSG 1
    assert events == [] and first.flags == 0x81 and first.header[14:16] == b"\0\0"
    assert first.pairs == {"AuthMethod": "None", "TargetPortalGroupTag": "1"}
    events, [second] = answer(conn, login_pdu(0x87, text(OFFERS)))
    assert isinstance(events[0], LoginComplete) and second.flags == 0x87
    assert second.header[14:16] == b"\0\x09" and second.u32(24) == first.u32(24) + 1
    assert "TargetPortalGroupTag" not in second.pairs


def test_login_without_transit_stays_in_the_stage() -> None:
    conn = IscsiTargetConnection(TARGET, PORTAL)
    events, [response] = answer(conn, login_pdu(0x04, text(LEADING + OFFERS[:2])))
    assert events == [] and response.flags == 0x04 and conn.state is State.LOGIN
    events, [response] = answer(conn, login_pdu(0x87, b""))
    assert isinstance(events[0], LoginComplete) and response.pairs == {}


@pytest.mark.parametrize(("pairs", "flags", "status"), [
    ([*LEADING, ("AuthMethod", "CHAP")], 0x81, 0x0201),
    ([("InitiatorName", INITIATOR), ("TargetName", OTHER)], 0x87, 0x0203),
    ([("InitiatorName", INITIATOR)], 0x87, 0x0207),
    ([("TargetName", TARGET)], 0x87, 0x0207),
    ([("InitiatorName", INITIATOR), ("SessionType", "Boot")], 0x87, 0x0209),
    (LEADING, 0x8B, 0x0200),  # transition from stage 2
    (LEADING, 0x84, 0x0200),  # transition backwards to stage 0
    (LEADING, 0xC7, 0x0200),  # C bit: multi-PDU login text
])
def test_login_failures(pairs: list[tuple[str, str]], flags: int, status: int) -> None:
    conn = IscsiTargetConnection(TARGET, PORTAL)
    events, [response] = answer(conn, login_pdu(flags, text(pairs)))
    assert [type(event) for event in events] == [LoginRejected]
    assert struct.unpack_from(">H", response.header, 36)[0] == status
    assert response.flags & 0x80 == 0 and conn.state is State.LOGIN_FAILED
    assert feed(conn, b"") == [ConnectionClosed()]


def test_login_failures_of_the_pdu() -> None:
    conn = IscsiTargetConnection(TARGET, PORTAL)
    _, [response] = answer(conn, login_pdu(0x87, text(LEADING), version_min=1))
    assert response.header[36:38] == b"\x02\x05"
    conn = IscsiTargetConnection(TARGET, PORTAL)
    _, [response] = answer(conn, login_pdu(0x87, text(LEADING), tsih=3))
    assert response.header[36:38] == b"\x02\x0a"
    conn = IscsiTargetConnection(TARGET, PORTAL)
    _, [response] = answer(conn, login_pdu(0x87, b"InitiatorName=x"))  # no NUL
    assert response.header[36:38] == b"\x02\x00"
    with pytest.raises(IscsiProtocolError):
        feed(conn, nop_out(1, 1))  # the connection is to be closed: nothing more is read


def test_negotiation_rules() -> None:
    params = SessionParams()
    assert negotiate("MaxBurstLength", "0x1000", params) == "4096"  # min, hexadecimal
    assert negotiate("DefaultTime2Wait", "0", params) == "2"  # max
    assert negotiate("InitialR2T", "Yes", params) == "Yes"  # OR
    assert negotiate("ImmediateData", "No", params) == "No"  # AND
    assert negotiate("HeaderDigest", "CRC32C", params) == "Reject"  # no common value
    assert negotiate("MaxConnections", "0", params) == "Reject"  # out of range
    assert negotiate("ErrorRecoveryLevel", "two", params) == "Reject"
    assert negotiate("IFMarkInt", "2048", params) == "Irrelevant"
    assert negotiate("Frobnicate", "1", params) == "NotUnderstood"
    assert negotiate("MaxRecvDataSegmentLength", "65536", params) is None  # declarative
    assert (params.max_burst_length, params.initial_r2t, params.immediate_data) == (4096, True,
                                                                                     False)
    assert params.max_recv_data_segment_length == 65536


def test_discovery_session_answers_send_targets() -> None:
    conn = IscsiTargetConnection([TARGET, OTHER], PORTAL)
    discovery = [("InitiatorName", INITIATOR), ("SessionType", "Discovery")]
    events, [response] = answer(conn, login_pdu(0x87, text(discovery + OFFERS)))
    assert events == [LoginComplete(INITIATOR, "Discovery", "", ISID, conn.tsih)]
    assert "TargetPortalGroupTag" not in response.pairs
    _, [reply] = answer(conn, text_request(9, 1, text([("SendTargets", "All")])))
    assert reply.opcode == 0x24 and reply.flags == 0x80 and reply.u32(16) == 9
    assert reply.u32(20) == NO_TAG and reply.data == text([
        ("TargetName", TARGET), ("TargetAddress", PORTAL),
        ("TargetName", OTHER), ("TargetAddress", PORTAL)])
    _, [refused] = answer(conn, scsi_command(1, 1, READ_10, 8192, read=True))
    assert refused.opcode == 0x3F and refused.header[2] == 0x04 and refused.data[:1] == b"\x01"


def test_text_in_a_normal_session() -> None:
    conn = connect()
    _, [reply] = answer(conn, text_request(3, 1, text([("SendTargets", ""), ("Foo", "1")])))
    assert reply.data == text([("TargetName", TARGET), ("TargetAddress", PORTAL),
                               ("Foo", "NotUnderstood")])
    _, [reject] = answer(conn, text_request(4, 1, b"SendTargets=All\0", flags=0x40))
    assert reject.opcode == 0x3F and reject.data[16:20] == struct.pack(">I", 4)


# --- reads -------------------------------------------------------------------------------------


def test_read_is_cut_to_max_recv_data_segment_length_with_status_collapsed() -> None:
    conn = connect()
    events, pdus = answer(conn, scsi_command(0x10, 1, READ_10, 20000, read=True))
    assert pdus == [] and events == [ScsiCommand(0x10, 0, READ_10, b"", 20000, 1)]
    payload = bytes(range(256)) * 64  # 16 KiB: 3616 bytes less than expected
    conn.send_scsi_response(0x10, 0, data_in=payload)
    pdus = parse(conn.data_to_send())
    assert [p.opcode for p in pdus] == [0x25, 0x25]
    assert b"".join(p.data for p in pdus) == payload
    assert [p.u32(36) for p in pdus] == [0, 1] and [p.u32(40) for p in pdus] == [0, 8192]
    assert pdus[0].flags == 0 and pdus[1].flags == 0x80 | 0x02 | 0x01  # F, U, S
    assert pdus[1].header[3] == 0 and pdus[1].u32(44) == 3616 and pdus[1].u32(24) == 2
    assert pdus[1].u32(32) == 33  # the answered command freed its slot


def test_read_sequences_end_at_max_burst_length() -> None:
    conn = connect([(k, "16384" if k == "MaxBurstLength" else v) for k, v in OFFERS])
    feed(conn, scsi_command(1, 1, READ_10, 40000, read=True))
    conn.send_scsi_response(1, 0, data_in=bytes(40000))
    pdus = parse(conn.data_to_send())
    assert [len(p.data) for p in pdus] == [8192, 8192, 8192, 8192, 7232]
    assert [p.flags & 0x80 for p in pdus] == [0, 0x80, 0, 0x80, 0x80]


def test_overflow_and_check_condition() -> None:
    conn = connect()
    feed(conn, scsi_command(1, 1, READ_10, 512, read=True))
    conn.send_scsi_response(1, 0, data_in=bytes(1024))
    [last] = parse(conn.data_to_send())
    assert len(last.data) == 512 and last.flags == 0x80 | 0x04 | 0x01 and last.u32(44) == 512
    feed(conn, scsi_command(2, 2, READ_10, 512, read=True))
    sense = bytes([0x70, 0, 5]) + bytes(15)
    conn.send_scsi_response(2, 2, sense)
    [response] = parse(conn.data_to_send())
    assert response.opcode == 0x21 and response.header[2:4] == b"\x00\x02"
    assert response.data == struct.pack(">H", 18) + sense
    assert response.flags == 0x80 | 0x02 and response.u32(44) == 512  # underflow: no data


def test_cdb_lengths_and_extended_cdb() -> None:
    conn = connect()
    [event] = feed(conn, scsi_command(1, 1, bytes([0x12, 0, 0, 0, 36, 0]), 36, read=True))
    assert isinstance(event, ScsiCommand) and event.cdb == bytes([0x12, 0, 0, 0, 36, 0])
    extended = bytes(range(1, 17))
    ahs = struct.pack(">HBB", 17, 1, 0) + extended + bytes(3)
    [event] = feed(conn, scsi_command(2, 2, b"\x7f" + bytes(15), 0, ahs=ahs))
    assert isinstance(event, ScsiCommand) and event.cdb == b"\x7f" + bytes(15) + extended


# --- writes ------------------------------------------------------------------------------------


def test_write_with_immediate_data_only() -> None:
    conn = connect()
    data = b"\xab" * 4096
    events, pdus = answer(conn, scsi_command(5, 1, WRITE_10, 4096, write=True, data=data))
    assert events == [ScsiCommand(5, 0, WRITE_10, data, 0, 1)] and pdus == []
    conn.send_scsi_response(5, 0)
    [response] = parse(conn.data_to_send())
    assert response.opcode == 0x21 and response.flags == 0x80 and response.data == b""
    assert response.u32(36) == 0 and response.u32(44) == 0


@pytest.mark.parametrize("chunk", [0, 1, 4093])
def test_write_with_immediate_unsolicited_and_solicited_data(chunk: int) -> None:
    conn = connect()
    size = 65536 + 262144 + 4096
    payload = bytes(i * 7 % 251 for i in range(size))
    stream = scsi_command(6, 1, WRITE_10, size, write=True, final=False, data=payload[:8192])
    for n, offset in enumerate(range(8192, 65536, 8192)):
        stream += data_out(6, NO_TAG, n, offset, payload[offset : offset + 8192],
                           final=offset + 8192 == 65536)
    events, [r2t] = answer(conn, stream, chunk)
    assert events == [] and r2t.opcode == 0x31 and r2t.flags == 0x80
    assert (r2t.u32(16), r2t.u32(36), r2t.u32(40), r2t.u32(44)) == (6, 0, 65536, 262144)
    ttt = r2t.u32(20)
    stream = b"".join(data_out(6, ttt, n, offset, payload[offset : offset + 8192],
                               final=offset + 8192 == 65536 + 262144)
                      for n, offset in enumerate(range(65536, 65536 + 262144, 8192)))
    events, [r2t] = answer(conn, stream, chunk)
    assert events == [] and (r2t.u32(36), r2t.u32(40), r2t.u32(44)) == (1, 327680, 4096)
    events, pdus = answer(conn, data_out(6, r2t.u32(20), 0, 327680, payload[327680:]), chunk)
    assert events == [ScsiCommand(6, 0, WRITE_10, payload, 0, 1)] and pdus == []
    conn.send_scsi_response(6, 0)
    [response] = parse(conn.data_to_send())
    assert response.u32(36) == 2  # ExpDataSN: the R2Ts sent


def test_write_with_initial_r2t_gets_an_r2t_at_once() -> None:
    conn = connect([(k, "Yes" if k == "InitialR2T" else v) for k, v in OFFERS])
    events, [r2t] = answer(conn, scsi_command(7, 1, WRITE_10, 4096, write=True))
    assert events == [] and (r2t.u32(40), r2t.u32(44)) == (0, 4096)
    _, [refused] = answer(conn, scsi_command(8, 2, WRITE_10, 4096, write=True, final=False))
    assert refused.opcode == 0x21 and refused.data[2 + 12 : 2 + 14] == b"\x0c\x0c"


@pytest.mark.parametrize(("data_sn", "offset", "sense_code"), [
    (27, 0, b"\x4b\x00"), (0, 512, b"\x4b\x05")])
def test_bad_data_out_fails_the_command_not_the_connection(data_sn: int, offset: int,
                                                           sense_code: bytes) -> None:
    conn = connect([(k, "Yes" if k == "InitialR2T" else v) for k, v in OFFERS])
    _, [r2t] = answer(conn, scsi_command(7, 1, WRITE_10, 1024, write=True))
    _, [response] = answer(conn, data_out(7, r2t.u32(20), data_sn, offset, bytes(512), False))
    assert response.opcode == 0x21 and response.header[3] == 2
    assert response.data[2 + 2] == 0x0B and response.data[2 + 12 : 2 + 14] == sense_code
    events, pdus = answer(conn, data_out(7, r2t.u32(20), 1, 512, bytes(512)))
    assert events == [] and pdus == []  # the rest of its data is dropped
    [event] = feed(conn, scsi_command(8, 2, READ_10, 512, read=True))
    assert isinstance(event, ScsiCommand)


def test_data_out_with_an_unknown_ttt_is_rejected() -> None:
    conn = connect([(k, "Yes" if k == "InitialR2T" else v) for k, v in OFFERS])
    feed(conn, scsi_command(7, 1, WRITE_10, 1024, write=True))
    conn.data_to_send()
    _, [reject] = answer(conn, data_out(7, 0x1234, 0, 0, bytes(512)))
    assert reject.opcode == 0x3F and reject.header[2] == 0x09 and reject.data[0] == 0x05


def test_bidirectional_and_oversized_writes_are_refused() -> None:
    conn = connect()
    _, [bidi] = answer(conn, scsi_command(1, 1, WRITE_10, 512, read=True, write=True))
    assert bidi.header[3] == 2 and bidi.data[2 + 12] == 0x20
    _, [big] = answer(conn, scsi_command(2, 2, WRITE_10, 64 << 20, write=True))
    assert big.header[3] == 2 and big.data[2 + 12] == 0x24


# --- sequence numbers, NOP, task management, logout, rejects ---------------------------------


def test_cmd_sn_outside_the_window_is_ignored() -> None:
    conn = connect()
    assert feed(conn, scsi_command(1, 33, READ_10, 512, read=True)) == []  # > MaxCmdSN
    assert feed(conn, scsi_command(2, 2, READ_10, 512, read=True)) == []  # gap
    assert conn.data_to_send() == b""
    [event] = feed(conn, scsi_command(3, 1, READ_10, 512, read=True))
    assert isinstance(event, ScsiCommand)
    assert feed(conn, scsi_command(4, 1, READ_10, 512, read=True)) == []  # duplicate
    [immediate] = feed(conn, scsi_command(5, 77, READ_10, 512, read=True, immediate=True))
    assert isinstance(immediate, ScsiCommand)


def test_window_fills_and_reopens() -> None:
    conn = IscsiTargetConnection(TARGET, PORTAL, cmd_window=2)
    feed(conn, login_pdu(0x87, text(LEADING)))
    assert feed(conn, b"".join(scsi_command(i, i, READ_10, 0) for i in (1, 2, 3))) == [
        ScsiCommand(1, 0, READ_10, b"", 0, 1), ScsiCommand(2, 0, READ_10, b"", 0, 1)]
    conn.data_to_send()
    conn.send_scsi_response(1, 0)
    [response] = parse(conn.data_to_send())
    assert (response.u32(28), response.u32(32)) == (3, 3)
    assert feed(conn, scsi_command(3, 3, READ_10, 0)) == [ScsiCommand(3, 0, READ_10, b"", 0, 1)]


def test_nop_out_ping_is_echoed() -> None:
    conn = connect()
    events, [nop_in] = answer(conn, nop_out(0x99, 1, b"ping!"))
    assert events == [] and nop_in.opcode == 0x20 and nop_in.u32(16) == 0x99
    assert nop_in.u32(20) == NO_TAG and nop_in.data == b"ping!"
    assert answer(conn, nop_out(NO_TAG, 1)) == ([], [])
    _, [second] = answer(conn, nop_out(0x9A, 1, immediate=False))
    assert second.u32(24) == nop_in.u32(24) + 1 and second.u32(28) == 2


def test_abort_task_drops_the_answer() -> None:
    conn = connect()
    feed(conn, scsi_command(1, 1, READ_10, 512, read=True))
    [event] = feed(conn, task_management(50, 2, 1, 1))
    assert event == TaskManagement(50, 1, 1, 0, 0)
    assert conn.task_tags == {1} and conn.abort_task(1) and not conn.abort_task(1)
    conn.send_scsi_response(1, 0, data_in=bytes(512))  # finished after all: dropped
    conn.send_task_management_response(50, 0)
    [response] = parse(conn.data_to_send())
    assert response.opcode == 0x22 and response.header[2] == 0 and response.u32(16) == 50
    with pytest.raises(IscsiProtocolError):
        conn.send_task_management_response(50, 0)
    with pytest.raises(IscsiProtocolError):
        conn.send_scsi_response(1, 0)
    assert conn.state is State.FULL_FEATURE  # misuse does not break the connection


def test_logout_waits_for_the_answers_in_flight() -> None:
    conn = connect()
    feed(conn, scsi_command(1, 1, READ_10, 512, read=True))
    events, pdus = answer(conn, logout(60, 2))
    assert events == [LogoutRequested(0)] and pdus == [] and conn.state is State.LOGGING_OUT
    conn.send_scsi_response(1, 0, data_in=bytes(512))
    data_in, response = parse(conn.data_to_send())
    assert data_in.opcode == 0x25 and response.opcode == 0x26 and response.u32(16) == 60
    assert response.header[2] == 0 and conn.state is State.LOGGED_OUT
    assert feed(conn, b"") == [ConnectionClosed()]


def test_logout_for_recovery_is_refused() -> None:
    conn = connect()
    events, [response] = answer(conn, logout(61, 1, reason=2))
    assert events == [] and response.header[2] == 2 and conn.state is State.FULL_FEATURE


@pytest.mark.parametrize("opcode", [0x10, 0x03, 0x07, 0x1C, 0x3E])
def test_unexpected_opcodes_are_rejected(opcode: int) -> None:
    conn = connect()
    header = bytes([opcode]) + bytes(47)
    _, [reject] = answer(conn, header)
    assert reject.opcode == 0x3F and reject.u32(16) == NO_TAG and reject.data == header
    assert reject.header[2] == (0x04 if opcode in (0x10, 0x03) else 0x05)


def test_framing_errors_break_the_connection() -> None:
    conn = connect()
    with pytest.raises(IscsiProtocolError):
        feed(conn, struct.pack(">BBHI", 0x01, 0x80, 0, 1 << 20) + bytes(40))
    assert conn.state is State.ERROR
    with pytest.raises(IscsiProtocolError):
        conn.next_event()
    conn = connect()
    with pytest.raises(IscsiProtocolError):
        feed(conn, nop_out(1, 1)[:30])  # then the stream ends inside the PDU
        feed(conn, b"")
    conn = IscsiTargetConnection(TARGET, PORTAL)
    with pytest.raises(IscsiProtocolError):
        feed(conn, nop_out(1, 1))  # anything but a login first


def test_a_whole_session_byte_by_byte_and_with_trailing_bytes() -> None:
    session = (login_pdu(0x87, text(LEADING + OFFERS)) + nop_out(1, 1, b"x")
               + scsi_command(2, 1, WRITE_10, 1024, write=True, data=bytes(1024))
               + text_request(3, 2, b"SendTargets=All\0"))
    whole = feed(IscsiTargetConnection(TARGET, PORTAL, tsih=1), session)
    for chunk in (1, 5, 47, 49):
        conn = IscsiTargetConnection(TARGET, PORTAL, tsih=1)
        assert feed(conn, session, chunk) == whole
    conn = IscsiTargetConnection(TARGET, PORTAL, tsih=1)
    assert feed(conn, session + nop_out(4, 3)[:20]) == whole  # the rest may come later
    assert [type(event) for event in whole] == [LoginComplete, ScsiCommand]


# --- fuzz -------------------------------------------------------------------------------------

_pdus = st.one_of(
    st.builds(nop_out, st.integers(0, 2**32 - 1), st.integers(0, 40), st.binary(max_size=20),
              st.booleans()),
    st.builds(scsi_command, st.integers(0, 2**32 - 1), st.integers(0, 40),
              st.sampled_from([READ_10, WRITE_10, b"\x12\0\0\0\x24\0", b""]),
              st.integers(0, 70000), read=st.booleans(), write=st.booleans(),
              final=st.booleans(), data=st.binary(max_size=600), immediate=st.booleans()),
    st.builds(data_out, st.integers(0, 8), st.integers(0, 3) | st.just(NO_TAG),
              st.integers(0, 3), st.integers(0, 1024), st.binary(max_size=600), st.booleans()),
    st.builds(task_management, st.integers(0, 2**32 - 1), st.integers(0, 40),
              st.integers(0, 127), st.integers(0, 8)),
    st.builds(text_request, st.integers(0, 9), st.integers(0, 40), st.binary(max_size=40),
              st.sampled_from([0x80, 0x40, 0])),
    st.builds(logout, st.integers(0, 9), st.integers(0, 40), st.integers(0, 127)),
    st.builds(login_pdu, st.integers(0, 255), st.binary(max_size=60)),
)


def _drive(conn: IscsiTargetConnection, data: bytes, chunk: int) -> None:
    """Feed `data`, then the end of the stream, answering every command at once as a driver
    does."""
    pieces = [data[at : at + chunk] for at in range(0, len(data), chunk)] + [b""]
    for piece in pieces:
        conn.receive_data(piece)
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, ConnectionClosed):
                return
            if isinstance(event, ScsiCommand):
                data_in = bytes(event.data_in_bytes % 9000)
                conn.send_scsi_response(event.task_tag, 0, data_in=data_in)
            elif isinstance(event, TaskManagement):
                conn.abort_task(event.referenced_task_tag)
                conn.send_task_management_response(event.task_tag, 0)
        parse(conn.data_to_send())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=60), _pdus), max_size=8), st.integers(1, 64),
       st.booleans())
def test_fuzz_only_protocol_errors_escape(pieces: list[bytes], chunk: int, login: bool) -> None:
    conn = IscsiTargetConnection(TARGET, PORTAL)
    prefix = login_pdu(0x87, text(LEADING + OFFERS)) if login else b""
    try:
        _drive(conn, prefix + b"".join(pieces), chunk)
    except IscsiProtocolError:
        assert conn.state is State.ERROR
    else:
        assert conn.state is State.CLOSED
