"""The iSCSI wire format (RFC 7143), as the target core sees it: everything about bytes, no state.

The opcodes, flags and codes; one `struct.Struct` per basic header segment (BHS, 48 bytes)
of each PDU the target reads or writes, named after the PDU, size asserted; the typed
events `vhdshare.iscsi.IscsiTargetConnection` hands out, with `NEED_DATA`; and
`IscsiProtocolError`. The text data segments of Login and Text PDUs and the negotiation of
their keys are in `vhdshare.iscsi_keys`.

Header and data digests are never negotiated, so a PDU is the BHS, TotalAHSLength * 4
bytes of additional header segments, and the data segment padded to a multiple of 4.
In every record `lengths` is bytes 4-7 of the BHS: TotalAHSLength (in 4-byte words) in the
top byte, DataSegmentLength in the low 24 bits (`pack_lengths`, `split_lengths`).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from vhdshare.sansio import NEED_DATA, NeedData  # noqa: F401 (re-exported with the events)

BHS_BYTES = 48
RESERVED_TAG = 0xFFFFFFFF  # "no task": ITT of unsolicited PDUs, TTT when none is wanted
SERIAL_MASK = 0xFFFFFFFF  # sequence numbers are 32-bit serial numbers (RFC 1982)
ISCSI_VERSION = 0x00
DEFAULT_MAX_RECV_DATA_SEGMENT_BYTES = 8192  # what either side may assume until declared
MAX_DATA_SEGMENT_BYTES = (1 << 24) - 1
MAX_KEY_BYTES = 63
MAX_VALUE_BYTES = 8192
OPCODE_MASK = 0x3F
IMMEDIATE = 0x40  # the I bit in byte 0 of initiator PDUs
FINAL = 0x80  # the F bit in byte 1
TEXT_CONTINUE = 0x40  # the C bit in byte 1 of Text Requests
AHS_EXTENDED_CDB = 1
AHS_HEADER = struct.Struct(">HBB")  # AHSLength, AHSType, AHS-specific
assert AHS_HEADER.size == 4
SENSE_LENGTH = struct.Struct(">H")  # prefix of the sense data in a SCSI Response
assert SENSE_LENGTH.size == 2

# --- the basic header segments ------------------------------------------------------------------

# opcode|I, flags, -, lengths, LUN, ITT, TTT, CmdSN, ExpStatSN, -
NOP_OUT = struct.Struct(">BBHIQIIII16s")
assert NOP_OUT.size == BHS_BYTES
# opcode|I, flags (F R W ATTR), -, lengths, LUN, ITT, expected data transfer length, CmdSN,
# ExpStatSN, CDB
SCSI_COMMAND = struct.Struct(">BBHIQIIII16s")
assert SCSI_COMMAND.size == BHS_BYTES
# opcode|I, 1|function, -, lengths, LUN, ITT, referenced task tag, CmdSN, ExpStatSN,
# RefCmdSN, ExpDataSN, -
TASK_MANAGEMENT_REQUEST = struct.Struct(">BBHIQIIIIII8s")
assert TASK_MANAGEMENT_REQUEST.size == BHS_BYTES
# opcode|I, flags (T C CSG NSG), version-max, version-min, lengths, ISID, TSIH, ITT, CID, -,
# CmdSN, ExpStatSN, -
LOGIN_REQUEST = struct.Struct(">BBBBI6sHIHHII16s")
assert LOGIN_REQUEST.size == BHS_BYTES
# opcode|I, flags (F C), -, lengths, LUN, ITT, TTT, CmdSN, ExpStatSN, -
TEXT_REQUEST = struct.Struct(">BBHIQIIII16s")
assert TEXT_REQUEST.size == BHS_BYTES
# opcode, flags (F), -, lengths, LUN, ITT, TTT, -, ExpStatSN, -, DataSN, buffer offset, -
DATA_OUT = struct.Struct(">BBHIQIIIIIIII")
assert DATA_OUT.size == BHS_BYTES
# opcode|I, 1|reason code, -, lengths, -, ITT, CID, -, CmdSN, ExpStatSN, -
LOGOUT_REQUEST = struct.Struct(">BBHI8sIHHII16s")
assert LOGOUT_REQUEST.size == BHS_BYTES

# opcode, flags, -, lengths, LUN, ITT, TTT, StatSN, ExpCmdSN, MaxCmdSN, -
NOP_IN = struct.Struct(">BBHIQIIIII12s")
assert NOP_IN.size == BHS_BYTES
# opcode, flags (o u O U), response, status, lengths, -, ITT, SNACK tag, StatSN, ExpCmdSN,
# MaxCmdSN, ExpDataSN, bidirectional read residual count, residual count
SCSI_RESPONSE = struct.Struct(">BBBBI8sIIIIIIII")
assert SCSI_RESPONSE.size == BHS_BYTES
# opcode, flags, response, -, lengths, -, ITT, -, StatSN, ExpCmdSN, MaxCmdSN, -
TASK_MANAGEMENT_RESPONSE = struct.Struct(">BBBBI8sI4sIII12s")
assert TASK_MANAGEMENT_RESPONSE.size == BHS_BYTES
# opcode, flags (T C CSG NSG), version-max, version-active, lengths, ISID, TSIH, ITT, -,
# StatSN, ExpCmdSN, MaxCmdSN, status-class, status-detail, -
LOGIN_RESPONSE = struct.Struct(">BBBBI6sHI4sIIIBB10s")
assert LOGIN_RESPONSE.size == BHS_BYTES
# opcode, flags (F C), -, lengths, LUN, ITT, TTT, StatSN, ExpCmdSN, MaxCmdSN, -
TEXT_RESPONSE = struct.Struct(">BBHIQIIIII12s")
assert TEXT_RESPONSE.size == BHS_BYTES
# opcode, flags (F A O U S), -, status, lengths, LUN, ITT, TTT, StatSN, ExpCmdSN, MaxCmdSN,
# DataSN, buffer offset, residual count
DATA_IN = struct.Struct(">BBBBIQIIIIIIII")
assert DATA_IN.size == BHS_BYTES
# opcode, flags, response, -, lengths, -, ITT, -, StatSN, ExpCmdSN, MaxCmdSN, -,
# Time2Wait, Time2Retain, -
LOGOUT_RESPONSE = struct.Struct(">BBBBI8sI4sIII4sHH4s")
assert LOGOUT_RESPONSE.size == BHS_BYTES
# opcode, flags, -, lengths, LUN, ITT, TTT, StatSN, ExpCmdSN, MaxCmdSN, R2TSN, buffer offset,
# desired data transfer length
R2T = struct.Struct(">BBHIQIIIIIIII")
assert R2T.size == BHS_BYTES
# opcode, flags, reason, -, lengths, -, 0xffffffff, -, StatSN, ExpCmdSN, MaxCmdSN,
# DataSN/R2TSN, -   (the data segment is the header of the rejected PDU)
REJECT = struct.Struct(">BBBBI8sI4sIIII8s")
assert REJECT.size == BHS_BYTES


class IscsiProtocolError(Exception):
    """The initiator (or the caller) broke the iSCSI protocol."""


class TextError(Exception):
    """A text data segment that does not parse; the login or text request fails."""


def pack_lengths(data_bytes: int, ahs_words: int = 0) -> int:
    return (ahs_words << 24) | data_bytes


def split_lengths(lengths: int) -> tuple[int, int]:
    """(AHS bytes, data segment bytes) from bytes 4-7 of a BHS."""
    return (lengths >> 24) * 4, lengths & 0xFFFFFF


def padding(size_bytes: int) -> int:
    return -size_bytes % 4


# --- opcodes, flags and codes --------------------------------------------------------------------


class Opcode(enum.IntEnum):
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MANAGEMENT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MANAGEMENT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    REJECT = 0x3F


class CommandFlag(enum.IntFlag):
    FINAL = 0x80
    READ = 0x40
    WRITE = 0x20
    ATTRIBUTE_MASK = 0x07


class LoginFlag(enum.IntFlag):
    TRANSIT = 0x80
    CONTINUE = 0x40
    CSG_MASK = 0x0C
    NSG_MASK = 0x03


class DataInFlag(enum.IntFlag):
    FINAL = 0x80
    ACKNOWLEDGE = 0x40
    OVERFLOW = 0x04
    UNDERFLOW = 0x02
    STATUS = 0x01


class ResponseFlag(enum.IntFlag):
    BIDI_OVERFLOW = 0x10
    BIDI_UNDERFLOW = 0x08
    OVERFLOW = 0x04
    UNDERFLOW = 0x02


class Stage(enum.IntEnum):
    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


class LoginStatus(enum.IntEnum):
    """Status-Class << 8 | Status-Detail of a Login Response."""

    SUCCESS = 0x0000
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


class RejectReason(enum.IntEnum):
    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class TmfFunction(enum.IntEnum):
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(enum.IntEnum):
    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    FUNCTION_NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    FUNCTION_REJECTED = 255


class LogoutReason(enum.IntEnum):
    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_FOR_RECOVERY = 2


class LogoutResponse(enum.IntEnum):
    SUCCESS = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class ScsiResponseCode(enum.IntEnum):
    COMPLETED_AT_TARGET = 0x00
    TARGET_FAILURE = 0x01


# --- reading headers ---------------------------------------------------------------------------


def serial_after(a: int, b: int) -> bool:
    """a > b in 32-bit serial number arithmetic (RFC 1982)."""
    return a != b and (a - b) & SERIAL_MASK < 1 << 31


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """The fields of a Login Request header the target uses."""

    flags: int
    version_min: int
    isid: bytes
    tsih: int
    itt: int
    cid: int
    cmd_sn: int

    @classmethod
    def parse(cls, header: bytes) -> LoginRequest:
        _, flags, _, version_min, _, isid, tsih, itt, cid, _, cmd_sn, _, _ = \
            LOGIN_REQUEST.unpack(header)
        return cls(flags, version_min, isid, tsih, itt, cid, cmd_sn)

    @property
    def transit(self) -> bool:
        return bool(self.flags & LoginFlag.TRANSIT)

    @property
    def csg(self) -> int:
        return (self.flags & LoginFlag.CSG_MASK) >> 2

    @property
    def nsg(self) -> int:
        return self.flags & LoginFlag.NSG_MASK


_CDB_BYTES = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}  # by opcode group (SAM-5 CDB formats)


def full_cdb(cdb: bytes, ahs: bytes) -> bytes:
    """The CDB field cut to its opcode group's length, or extended by an Extended CDB AHS."""
    extension, offset = b"", 0
    while offset < len(ahs):
        if len(ahs) - offset < AHS_HEADER.size:
            raise IscsiProtocolError("truncated additional header segment")
        length, kind, _ = AHS_HEADER.unpack_from(ahs, offset)
        if offset + 3 + length > len(ahs):
            raise IscsiProtocolError("additional header segment longer than TotalAHSLength")
        if kind == AHS_EXTENDED_CDB:
            extension += ahs[offset + 4 : offset + 3 + length]
        offset += 3 + length + padding(3 + length)
    if extension:
        return cdb + extension
    return cdb[: _CDB_BYTES.get(cdb[0] >> 5, len(cdb))]


