"""Every PERSISTENT RESERVE OUT service action and PR IN report, with two and three
initiators and all six reservation types, including the unit attentions that follow.
"""

from __future__ import annotations

import struct

import pytest

from tests.unit.test_scsi_target import (
    MemoryImage,
    check,
    inquiry,
    pr_in,
    pr_out,
    pr_out_params,
    read10,
    report_luns,
    request_sense,
    tur,
    write10,
)
from vhdshare.reservations import PrType
from vhdshare.scsi import (
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
    PARAMETER_LIST_LENGTH_ERROR,
    REGISTRATIONS_PREEMPTED,
    RESERVATIONS_PREEMPTED,
    RESERVATIONS_RELEASED,
    ScsiResponse,
    SenseData,
    SenseKey,
    Status,
)
from vhdshare.target import Target

REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_IGNORE = range(7)
ALL_TYPES = list(PrType)
SINGLE_HOLDER = [PrType.WRITE_EXCLUSIVE, PrType.EXCLUSIVE_ACCESS]
REGISTRANTS_ONLY = [PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY]
ALL_REGISTRANTS = [PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
                   PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS]
ids = [t.name for t in ALL_TYPES]


class Lun:
    """A target plus helpers that speak PR OUT / PR IN as initiators would."""

    def __init__(self) -> None:
        self.target = Target(MemoryImage(64), "pr-disk")

    def out(self, who: str, action: int, key: int = 0, sa_key: int = 0,
            pr_type: int = 0, aptpl: bool = False, scope: int = 0) -> ScsiResponse:
        return self.target.execute(who, pr_out(action, pr_type, scope),
                                   pr_out_params(key, sa_key, aptpl))

    def ok(self, who: str, action: int, key: int = 0, sa_key: int = 0, pr_type: int = 0,
           aptpl: bool = False) -> ScsiResponse:
        response = self.out(who, action, key, sa_key, pr_type, aptpl)
        assert response.status == Status.GOOD, response
        return response

    def keys(self) -> tuple[int, list[int]]:
        data = self.target.execute("observer", pr_in(0)).data_in
        generation, length = struct.unpack(">II", data[:8])
        return generation, [struct.unpack(">Q", data[8 + i : 16 + i])[0]
                            for i in range(0, length, 8)]

    def reservation(self) -> tuple[int, int] | None:
        data = self.target.execute("observer", pr_in(1)).data_in
        if struct.unpack(">I", data[4:8])[0] == 0:
            return None
        key, _, _, scope_type, _ = struct.unpack(">Q4sBBH", data[8:24])
        return key, scope_type & 0x0F

    def unit_attention(self, who: str) -> tuple[int, int] | None:
        response = self.target.execute(who, tur())
        if response.status == Status.GOOD:
            return None
        sense = SenseData.unpack(response.sense)
        assert sense.key == SenseKey.UNIT_ATTENTION
        return sense.code


def registered(*keys: tuple[str, int]) -> Lun:
    lun = Lun()
    for who, key in keys:
        lun.ok(who, REGISTER, 0, key)
    return lun


# --- REGISTER / REGISTER AND IGNORE EXISTING KEY-----------------------------------------


def test_register_replace_and_unregister() -> None:
    lun = Lun()
    assert lun.out("a", REGISTER, 5, 1).status == Status.RESERVATION_CONFLICT  # key must be 0
    assert lun.keys() == (0, [])
    lun.ok("a", REGISTER, 0, 0)  # nothing to register: GOOD, no change
    assert lun.keys() == (0, [])
    lun.ok("a", REGISTER, 0, 0xA)
    lun.ok("b", REGISTER, 0, 0xB)
    assert lun.keys() == (2, [0xA, 0xB])
    assert lun.out("a", REGISTER, 0xB, 0xC).status == Status.RESERVATION_CONFLICT
    lun.ok("a", REGISTER, 0xA, 0xAA)
    assert lun.keys() == (3, [0xAA, 0xB])
    lun.ok("a", REGISTER, 0xAA, 0)
    assert lun.keys() == (4, [0xB])


def test_register_and_ignore_existing_key() -> None:
    lun = registered(("a", 1))
    lun.ok("a", REGISTER_IGNORE, 999, 2)
    lun.ok("b", REGISTER_IGNORE, 999, 3)
    assert lun.keys() == (3, [2, 3])
    lun.ok("b", REGISTER_IGNORE, 0, 0)
    assert lun.keys() == (4, [2])


def test_register_records_aptpl() -> None:
    lun = Lun()
    lun.ok("a", REGISTER, 0, 1, aptpl=True)
    caps = lun.target.execute("a", pr_in(2)).data_in
    assert struct.unpack(">H", caps[:2])[0] == 8 and caps[3] & 0x01  # PTPL_A
    assert caps[2] & 0x01 and caps[3] & 0x80  # PTPL_C, TMV
    assert struct.unpack(">H", caps[4:6])[0] == 0xEA01  # all six types
    assert lun.target.state.aptpl


