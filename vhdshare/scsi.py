"""SCSI vocabulary shared by the decoder, the reservation rules and the target.

Why a separate module: status codes, sense keys and additional sense codes are
the language every other SCSI module speaks.  Errors found anywhere below the
target are raised as `CheckCondition` (carrying fixed-format sense data) or
`ReservationConflict`; the target is the single boundary that turns them into
a `ScsiResponse` (DESIGN.md section 6).  Sans-IO: no I/O, no time.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# --- status codes (SAM-5) ---------------------------------------------------


class Status(enum.IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_ABORTED = 0x40


# --- sense keys (SPC-4 table 45) --------------------------------------------


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB


# --- additional sense code / qualifier pairs (SPC-4 annex D) ---------------

Asc = tuple[int, int]

NO_ADDITIONAL_SENSE: Asc = (0x00, 0x00)
WRITE_ERROR: Asc = (0x0C, 0x00)
UNRECOVERED_READ_ERROR: Asc = (0x11, 0x00)
PARAMETER_LIST_LENGTH_ERROR: Asc = (0x1A, 0x00)
INVALID_COMMAND_OPERATION_CODE: Asc = (0x20, 0x00)
LBA_OUT_OF_RANGE: Asc = (0x21, 0x00)
INVALID_FIELD_IN_CDB: Asc = (0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED: Asc = (0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST: Asc = (0x26, 0x00)
INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Asc = (0x26, 0x04)
POWER_ON_RESET: Asc = (0x29, 0x00)
RESERVATIONS_PREEMPTED: Asc = (0x2A, 0x03)
RESERVATIONS_RELEASED: Asc = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED: Asc = (0x2A, 0x05)
SAVING_PARAMETERS_NOT_SUPPORTED: Asc = (0x39, 0x00)
INTERNAL_TARGET_FAILURE: Asc = (0x44, 0x00)
INSUFFICIENT_REGISTRATION_RESOURCES: Asc = (0x55, 0x04)


# --- opcodes ----------------------------------------------------------------


class Opcode(enum.IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    INQUIRY = 0x12
    MODE_SENSE_6 = 0x1A
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    SYNCHRONIZE_CACHE_10 = 0x35
    UNMAP = 0x42
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    READ_16 = 0x88
    WRITE_16 = 0x8A
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0


class OpClass(enum.Enum):
    """What a command does, for routing and statistics (tunnel features)."""

    READ = "read"
    WRITE = "write"  # changes or flushes the medium
    RESERVATION = "reservation"
    INQUIRY = "inquiry"  # only describes the device
    OTHER = "other"


class Access(enum.Enum):
    """How a command is treated under a persistent reservation held elsewhere.

    The rows of SPC-4 table "SPC commands that are allowed in the presence of
    various reservations" and its SBC-3 counterpart collapse into three classes.
    """

    ALLOWED = "allowed"  # INQUIRY, REPORT LUNS, TUR, REQUEST SENSE, READ CAPACITY, PR IN/OUT
    READ = "read"  # READ: conflicts only under exclusive-access types
    WRITE = "write"  # WRITE, UNMAP, SYNC CACHE, MODE SENSE: conflicts under every type


# --- sense data (SPC-4 4.5.3 fixed format) ----------------------------------

FIXED_SENSE = struct.Struct(">BBBIBIBBBBH")
assert FIXED_SENSE.size == 18
FIXED_SENSE_CURRENT = 0x70
FIXED_SENSE_ADDITIONAL_LENGTH = FIXED_SENSE.size - 8


@dataclass(frozen=True, slots=True)
class SenseData:
    """Fixed-format sense data; `field_pointer` marks the offending CDB byte."""

    key: SenseKey
    asc: int
    ascq: int
    information: int = 0
    field_pointer: int | None = None
    in_cdb: bool = True
    bit_pointer: int | None = None

    def pack(self) -> bytes:
        sks_byte0, sks_field = 0, 0
        if self.field_pointer is not None:
            sks_byte0 = 0x80 | (0x40 if self.in_cdb else 0)
            if self.bit_pointer is not None:
                sks_byte0 |= 0x08 | (self.bit_pointer & 0x07)
            sks_field = self.field_pointer & 0xFFFF
        valid = 0x80 if self.information else 0
        return FIXED_SENSE.pack(
            valid | FIXED_SENSE_CURRENT,
            0,
            int(self.key) & 0x0F,
            self.information & 0xFFFFFFFF,
            FIXED_SENSE_ADDITIONAL_LENGTH,
            0,
            self.asc,
            self.ascq,
            0,
            sks_byte0,
            sks_field,
        )

    @classmethod
    def unpack(cls, data: bytes) -> SenseData:
        """Parse fixed-format sense data (used by tests and the VM-host side)."""
        if len(data) < FIXED_SENSE.size or data[0] & 0x7F not in (0x70, 0x71):
            raise ValueError("not fixed-format sense data")
        fields = FIXED_SENSE.unpack_from(data)
        sks_byte0, sks_field = fields[9], fields[10]
        has_sks = bool(sks_byte0 & 0x80)
        return cls(
            key=SenseKey(fields[2] & 0x0F),
            asc=fields[6],
            ascq=fields[7],
            information=fields[3] if fields[0] & 0x80 else 0,
            field_pointer=sks_field if has_sks else None,
            in_cdb=bool(sks_byte0 & 0x40) if has_sks else True,
            bit_pointer=(sks_byte0 & 0x07) if has_sks and sks_byte0 & 0x08 else None,
        )

    @property
    def code(self) -> Asc:
        return (self.asc, self.ascq)


def sense(
    key: SenseKey,
    code: Asc,
    *,
    field_pointer: int | None = None,
    in_cdb: bool = True,
    bit_pointer: int | None = None,
) -> SenseData:
    return SenseData(
        key, code[0], code[1], field_pointer=field_pointer, in_cdb=in_cdb, bit_pointer=bit_pointer
    )


# --- domain errors, converted to a response by the target -------------------


class CheckCondition(Exception):
    """A command ends in CHECK CONDITION with this sense data."""

    def __init__(self, sense_data: SenseData) -> None:
        super().__init__(f"{sense_data.key.name} {sense_data.asc:02X}h/{sense_data.ascq:02X}h")
        self.sense_data = sense_data


class ReservationConflict(Exception):
    """A command ends in RESERVATION CONFLICT (no sense data)."""


def illegal_request(
    code: Asc,
    *,
    field_pointer: int | None = None,
    in_cdb: bool = True,
    bit_pointer: int | None = None,
) -> CheckCondition:
    return CheckCondition(
        sense(
            SenseKey.ILLEGAL_REQUEST,
            code,
            field_pointer=field_pointer,
            in_cdb=in_cdb,
            bit_pointer=bit_pointer,
        )
    )


def invalid_field(byte_index: int, bit: int | None = None) -> CheckCondition:
    """INVALID FIELD IN CDB pointing at the offending byte (and bit)."""
    return illegal_request(INVALID_FIELD_IN_CDB, field_pointer=byte_index, bit_pointer=bit)


def invalid_parameter(byte_index: int) -> CheckCondition:
    """INVALID FIELD IN PARAMETER LIST pointing into the data-out buffer."""
    return illegal_request(
        INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=byte_index, in_cdb=False
    )


# --- the response -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScsiResponse:
    """What the target answers: status, sense bytes (may be empty), data-in bytes.

    `aborted_initiators` lists the initiators whose outstanding commands a
    PREEMPT AND ABORT asks the driver to abort; it never travels in the tunnel.
    """

    status: Status
    sense: bytes = b""
    data_in: bytes = b""
    aborted_initiators: tuple[str, ...] = ()

    @classmethod
    def good(cls, data_in: bytes = b"") -> ScsiResponse:
        return cls(Status.GOOD, b"", data_in)

    @classmethod
    def check_condition(cls, sense_data: SenseData) -> ScsiResponse:
        return cls(Status.CHECK_CONDITION, sense_data.pack(), b"")

    @classmethod
    def reservation_conflict(cls) -> ScsiResponse:
        return cls(Status.RESERVATION_CONFLICT, b"", b"")
