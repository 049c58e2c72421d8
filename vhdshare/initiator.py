"""The initiator's side of the SCSI commands a VM host sends: CDBs and parameter lists built,
and the answers of PERSISTENT RESERVE IN and READ CAPACITY read back. One `struct.Struct`
per layout; the target's side of the same layouts is `scsi_cdb`, `scsi_pr`, `scsi_inquiry`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vhdshare.reservations import PrInAction, PrOutAction, PrType
from vhdshare.scsi import Opcode
from vhdshare.scsi_cdb import UNMAP_CDB
from vhdshare.scsi_inquiry import LBA_STATUS_DESCRIPTOR, LBA_STATUS_HEADER, PROVISIONING_MAPPED
from vhdshare.scsi_pr import (
    APTPL,
    PR_IN_HEADER,
    PR_KEY,
    PR_OUT_PARAMETERS,
    PR_RESERVATION_DESCRIPTOR,
)
from vhdshare.target import UNMAP_DESCRIPTOR, UNMAP_HEADER

CDB16 = struct.Struct(">BBQIBB")  # opcode, flags, LBA, transfer length, group, control
assert CDB16.size == 16
PR_IN_CDB = struct.Struct(">BB5sHB")  # opcode, service action, -, allocation length, control
assert PR_IN_CDB.size == 10
PR_OUT_CDB = struct.Struct(">BBB2sIB")  # opcode, service action, scope|type, -, length, control
assert PR_OUT_CDB.size == 10
READ_CAPACITY16_DATA = struct.Struct(">QI")  # last LBA, block length (the first 12 bytes)

FUA = 0x08
PR_IN_ALLOCATION_BYTES = 8192
READ_CAPACITY16_ALLOCATION_BYTES = 32
SERVICE_ACTION_READ_CAPACITY16 = 0x10
SERVICE_ACTION_GET_LBA_STATUS = 0x12
WRITE_SAME_UNMAP = 0x08
IGNORE_EXISTING_KEY_ACTION = PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY

TYPE_NAMES = {
    PrType.WRITE_EXCLUSIVE: "Write Exclusive",
    PrType.EXCLUSIVE_ACCESS: "Exclusive Access",
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: "Write Exclusive, registrants only",
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: "Exclusive Access, registrants only",
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: "Write Exclusive, all registrants",
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: "Exclusive Access, all registrants",
}


def test_unit_ready() -> bytes:
    return bytes(6)


def read16(lba: int, block_count: int) -> bytes:
    return CDB16.pack(Opcode.READ_16, 0, lba, block_count, 0, 0)


def write16(lba: int, block_count: int, fua: bool = False) -> bytes:
    return CDB16.pack(Opcode.WRITE_16, FUA if fua else 0, lba, block_count, 0, 0)


def synchronize_cache16() -> bytes:
    return CDB16.pack(Opcode.SYNCHRONIZE_CACHE_16, 0, 0, 0, 0, 0)


def read_capacity16() -> bytes:
    return CDB16.pack(Opcode.SERVICE_ACTION_IN_16, SERVICE_ACTION_READ_CAPACITY16, 0,
                      READ_CAPACITY16_ALLOCATION_BYTES, 0, 0)


def get_lba_status(lba: int, allocation_bytes: int) -> bytes:
    return CDB16.pack(Opcode.SERVICE_ACTION_IN_16, SERVICE_ACTION_GET_LBA_STATUS, lba,
                      allocation_bytes, 0, 0)


def write_same16(lba: int, block_count: int, unmap: bool = False) -> bytes:
    """WRITE SAME (16) of one data-out block over `block_count` blocks (UNMAP: may deallocate)."""
    return CDB16.pack(Opcode.WRITE_SAME_16, WRITE_SAME_UNMAP if unmap else 0, lba,
                      block_count, 0, 0)


def unmap(extents: list[tuple[int, int]]) -> tuple[bytes, bytes]:
    """UNMAP of (LBA, block count) extents: the CDB and its parameter list."""
    descriptors = b"".join(UNMAP_DESCRIPTOR.pack(lba, count, b"") for lba, count in extents)
    parameters = UNMAP_HEADER.pack(len(descriptors) + 6, len(descriptors), b"") + descriptors
    return UNMAP_CDB.pack(Opcode.UNMAP, 0, b"", 0, len(parameters), 0), parameters


def pr_in(action: PrInAction) -> bytes:
    return PR_IN_CDB.pack(Opcode.PERSISTENT_RESERVE_IN, action, b"", PR_IN_ALLOCATION_BYTES, 0)


def pr_out(action: PrOutAction, pr_type: PrType | None = None) -> bytes:
    """A PR OUT CDB (LU scope) for a 24-byte parameter list."""
    type_code = 0 if pr_type is None else int(pr_type)
    return PR_OUT_CDB.pack(Opcode.PERSISTENT_RESERVE_OUT, action, type_code, b"",
                           PR_OUT_PARAMETERS.size, 0)


def pr_out_parameters(key: int, service_action_key: int = 0, aptpl: bool = False) -> bytes:
    return PR_OUT_PARAMETERS.pack(key, service_action_key, b"", APTPL if aptpl else 0, 0, b"")


# -- answers --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Keys:
    generation: int
    keys: list[int]


@dataclass(frozen=True)
class HeldReservation:
    key: int
    type: PrType


@dataclass(frozen=True)
class ReservationInfo:
    generation: int
    reservation: HeldReservation | None


class AnswerError(Exception):
    """Parameter data that does not hold what its command returns."""


def parse_read_keys(data: bytes) -> Keys:
    generation, length = _pr_in_header(data)
    body = data[PR_IN_HEADER.size:PR_IN_HEADER.size + length]
    if len(body) % PR_KEY.size:
        raise AnswerError("READ KEYS data is not a list of 8-byte keys")
    keys = [PR_KEY.unpack_from(body, offset)[0] for offset in range(0, len(body), PR_KEY.size)]
    return Keys(generation, keys)


def parse_read_reservation(data: bytes) -> ReservationInfo:
    generation, length = _pr_in_header(data)
    if length == 0:
        return ReservationInfo(generation, None)
    if len(data) < PR_IN_HEADER.size + PR_RESERVATION_DESCRIPTOR.size:
        raise AnswerError("READ RESERVATION data is cut short")
    key, _, _, scope_type, _ = PR_RESERVATION_DESCRIPTOR.unpack_from(data, PR_IN_HEADER.size)
    try:
        pr_type = PrType(scope_type & 0x0F)
    except ValueError:
        raise AnswerError(f"unknown reservation type {scope_type & 0x0F}") from None
    return ReservationInfo(generation, HeldReservation(key, pr_type))


def parse_read_capacity16(data: bytes) -> tuple[int, int]:
    """(block count, block size in bytes)."""
    if len(data) < READ_CAPACITY16_DATA.size:
        raise AnswerError("READ CAPACITY (16) data is cut short")
    last_lba, block_bytes = READ_CAPACITY16_DATA.unpack_from(data)
    return last_lba + 1, block_bytes


def parse_lba_status(data: bytes) -> list[tuple[int, int, bool]]:
    """GET LBA STATUS data -> (first LBA, block count, mapped) runs."""
    if len(data) < LBA_STATUS_HEADER.size:
        raise AnswerError(f"GET LBA STATUS answer of {len(data)} bytes is too short")
    length, _ = LBA_STATUS_HEADER.unpack_from(data)
    end = min(len(data), length + 4)
    runs = []
    for offset in range(LBA_STATUS_HEADER.size, end - LBA_STATUS_DESCRIPTOR.size + 1,
                        LBA_STATUS_DESCRIPTOR.size):
        lba, count, provisioning, _ = LBA_STATUS_DESCRIPTOR.unpack_from(data, offset)
        runs.append((lba, count, provisioning & 0x0F == PROVISIONING_MAPPED))
    return runs


def _pr_in_header(data: bytes) -> tuple[int, int]:
    if len(data) < PR_IN_HEADER.size:
        raise AnswerError("PERSISTENT RESERVE IN data is shorter than its header")
    generation, length = PR_IN_HEADER.unpack_from(data)
    return int(generation), int(length)