def test_parameter_list_checks() -> None:
    target = Lun().target
    short = pr_out(REGISTER)[:5] + struct.pack(">I", 16) + b"\0"
    check(target.execute("a", short, bytes(16)), SenseKey.ILLEGAL_REQUEST,
          PARAMETER_LIST_LENGTH_ERROR)
    check(target.execute("a", pr_out(REGISTER), bytes(10)), SenseKey.ILLEGAL_REQUEST,
          PARAMETER_LIST_LENGTH_ERROR)
    spec_i_pt = struct.pack(">QQ4sBB2s", 0, 1, b"", 0x08, 0, b"")
    check(target.execute("a", pr_out(REGISTER), spec_i_pt), SenseKey.ILLEGAL_REQUEST,
          INVALID_FIELD_IN_PARAMETER_LIST)
    check(target.execute("a", pr_out(7), pr_out_params(0, 1)), SenseKey.ILLEGAL_REQUEST,
          INVALID_FIELD_IN_CDB)  # REGISTER AND MOVE is not supported
    check(target.execute("a", pr_in(9)), SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)


# --- RESERVE-----------------------------------------------------------------------------


@pytest.mark.parametrize("pr_type", ALL_TYPES, ids=ids)
def test_reserve(pr_type: PrType) -> None:
    lun = registered(("a", 1), ("b", 2))
    generation = lun.keys()[0]
    lun.ok("a", RESERVE, 1, pr_type=pr_type)
    expected_key = 0 if pr_type in ALL_REGISTRANTS else 1
    assert lun.reservation() == (expected_key, pr_type)
    assert lun.keys()[0] == generation  # RESERVE does not bump the generation
    lun.ok("a", RESERVE, 1, pr_type=pr_type)  # again: no change
    ea, we = PrType.EXCLUSIVE_ACCESS, PrType.WRITE_EXCLUSIVE
    other = ea if pr_type != ea else we
    assert lun.out("a", RESERVE, 1, pr_type=other).status == Status.RESERVATION_CONFLICT
    b_same = lun.out("b", RESERVE, 2, pr_type=pr_type).status
    assert b_same == (Status.GOOD if pr_type in ALL_REGISTRANTS else Status.RESERVATION_CONFLICT)
    assert lun.out("b", RESERVE, 99, pr_type=pr_type).status == Status.RESERVATION_CONFLICT
    assert lun.out("c", RESERVE, 0, pr_type=pr_type).status == Status.RESERVATION_CONFLICT


