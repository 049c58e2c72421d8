"""Wire formats of PERSISTENT RESERVE IN / OUT (SPC-4 6.15, 6.16).

Why separate from `reservations`: the rules work on typed values; this module
is the only place that knows the byte layouts — the 24-byte PR OUT parameter
list on the way in, and the READ KEYS / READ RESERVATION / REPORT CAPABILITIES
/ READ FULL STATUS parameter data on the way out.  One `struct.Struct` per
record, size asserted.
"""

from __future__ import annotations

import struct

from vhdshare.reservations import (
    LU_SCOPE,
    PrInAction,
    PrOutAction,
    PrOutRequest,
    ReservationState,
)
from vhdshare.scsi import (
    PARAMETER_LIST_LENGTH_ERROR,
    illegal_request,
    invalid_field,
    invalid_parameter,
)
from vhdshare.scsi_cdb import PersistentReserveIn, PersistentReserveOut

PR_OUT_PARAMETERS = struct.Struct(">QQ4sBB2s")  # key, SA key, -, flags, -, -
assert PR_OUT_PARAMETERS.size == 24
PR_IN_HEADER = struct.Struct(">II")  # PRgeneration, additional length
assert PR_IN_HEADER.size == 8
PR_KEY = struct.Struct(">Q")
assert PR_KEY.size == 8
PR_RESERVATION_DESCRIPTOR = struct.Struct(">Q4sBBH")  # key, -, -, scope|type, -
assert PR_RESERVATION_DESCRIPTOR.size == 16
PR_CAPABILITIES = struct.Struct(">HBBHH")  # length, flags, flags, type mask, -
assert PR_CAPABILITIES.size == 8
PR_FULL_STATUS_DESCRIPTOR = struct.Struct(">Q4sBB4sHI")  # key, -, flags, scope|type, -, port, len
assert PR_FULL_STATUS_DESCRIPTOR.size == 24
TRANSPORT_ID_HEADER = struct.Struct(">BBH")  # format|protocol, -, additional length
assert TRANSPORT_ID_HEADER.size == 4

SPEC_I_PT = 0x08
ALL_TG_PT = 0x04
APTPL = 0x01
PROTOCOL_ID_ISCSI = 0x05
RELATIVE_TARGET_PORT_ID = 1
TRANSPORT_ID_MIN_NAME_BYTES = 20

# REPORT CAPABILITIES: ATP_C | PTPL_C; TMV; every type we support (SPC-4 table 178).
CAPABILITY_FLAGS = 0x04 | 0x01
TYPE_MASK_VALID = 0x80
ALL_TYPES_MASK = 0x8000 | 0x4000 | 0x2000 | 0x0800 | 0x0200 | 0x0001


def parse_pr_out(command: PersistentReserveOut, data_out: bytes) -> PrOutRequest:
    """Typed PR OUT request from the CDB and its parameter list (or CheckCondition)."""
    try:
        action = PrOutAction(command.service_action)
    except ValueError:
        raise invalid_field(1, 4) from None
    length = command.parameter_list_length
    if length != PR_OUT_PARAMETERS.size or len(data_out) < length:
        raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
    key, sa_key, _, flags, _, _ = PR_OUT_PARAMETERS.unpack_from(data_out)
    if flags & SPEC_I_PT:
        raise invalid_parameter(20)
    return PrOutRequest(action, command.scope, command.type_code, key, sa_key, bool(flags & APTPL))


def pr_in_data(command: PersistentReserveIn, state: ReservationState) -> bytes:
    """The full parameter data of a PR IN command (the caller truncates it)."""
    try:
        action = PrInAction(command.service_action)
    except ValueError:
        raise invalid_field(1, 4) from None
    if action is PrInAction.READ_KEYS:
        return _read_keys(state)
    if action is PrInAction.READ_RESERVATION:
        return _read_reservation(state)
    if action is PrInAction.REPORT_CAPABILITIES:
        return _report_capabilities(state)
    return _read_full_status(state)


def _read_keys(state: ReservationState) -> bytes:
    keys = b"".join(PR_KEY.pack(r.key) for r in state.registrations)
    return PR_IN_HEADER.pack(state.generation, len(keys)) + keys


def _read_reservation(state: ReservationState) -> bytes:
    if state.reservation is None:
        return PR_IN_HEADER.pack(state.generation, 0)
    descriptor = PR_RESERVATION_DESCRIPTOR.pack(
        state.reservation_key(), b"", 0, _scope_type(state.reservation.type_code), 0
    )
    return PR_IN_HEADER.pack(state.generation, len(descriptor)) + descriptor


def _report_capabilities(state: ReservationState) -> bytes:
    flags2 = TYPE_MASK_VALID | (APTPL if state.aptpl else 0)
    return PR_CAPABILITIES.pack(PR_CAPABILITIES.size, CAPABILITY_FLAGS, flags2, ALL_TYPES_MASK, 0)


def _read_full_status(state: ReservationState) -> bytes:
    descriptors = b"".join(
        _full_status_descriptor(state, r.initiator, r.key) for r in state.registrations
    )
    return PR_IN_HEADER.pack(state.generation, len(descriptors)) + descriptors


def _full_status_descriptor(state: ReservationState, initiator: str, key: int) -> bytes:
    holder = state.is_holder(initiator)
    type_code = state.reservation.type_code if holder and state.reservation else 0
    transport_id = iscsi_transport_id(initiator)
    return (
        PR_FULL_STATUS_DESCRIPTOR.pack(
            key,
            b"",
            0x01 if holder else 0x00,
            _scope_type(type_code) if holder else 0,
            b"",
            RELATIVE_TARGET_PORT_ID,
            len(transport_id),
        )
        + transport_id
    )


def _scope_type(type_code: int) -> int:
    return (LU_SCOPE << 4) | (type_code & 0x0F)


def iscsi_transport_id(initiator: str) -> bytes:
    """An iSCSI-name TransportID (SPC-4 7.6.4.6): NUL-terminated, padded to 4 bytes."""
    name = initiator.encode("utf-8", "replace") + b"\0"
    padded_length = max(TRANSPORT_ID_MIN_NAME_BYTES, -(-len(name) // 4) * 4)
    name = name.ljust(padded_length, b"\0")
    return TRANSPORT_ID_HEADER.pack(PROTOCOL_ID_ISCSI, 0, len(name)) + name
