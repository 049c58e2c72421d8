"""CDB decoding: bytes in, one typed command out (or a CheckCondition).

Why: every later stage (reservation conflict check, target execution, tunnel
features) works on typed commands, so the bytes are looked at exactly once,
here.  One `struct.Struct` per CDB layout (SPC-4 / SBC-3), size asserted; one
decoder per opcode, registered in `_DECODERS`.  A CDB longer than its layout
is accepted (transports pad CDBs to 16 bytes); a shorter one, an unknown
opcode or a field we do not support raises `CheckCondition` with ILLEGAL
REQUEST and a field pointer.  Nothing else can escape `decode_cdb`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from vhdshare.scsi import (
    INVALID_COMMAND_OPERATION_CODE,
    Access,
    OpClass,
    Opcode,
    illegal_request,
    invalid_field,
)

# --- CDB layouts --------------------------------------------------------------

CDB6 = struct.Struct(">BB2sBB")  # opcode, byte1, reserved, length/alloc, control
assert CDB6.size == 6
INQUIRY_CDB = struct.Struct(">BBBHB")  # opcode, EVPD, page code, allocation length, control
assert INQUIRY_CDB.size == 6
MODE_SENSE6_CDB = struct.Struct(">BBBBBB")  # opcode, DBD, PC|page, subpage, alloc, control
assert MODE_SENSE6_CDB.size == 6
MODE_SENSE10_CDB = struct.Struct(">BBBB3sHB")  # ..., reserved, allocation length, control
assert MODE_SENSE10_CDB.size == 10
READ_CAPACITY10_CDB = struct.Struct(">BBIHBB")  # opcode, -, LBA, -, PMI, control
assert READ_CAPACITY10_CDB.size == 10
SERVICE_ACTION_IN16_CDB = struct.Struct(">BBQIBB")  # opcode, SA, LBA, alloc, PMI, control
assert SERVICE_ACTION_IN16_CDB.size == 16
RW10_CDB = struct.Struct(">BBIBHB")  # opcode, flags, LBA, group, transfer length, control
assert RW10_CDB.size == 10
RW16_CDB = struct.Struct(">BBQIBB")  # opcode, flags, LBA, transfer length, group, control
assert RW16_CDB.size == 16
UNMAP_CDB = struct.Struct(">BB4sBHB")  # opcode, ANCHOR, -, group, parameter list length, control
assert UNMAP_CDB.size == 10
REPORT_LUNS_CDB = struct.Struct(">BBB3sIBB")  # opcode, -, select report, -, alloc, -, control
assert REPORT_LUNS_CDB.size == 12
PR_IN_CDB = struct.Struct(">BB5sHB")  # opcode, service action, -, allocation length, control
assert PR_IN_CDB.size == 10
PR_OUT_CDB = struct.Struct(">BBB2sIB")  # opcode, SA, scope|type, -, parameter list length, control
assert PR_OUT_CDB.size == 10

CONTROL_NACA = 0x04
SA_READ_CAPACITY_16 = 0x10
SA_GET_LBA_STATUS = 0x12
PROTECT_MASK = 0xE0  # RDPROTECT / WRPROTECT (bits 7..5 of byte 1)
FUA_BIT = 0x08


# --- typed commands -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TestUnitReady:
    access: ClassVar[Access] = Access.ALLOWED
    op_class: ClassVar[OpClass] = OpClass.INQUIRY


@dataclass(frozen=True, slots=True)
class RequestSense:
    allocation_length: int
    descriptor_format: bool
    access: ClassVar[Access] = Access.ALLOWED
    op_class: ClassVar[OpClass] = OpClass.INQUIRY


@dataclass(frozen=True, slots=True)
class Inquiry:
    evpd: bool
    page_code: int
    allocation_length: int
    access: ClassVar[Access] = Access.ALLOWED
    op_class: ClassVar[OpClass] = OpClass.INQUIRY


@dataclass(frozen=True, slots=True)
class ModeSense:
    page_code: int
    subpage_code: int
    page_control: int
    disable_block_descriptors: bool
    long_lba: bool
    allocation_length: int
    ten_byte: bool
    access: ClassVar[Access] = Access.WRITE  # SPC-4: conflicts for non-registrants
    op_class: ClassVar[OpClass] = OpClass.INQUIRY


@dataclass(frozen=True, slots=True)
class ReadCapacity10:
    access: ClassVar[Access] = Access.ALLOWED
    op_class: ClassVar[OpClass] = OpClass.INQUIRY


@dataclass(frozen=True, slots=True)
class ReadCapacity16:
    allocation_length: int
    access: ClassVar[Access] = Access.ALLOWED
    op_class: ClassVar[OpClass] = OpClass.INQUIRY


@dataclass(frozen=True, slots=True)
class GetLbaStatus:
    """SBC-3 GET LBA STATUS: which blocks from `lba` on are mapped (the allocation map)."""

    lba: int
    allocation_length: int
    access: ClassVar[Access] = Access.READ  # it reveals the medium's contents
    op_class: ClassVar[OpClass] = OpClass.INQUIRY


@dataclass(frozen=True, slots=True)
class Read:
    lba: int
    block_count: int
    fua: bool
    access: ClassVar[Access] = Access.READ
    op_class: ClassVar[OpClass] = OpClass.READ


@dataclass(frozen=True, slots=True)
class Write:
    lba: int
    block_count: int
    fua: bool
    access: ClassVar[Access] = Access.WRITE
    op_class: ClassVar[OpClass] = OpClass.WRITE


@dataclass(frozen=True, slots=True)
class SynchronizeCache:
    lba: int
    block_count: int  # 0: to the end of the medium
    access: ClassVar[Access] = Access.WRITE
    op_class: ClassVar[OpClass] = OpClass.WRITE


@dataclass(frozen=True, slots=True)
class Unmap:
    parameter_list_length: int
    access: ClassVar[Access] = Access.WRITE
    op_class: ClassVar[OpClass] = OpClass.WRITE


@dataclass(frozen=True, slots=True)
class WriteSame16:
    lba: int
    block_count: int
    unmap: bool
    no_data_out: bool
    access: ClassVar[Access] = Access.WRITE
    op_class: ClassVar[OpClass] = OpClass.WRITE


@dataclass(frozen=True, slots=True)
class ReportLuns:
    select_report: int
    allocation_length: int
    access: ClassVar[Access] = Access.ALLOWED
    op_class: ClassVar[OpClass] = OpClass.INQUIRY


@dataclass(frozen=True, slots=True)
class PersistentReserveIn:
    service_action: int
    allocation_length: int
    access: ClassVar[Access] = Access.ALLOWED
    op_class: ClassVar[OpClass] = OpClass.RESERVATION


@dataclass(frozen=True, slots=True)
class PersistentReserveOut:
    service_action: int
    scope: int
    type_code: int
    parameter_list_length: int
    access: ClassVar[Access] = Access.ALLOWED  # registration rules are checked by the action
    op_class: ClassVar[OpClass] = OpClass.RESERVATION


Command = (
    TestUnitReady
    | RequestSense
    | Inquiry
    | ModeSense
    | ReadCapacity10
    | ReadCapacity16
    | GetLbaStatus
    | Read
    | Write
    | SynchronizeCache
    | Unmap
    | WriteSame16
    | ReportLuns
    | PersistentReserveIn
    | PersistentReserveOut
)


# --- decoders -------------------------------------------------------------------


def _fields(layout: struct.Struct, cdb: bytes) -> tuple[int, ...]:
    """Unpack a CDB layout; check its length and the NACA bit of the control byte."""
    if len(cdb) < layout.size:
        raise invalid_field(len(cdb))
    fields: tuple[int, ...] = layout.unpack_from(cdb)
    if cdb[layout.size - 1] & CONTROL_NACA:
        raise invalid_field(layout.size - 1, 2)
    return fields


def _decode_test_unit_ready(cdb: bytes) -> Command:
    _fields(CDB6, cdb)
    return TestUnitReady()


def _decode_request_sense(cdb: bytes) -> Command:
    _, flags, _, allocation_length, _ = _fields(CDB6, cdb)
    return RequestSense(allocation_length, bool(flags & 0x01))


def _decode_inquiry(cdb: bytes) -> Command:
    _, flags, page_code, allocation_length, _ = _fields(INQUIRY_CDB, cdb)
    if flags & 0x02:  # CMDDT is obsolete
        raise invalid_field(1, 1)
    evpd = bool(flags & 0x01)
    if not evpd and page_code:
        raise invalid_field(2)
    return Inquiry(evpd, page_code, allocation_length)


def _decode_mode_sense6(cdb: bytes) -> Command:
    _, flags, page, subpage, allocation_length, _ = _fields(MODE_SENSE6_CDB, cdb)
    return ModeSense(page & 0x3F, subpage, page >> 6, bool(flags & 0x08), False,
                     allocation_length, ten_byte=False)


def _decode_mode_sense10(cdb: bytes) -> Command:
    _, flags, page, subpage, _, allocation_length, _ = _fields(MODE_SENSE10_CDB, cdb)
    return ModeSense(page & 0x3F, subpage, page >> 6, bool(flags & 0x08), bool(flags & 0x10),
                     allocation_length, ten_byte=True)


def _decode_read_capacity10(cdb: bytes) -> Command:
    _, _, lba, _, pmi, _ = _fields(READ_CAPACITY10_CDB, cdb)
    if lba and not pmi & 0x01:
        raise invalid_field(2)
    return ReadCapacity10()


def _decode_service_action_in16(cdb: bytes) -> Command:
    _, service_action, lba, allocation_length, pmi, _ = _fields(SERVICE_ACTION_IN16_CDB, cdb)
    if service_action & 0x1F == SA_GET_LBA_STATUS:
        return GetLbaStatus(lba, allocation_length)
    if service_action & 0x1F != SA_READ_CAPACITY_16:
        raise invalid_field(1)
    if lba and not pmi & 0x01:
        raise invalid_field(2)
    return ReadCapacity16(allocation_length)


def _rw_flags(flags: int) -> bool:
    if flags & PROTECT_MASK:
        raise invalid_field(1, 7)
    return bool(flags & FUA_BIT)


def _decode_read10(cdb: bytes) -> Command:
    _, flags, lba, _, block_count, _ = _fields(RW10_CDB, cdb)
    return Read(lba, block_count, _rw_flags(flags))


def _decode_read16(cdb: bytes) -> Command:
    _, flags, lba, block_count, _, _ = _fields(RW16_CDB, cdb)
    return Read(lba, block_count, _rw_flags(flags))


def _decode_write10(cdb: bytes) -> Command:
    _, flags, lba, _, block_count, _ = _fields(RW10_CDB, cdb)
    return Write(lba, block_count, _rw_flags(flags))


def _decode_write16(cdb: bytes) -> Command:
    _, flags, lba, block_count, _, _ = _fields(RW16_CDB, cdb)
    return Write(lba, block_count, _rw_flags(flags))


def _decode_sync_cache10(cdb: bytes) -> Command:
    _, _, lba, _, block_count, _ = _fields(RW10_CDB, cdb)
    return SynchronizeCache(lba, block_count)


def _decode_sync_cache16(cdb: bytes) -> Command:
    _, _, lba, block_count, _, _ = _fields(RW16_CDB, cdb)
    return SynchronizeCache(lba, block_count)


def _decode_unmap(cdb: bytes) -> Command:
    _, flags, _, _, parameter_list_length, _ = _fields(UNMAP_CDB, cdb)
    if flags & 0x01:  # ANCHOR: anchored LBAs are not supported
        raise invalid_field(1, 0)
    return Unmap(parameter_list_length)


def _decode_write_same16(cdb: bytes) -> Command:
    _, flags, lba, block_count, _, _ = _fields(RW16_CDB, cdb)
    if flags & PROTECT_MASK:
        raise invalid_field(1, 7)
    if flags & 0x10:  # ANCHOR
        raise invalid_field(1, 4)
    if block_count == 0:  # WSNZ=1 in the Block Limits VPD page
        raise invalid_field(10)
    return WriteSame16(lba, block_count, bool(flags & 0x08), bool(flags & 0x01))


def _decode_report_luns(cdb: bytes) -> Command:
    _, _, select_report, _, allocation_length, _, _ = _fields(REPORT_LUNS_CDB, cdb)
    if select_report not in (0x00, 0x01, 0x02, 0x10, 0x11, 0x12):
        raise invalid_field(2)
    if allocation_length < 16:
        raise invalid_field(6)
    return ReportLuns(select_report, allocation_length)


def _decode_pr_in(cdb: bytes) -> Command:
    _, service_action, _, allocation_length, _ = _fields(PR_IN_CDB, cdb)
    return PersistentReserveIn(service_action & 0x1F, allocation_length)


def _decode_pr_out(cdb: bytes) -> Command:
    _, service_action, scope_type, _, parameter_list_length, _ = _fields(PR_OUT_CDB, cdb)
    return PersistentReserveOut(
        service_action & 0x1F, scope_type >> 4, scope_type & 0x0F, parameter_list_length
    )


_DECODERS: dict[int, Callable[[bytes], Command]] = {
    Opcode.TEST_UNIT_READY: _decode_test_unit_ready,
    Opcode.REQUEST_SENSE: _decode_request_sense,
    Opcode.INQUIRY: _decode_inquiry,
    Opcode.MODE_SENSE_6: _decode_mode_sense6,
    Opcode.MODE_SENSE_10: _decode_mode_sense10,
    Opcode.READ_CAPACITY_10: _decode_read_capacity10,
    Opcode.SERVICE_ACTION_IN_16: _decode_service_action_in16,
    Opcode.READ_10: _decode_read10,
    Opcode.READ_16: _decode_read16,
    Opcode.WRITE_10: _decode_write10,
    Opcode.WRITE_16: _decode_write16,
    Opcode.SYNCHRONIZE_CACHE_10: _decode_sync_cache10,
    Opcode.SYNCHRONIZE_CACHE_16: _decode_sync_cache16,
    Opcode.UNMAP: _decode_unmap,
    Opcode.WRITE_SAME_16: _decode_write_same16,
    Opcode.REPORT_LUNS: _decode_report_luns,
    Opcode.PERSISTENT_RESERVE_IN: _decode_pr_in,
    Opcode.PERSISTENT_RESERVE_OUT: _decode_pr_out,
}


def decode_cdb(cdb: bytes) -> Command:
    """Decode one CDB; raises only `CheckCondition` (ILLEGAL REQUEST)."""
    if not cdb:
        raise illegal_request(INVALID_COMMAND_OPERATION_CODE)
    decoder = _DECODERS.get(cdb[0])
    if decoder is None:
        raise illegal_request(INVALID_COMMAND_OPERATION_CODE, field_pointer=0)
    return decoder(bytes(cdb))


# --- features derived from a command ------------------------------------------------


def lba_range(command: Command) -> tuple[int, int] | None:
    """(first LBA, block count) a command touches, or None for non-medium commands."""
    if isinstance(command, Read | Write | WriteSame16 | SynchronizeCache):
        return (command.lba, command.block_count)
    return None


def data_out_length_bytes(command: Command, block_size: int) -> int:
    """How many bytes the initiator must send with this command."""
    if isinstance(command, Write):
        return command.block_count * block_size
    if isinstance(command, WriteSame16):
        return 0 if command.no_data_out else block_size
    if isinstance(command, Unmap | PersistentReserveOut):
        return command.parameter_list_length
    return 0


def data_in_length_bytes(command: Command, block_size: int) -> int:
    """The most bytes this command may return to the initiator."""
    if isinstance(command, Read):
        return command.block_count * block_size
    if isinstance(command, ReadCapacity10):
        return 8
    if isinstance(command, TestUnitReady | Write | SynchronizeCache | Unmap | WriteSame16):
        return 0
    if isinstance(command, PersistentReserveOut):
        return 0
    return command.allocation_length