def residual(expected_bytes: int, actual_bytes: int) -> tuple[int, int]:
    """(U/O flags, residual count) of a data-in transfer against the expected length."""
    if actual_bytes > expected_bytes:
        return ResponseFlag.OVERFLOW, actual_bytes - expected_bytes
    if actual_bytes < expected_bytes:
        return ResponseFlag.UNDERFLOW, expected_bytes - actual_bytes
    return 0, 0


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoginComplete:
    """The login phase ended; the full feature phase begins."""

    initiator_name: str
    session_type: str  # "Normal" or "Discovery"
    target_name: str  # "" in a discovery session
    isid: bytes
    tsih: int


@dataclass(frozen=True, slots=True)
class LoginRejected:
    """A Login Response with a failure status was queued; close after sending it."""

    status: LoginStatus
    reason: str


@dataclass(frozen=True, slots=True)
class ScsiCommand:
    """A command with all its data-out; answer with `send_scsi_response(task_tag, ...)`."""

    task_tag: int
    lun: int  # the 8-byte LUN field as a big-endian number: LUN 0 is 0
    cdb: bytes
    data_out: bytes
    data_in_bytes: int  # the expected data transfer length of a read, else 0
    task_attribute: int


@dataclass(frozen=True, slots=True)
class TaskManagement:
    """Answer with `send_task_management_response(task_tag, response)`."""

    task_tag: int
    function: int
    referenced_task_tag: int
    lun: int
    referenced_cmd_sn: int


@dataclass(frozen=True, slots=True)
class LogoutRequested:
    """The Logout Response goes out once every command is answered; then close."""

    reason: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The initiator ended the stream between PDUs."""


Event = (LoginComplete | LoginRejected | ScsiCommand | TaskManagement | LogoutRequested
         | ConnectionClosed)
