"""The reservation conflict table (SPC-4 table 66, SBC-3 table 13) through the target.

The expectations are written here once more, in the words of the standard, so
the table in vhdshare.reservations is checked against an independent copy.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_scsi_target import (
    MemoryImage,
    inquiry,
    mode_sense6,
    pr_in,
    pr_out,
    pr_out_params,
    read10,
    read_capacity10,
    read_capacity16,
    report_luns,
    request_sense,
    sync10,
    tur,
    unmap_cdb,
    unmap_list,
    write10,
    write_same16,
)
from vhdshare.reservations import (
    PrType,
    Registration,
    Reservation,
    ReservationState,
    UnitAttention,
)
from vhdshare.scsi import Status
from vhdshare.target import Target

WE, EA = PrType.WRITE_EXCLUSIVE, PrType.EXCLUSIVE_ACCESS
WE_RO, EA_RO = PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
WE_AR, EA_AR = PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS
ALL_TYPES = [WE, EA, WE_RO, EA_RO, WE_AR, EA_AR]
EXCLUSIVE_ACCESS_TYPES = {EA, EA_RO, EA_AR}

Command = tuple[bytes, bytes]  # CDB, data-out
UNMAP_PARAMS = unmap_list((0, 1))

READ_CLASS: dict[str, Command] = {"read": (read10(0, 1), b"")}
WRITE_CLASS: dict[str, Command] = {
    "write": (write10(0, 1), bytes(512)),
    "sync cache": (sync10(), b""),
    "unmap": (unmap_cdb(len(UNMAP_PARAMS)), UNMAP_PARAMS),
    "write same": (write_same16(0, 1), bytes(512)),
    "mode sense": (mode_sense6(0x3F), b""),
}
ALWAYS_ALLOWED: dict[str, Command] = {
    "inquiry": (inquiry(), b""),
    "test unit ready": (tur(), b""),
    "read capacity 10": (read_capacity10(), b""),
    "read capacity 16": (read_capacity16(), b""),
    "report luns": (report_luns(), b""),
    "request sense": (request_sense(), b""),
    "pr in": (pr_in(0), b""),
}
COMMANDS = {**READ_CLASS, **WRITE_CLASS, **ALWAYS_ALLOWED}


def expect_conflict(pr_type: PrType, command: str, role: str) -> bool:
    """SPC-4 5.13.1 / table 66 and SBC-3 4.17.2 / table 13, for a non-holder."""
    if role == "holder" or command in ALWAYS_ALLOWED:
        return False
    registered = role == "registered"
    if pr_type in (WE, EA):  # only the holder has any access beyond reading
        return command in WRITE_CLASS or pr_type is EA
    # registrants-only and all-registrants: registrants have full access
    if registered:
        return False
    return command in WRITE_CLASS or pr_type in EXCLUSIVE_ACCESS_TYPES


def reserved_target(pr_type: PrType) -> Target:
    target = Target(MemoryImage(64), "conflicts")
    assert target.execute("holder", pr_out(0), pr_out_params(0, 0x11)).status == Status.GOOD
    assert target.execute("registered", pr_out(0), pr_out_params(0, 0x22)).status == Status.GOOD
    assert target.execute("holder", pr_out(1, pr_type), pr_out_params(0x11)).status == Status.GOOD
    return target


@pytest.mark.parametrize("pr_type", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("role", ["holder", "registered", "unregistered"])
def test_conflict_table(pr_type: PrType, command: str, role: str) -> None:
    target = reserved_target(pr_type)
    cdb, data_out = COMMANDS[command]
    response = target.execute(role, cdb, data_out)
    conflict = response.status == Status.RESERVATION_CONFLICT
    assert conflict == expect_conflict(pr_type, command, role), response
    if not conflict:
        assert response.status == Status.GOOD, response


@pytest.mark.parametrize("pr_type", ALL_TYPES, ids=lambda t: t.name)
def test_no_reservation_means_no_conflict(pr_type: PrType) -> None:
    target = Target(MemoryImage(64), "d")
    target.execute("a", pr_out(0), pr_out_params(0, 1))
    for cdb, data_out in COMMANDS.values():
        assert target.execute("b", cdb, data_out).status == Status.GOOD


@pytest.mark.parametrize("pr_type", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(
    ("action", "expected"),
    [(0, Status.GOOD), (6, Status.GOOD), (1, Status.RESERVATION_CONFLICT),
     (2, Status.RESERVATION_CONFLICT), (3, Status.RESERVATION_CONFLICT),
     (4, Status.RESERVATION_CONFLICT), (5, Status.RESERVATION_CONFLICT)],
)
def test_pr_out_from_unregistered_initiator(pr_type: PrType, action: int, expected: Status) -> None:
    """Only REGISTER and REGISTER AND IGNORE EXISTING KEY work without a registration."""
    target = reserved_target(pr_type)
    response = target.execute("unregistered", pr_out(action, pr_type), pr_out_params(0, 0x33))
    assert response.status == expected


# --- the state is a value: stored, replicated, installed elsewhere-----------------------

_initiators = st.sampled_from(["a", "b", "c", "iqn.2024-01.org.example:vm1"])
_states = st.builds(
    ReservationState,
    registrations=st.lists(st.builds(Registration, _initiators, st.integers(1, 2**64 - 1)),
                           max_size=4).map(tuple),
    reservation=st.none() | st.builds(Reservation, _initiators, st.sampled_from(ALL_TYPES)),
    generation=st.integers(0, 2**32 - 1),
    aptpl=st.booleans(),
    unit_attentions=st.lists(
        st.builds(UnitAttention, _initiators, st.just(0x2A), st.integers(3, 5)), max_size=4
    ).map(tuple),
)


@settings(max_examples=100, deadline=None)
@given(state=_states)
def test_state_round_trips_through_msgpack_and_json(state: ReservationState) -> None:
    for encode, decode in ((msgspec.msgpack.encode, msgspec.msgpack.decode),
                           (msgspec.json.encode, msgspec.json.decode)):
        encoded: Callable[[object], bytes] = encode
        assert decode(encoded(state), type=ReservationState) == state


def test_state_installed_on_another_target_keeps_the_reservation() -> None:
    seen: list[ReservationState] = []
    first = Target(MemoryImage(64), "shared", on_state_change=seen.append)
    first.execute("a", pr_out(0), pr_out_params(0, 7))
    first.execute("a", pr_out(1, EA), pr_out_params(7))
    assert len(seen) == 2 and seen[-1] == first.state
    wire = msgspec.msgpack.encode(first.state)
    second = Target(MemoryImage(64), "shared")
    second.state = msgspec.msgpack.decode(wire, type=ReservationState)
    assert second.execute("b", read10(0, 1)).status == Status.RESERVATION_CONFLICT
    assert second.execute("a", read10(0, 1)).status == Status.GOOD