def test_reserve_checks_type_and_scope() -> None:
    lun = registered(("a", 1))
    check(lun.out("a", RESERVE, 1, pr_type=2), SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
    check(lun.out("a", RESERVE, 1, pr_type=1, scope=1), SenseKey.ILLEGAL_REQUEST,
          INVALID_FIELD_IN_CDB)
    assert lun.reservation() is None


# --- RELEASE-----------------------------------------------------------------------------


@pytest.mark.parametrize("pr_type", ALL_TYPES, ids=ids)
def test_release(pr_type: PrType) -> None:
    lun = registered(("a", 1), ("b", 2), ("c", 3))
    lun.ok("a", RESERVE, 1, pr_type=pr_type)
    generation = lun.keys()[0]
    wrong = PrType.WRITE_EXCLUSIVE if pr_type != PrType.WRITE_EXCLUSIVE else PrType.EXCLUSIVE_ACCESS
    check(lun.out("a", RELEASE, 1, pr_type=wrong), SenseKey.ILLEGAL_REQUEST,
          INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    assert lun.out("a", RELEASE, 2, pr_type=pr_type).status == Status.RESERVATION_CONFLICT
    if pr_type not in ALL_REGISTRANTS:
        lun.ok("b", RELEASE, 2, pr_type=pr_type)  # not the holder: GOOD, nothing happens
        assert lun.reservation() is not None
    releaser = "b" if pr_type in ALL_REGISTRANTS else "a"
    lun.ok(releaser, RELEASE, 2 if releaser == "b" else 1, pr_type=pr_type)
    assert lun.reservation() is None and lun.keys()[0] == generation
    others = {"a", "b", "c"} - {releaser}
    expected = None if pr_type in SINGLE_HOLDER else RESERVATIONS_RELEASED
    for who in sorted(others):
        assert lun.unit_attention(who) == expected
    assert lun.unit_attention(releaser) is None
    lun.ok("a", RELEASE, 1, pr_type=pr_type)  # nothing to release


# --- CLEAR-------------------------------------------------------------------------------


@pytest.mark.parametrize("pr_type", ALL_TYPES, ids=ids)
def test_clear(pr_type: PrType) -> None:
    lun = registered(("a", 1), ("b", 2), ("c", 3))
    lun.ok("a", RESERVE, 1, pr_type=pr_type)
    generation = lun.keys()[0]
    assert lun.out("b", CLEAR, 1).status == Status.RESERVATION_CONFLICT  # wrong key
    lun.ok("b", CLEAR, 2)
    assert lun.keys() == (generation + 1, []) and lun.reservation() is None
    assert lun.unit_attention("a") == RESERVATIONS_PREEMPTED
    assert lun.unit_attention("c") == RESERVATIONS_PREEMPTED
    assert lun.unit_attention("b") is None
    assert lun.unit_attention("a") is None  # reported once


# --- PREEMPT / PREEMPT AND ABORT---------------------------------------------------------


@pytest.mark.parametrize("action", [PREEMPT, PREEMPT_AND_ABORT])
@pytest.mark.parametrize("pr_type", SINGLE_HOLDER + REGISTRANTS_ONLY, ids=lambda t: t.name)
def test_preempt_the_holder(pr_type: PrType, action: int) -> None:
    """b takes the reservation from a; a loses its registration and learns it."""
    lun = registered(("a", 1), ("b", 2), ("c", 3))
    lun.ok("a", RESERVE, 1, pr_type=pr_type)
    assert lun.target.execute("a", write10(0, 1), bytes(512)).status == Status.GOOD
    generation = lun.keys()[0]
    new_type = PrType.EXCLUSIVE_ACCESS
    response = lun.ok("b", action, 2, 1, pr_type=new_type)
    assert response.aborted_initiators == (("a",) if action == PREEMPT_AND_ABORT else ())
    assert lun.keys() == (generation + 1, [2, 3])
    assert lun.reservation() == (2, new_type)
    assert lun.unit_attention("a") == REGISTRATIONS_PREEMPTED
    assert lun.target.execute("a", write10(0, 1), bytes(512)).status == (
        Status.RESERVATION_CONFLICT
    )
    # c kept its registration; the type changed (unless it did not), so it is told
    assert lun.unit_attention("c") == (None if pr_type == new_type else RESERVATIONS_RELEASED)
    assert lun.unit_attention("b") is None


def test_preempt_the_holder_with_two_initiators() -> None:
    lun = registered(("a", 1), ("b", 2))
    lun.ok("a", RESERVE, 1, pr_type=PrType.WRITE_EXCLUSIVE)
    assert lun.target.execute("b", write10(0, 1), bytes(512)).status == (
        Status.RESERVATION_CONFLICT
    )
    lun.ok("b", PREEMPT, 2, 1, pr_type=PrType.WRITE_EXCLUSIVE)
    assert lun.target.execute("b", write10(0, 1), bytes(512)).status == Status.GOOD
    check(lun.target.execute("a", read10(0, 1)), SenseKey.UNIT_ATTENTION, REGISTRATIONS_PREEMPTED)
    assert lun.target.execute("a", read10(0, 1)).status == Status.GOOD  # WE: reads allowed
    assert lun.target.execute("a", write10(0, 1), bytes(512)).status == (
        Status.RESERVATION_CONFLICT
    )


def test_holder_preempts_itself_to_change_type() -> None:
    lun = registered(("a", 1), ("b", 2))
    lun.ok("a", RESERVE, 1, pr_type=PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    lun.ok("a", PREEMPT, 1, 1, pr_type=PrType.EXCLUSIVE_ACCESS)
    assert lun.reservation() == (1, PrType.EXCLUSIVE_ACCESS)
    assert lun.keys()[1] == [1, 2]
    assert lun.unit_attention("b") == RESERVATIONS_RELEASED


@pytest.mark.parametrize("pr_type", ALL_REGISTRANTS, ids=lambda t: t.name)
def test_preempt_all_registrants_reservation(pr_type: PrType) -> None:
    lun = registered(("a", 1), ("b", 2), ("c", 3))
    lun.ok("a", RESERVE, 1, pr_type=pr_type)
    # a non-zero key only removes registrations; the reservation stays
    lun.ok("b", PREEMPT, 2, 3, pr_type=pr_type)
    assert lun.keys()[1] == [1, 2] and lun.reservation() == (0, pr_type)
    assert lun.unit_attention("c") == REGISTRATIONS_PREEMPTED
    # key 0 removes every other registrant and makes a new reservation
    response = lun.ok("b", PREEMPT_AND_ABORT, 2, 0, pr_type=PrType.WRITE_EXCLUSIVE)
    assert response.aborted_initiators == ("a",)
    assert lun.keys()[1] == [2] and lun.reservation() == (2, PrType.WRITE_EXCLUSIVE)
    assert lun.unit_attention("a") == REGISTRATIONS_PREEMPTED


def test_preempt_without_reservation_removes_registrations() -> None:
    lun = registered(("a", 1), ("b", 2), ("c", 2))
    lun.ok("a", PREEMPT, 1, 2, pr_type=PrType.WRITE_EXCLUSIVE)
    assert lun.keys()[1] == [1] and lun.reservation() is None
    assert lun.unit_attention("b") == REGISTRATIONS_PREEMPTED
    assert lun.unit_attention("c") == REGISTRATIONS_PREEMPTED
    assert lun.out("a", PREEMPT, 1, 77, pr_type=1).status == Status.RESERVATION_CONFLICT
    check(lun.out("a", PREEMPT, 1, 0, pr_type=1), SenseKey.ILLEGAL_REQUEST,
          INVALID_FIELD_IN_PARAMETER_LIST)
    assert lun.out("a", PREEMPT, 5, 1, pr_type=1).status == Status.RESERVATION_CONFLICT


def test_preempt_of_a_non_holder_keeps_the_reservation() -> None:
    lun = registered(("a", 1), ("b", 2), ("c", 3))
    lun.ok("a", RESERVE, 1, pr_type=PrType.EXCLUSIVE_ACCESS)
    lun.ok("a", PREEMPT, 1, 3, pr_type=PrType.EXCLUSIVE_ACCESS)
    assert lun.reservation() == (1, PrType.EXCLUSIVE_ACCESS) and lun.keys()[1] == [1, 2]
    assert lun.unit_attention("c") == REGISTRATIONS_PREEMPTED
    assert lun.unit_attention("b") is None


# --- unregistering the holder------------------------------------------------------------


@pytest.mark.parametrize("pr_type", ALL_TYPES, ids=ids)
def test_holder_unregisters(pr_type: PrType) -> None:
    lun = registered(("a", 1), ("b", 2))
    lun.ok("a", RESERVE, 1, pr_type=pr_type)
    lun.ok("a", REGISTER, 1, 0)
    if pr_type in ALL_REGISTRANTS:
        assert lun.reservation() == (0, pr_type)  # b still holds it
        lun.ok("b", REGISTER, 2, 0)
        assert lun.reservation() is None
        return
    assert lun.reservation() is None
    expected = RESERVATIONS_RELEASED if pr_type in REGISTRANTS_ONLY else None
    assert lun.unit_attention("b") == expected


# --- unit attention delivery-------------------------------------------------------------


def test_unit_attention_is_not_consumed_by_inquiry_and_is_returned_by_request_sense() -> None:
    lun = registered(("a", 1), ("b", 2))
    lun.ok("a", CLEAR, 1)
    assert lun.target.execute("b", inquiry()).status == Status.GOOD
    assert lun.target.execute("b", report_luns()).status == Status.GOOD
    data = lun.target.execute("b", request_sense()).data_in
    sense = SenseData.unpack(data)
    assert (sense.key, sense.code) == (SenseKey.UNIT_ATTENTION, RESERVATIONS_PREEMPTED)
    assert lun.unit_attention("b") is None


def test_unit_attention_comes_before_decoding_errors() -> None:
    lun = registered(("a", 1), ("b", 2))
    lun.ok("a", CLEAR, 1)
    check(lun.target.execute("b", bytes([0xEE]) + bytes(9)), SenseKey.UNIT_ATTENTION,
          RESERVATIONS_PREEMPTED)


# --- PR IN reports-----------------------------------------------------------------------


def test_read_full_status() -> None:
    lun = registered(("iqn.2024-01.org.example:a", 1), ("b", 2), ("c", 3))
    lun.ok("b", RESERVE, 2, pr_type=PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    data = lun.target.execute("a", pr_in(3)).data_in
    generation, length = struct.unpack(">II", data[:8])
    assert generation == 3 and length == len(data) - 8
    offset, found = 8, []
    while offset < len(data):
        key, _, flags, scope_type, _, port, tid_len = struct.unpack(
            ">Q4sBB4sHI", data[offset : offset + 24]
        )
        tid = data[offset + 24 : offset + 24 + tid_len]
        assert tid[0] == 0x05 and tid_len % 4 == 0 and tid_len >= 24 and port == 1
        name = tid[4:].rstrip(b"\0").decode()
        found.append((name, key, bool(flags & 1), scope_type))
        offset += 24 + tid_len
    assert found == [("iqn.2024-01.org.example:a", 1, False, 0), ("b", 2, True, 5),
                     ("c", 3, False, 0)]


def test_pr_in_allocation_length_truncates() -> None:
    lun = registered(("a", 1), ("b", 2))
    data = lun.target.execute("a", pr_in(0, alloc=12)).data_in
    assert len(data) == 12 and struct.unpack(">I", data[4:8])[0] == 16
