"""SCSI-3 persistent reservations (SPC-4 5.13) as a pure function of a small value.

Theory of operation: the whole reservation state of one logical unit —
registrations (initiator → key, in registration order), the reservation
(holder and type), the PRgeneration counter, the APTPL flag and the unit
attentions still owed to each initiator — is one immutable msgspec Struct,
`ReservationState`.  It can be stored, encoded (`msgspec.msgpack.encode`) and
replicated as it is.  Every PERSISTENT RESERVE OUT service action is a pure
function `(state, initiator, request) -> PrOutcome(new state, aborted)`; it
raises `ReservationConflict` or `CheckCondition` instead of changing anything.
Reads and writes ask `conflicts(state, initiator, access)`, which is the SPC-4
/ SBC-3 "commands allowed in the presence of various reservations" table,
written out once in `_ALLOWED_FOR_NON_HOLDER`.

An initiator id stands for an I_T nexus: the target has one target port.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec

from vhdshare.scsi import (
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
    REGISTRATIONS_PREEMPTED,
    RESERVATIONS_PREEMPTED,
    RESERVATIONS_RELEASED,
    Access,
    Asc,
    ReservationConflict,
    illegal_request,
    invalid_field,
    invalid_parameter,
)

MAX_UNIT_ATTENTIONS_PER_INITIATOR = 8
GENERATION_MODULUS = 1 << 32
LU_SCOPE = 0


class PrType(enum.IntEnum):
    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8

    @property
    def all_registrants(self) -> bool:
        return self in _ALL_REGISTRANTS_TYPES

    @property
    def single_holder(self) -> bool:
        """WE and EA: no registrant other than the holder has any privilege."""
        return self in (PrType.WRITE_EXCLUSIVE, PrType.EXCLUSIVE_ACCESS)


_ALL_REGISTRANTS_TYPES = frozenset(
    {PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS}
)


class PrOutAction(enum.IntEnum):
    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06


class PrInAction(enum.IntEnum):
    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


# --- the replicated value -------------------------------------------------------


class Registration(msgspec.Struct, frozen=True):
    initiator: str
    key: int


class Reservation(msgspec.Struct, frozen=True):
    holder: str  # for all-registrants types: the initiator that created it
    type_code: int  # a PrType value

    @property
    def type(self) -> PrType:
        return PrType(self.type_code)


class UnitAttention(msgspec.Struct, frozen=True):
    initiator: str
    asc: int
    ascq: int


class ReservationState(msgspec.Struct, frozen=True):
    registrations: tuple[Registration, ...] = ()
    reservation: Reservation | None = None
    generation: int = 0
    aptpl: bool = False
    unit_attentions: tuple[UnitAttention, ...] = ()

    def key_of(self, initiator: str) -> int | None:
        for registration in self.registrations:
            if registration.initiator == initiator:
                return registration.key
        return None

    def is_holder(self, initiator: str) -> bool:
        if self.reservation is None or self.key_of(initiator) is None:
            return False
        return self.reservation.type.all_registrants or self.reservation.holder == initiator

    def reservation_key(self) -> int:
        """The key READ RESERVATION reports: 0 for all-registrants types."""
        if self.reservation is None or self.reservation.type.all_registrants:
            return 0
        return self.key_of(self.reservation.holder) or 0


# --- the conflict table -----------------------------------------------------------

# (type held by another I_T nexus, access class) -> (allowed from a registered
# non-holder, allowed from an unregistered I_T nexus).  SPC-4 table 66 and
# SBC-3 table 13; Access.ALLOWED commands never conflict.
_ALLOWED_FOR_NON_HOLDER: dict[tuple[PrType, Access], tuple[bool, bool]] = {
    (PrType.WRITE_EXCLUSIVE, Access.READ): (True, True),
    (PrType.WRITE_EXCLUSIVE, Access.WRITE): (False, False),
    (PrType.EXCLUSIVE_ACCESS, Access.READ): (False, False),
    (PrType.EXCLUSIVE_ACCESS, Access.WRITE): (False, False),
    (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, Access.READ): (True, True),
    (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, Access.WRITE): (True, False),
    (PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, Access.READ): (True, False),
    (PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, Access.WRITE): (True, False),
    (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, Access.READ): (True, True),
    (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, Access.WRITE): (True, False),
    (PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, Access.READ): (True, False),
    (PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, Access.WRITE): (True, False),
}


def conflicts(state: ReservationState, initiator: str, access: Access) -> bool:
    """True when a command of this access class must end in RESERVATION CONFLICT."""
    if state.reservation is None or access is Access.ALLOWED or state.is_holder(initiator):
        return False
    registered_ok, unregistered_ok = _ALLOWED_FOR_NON_HOLDER[(state.reservation.type, access)]
    allowed = registered_ok if state.key_of(initiator) is not None else unregistered_ok
    return not allowed


# --- unit attentions ----------------------------------------------------------------


def add_unit_attention(
    state: ReservationState, initiators: Iterable[str], code: Asc
) -> ReservationState:
    """Queue a unit attention for each initiator (once, bounded per initiator)."""
    queue = list(state.unit_attentions)
    for initiator in initiators:
        mine = [ua for ua in queue if ua.initiator == initiator]
        if any((ua.asc, ua.ascq) == code for ua in mine):
            continue
        if len(mine) >= MAX_UNIT_ATTENTIONS_PER_INITIATOR:
            queue.remove(mine[0])
        queue.append(UnitAttention(initiator, code[0], code[1]))
    return msgspec.structs.replace(state, unit_attentions=tuple(queue))


def pop_unit_attention(
    state: ReservationState, initiator: str
) -> tuple[ReservationState, UnitAttention | None]:
    """Take the oldest unit attention owed to `initiator`, if any."""
    for index, ua in enumerate(state.unit_attentions):
        if ua.initiator == initiator:
            rest = state.unit_attentions[:index] + state.unit_attentions[index + 1 :]
            return msgspec.structs.replace(state, unit_attentions=rest), ua
    return state, None


# --- PERSISTENT RESERVE OUT ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrOutRequest:
    """A PR OUT command with its 24-byte parameter list already parsed."""

    action: PrOutAction
    scope: int
    type_code: int
    key: int
    service_action_key: int
    aptpl: bool = False


@dataclass(frozen=True, slots=True)
class PrOutcome:
    state: ReservationState
    aborted_initiators: tuple[str, ...] = ()


def apply_pr_out(state: ReservationState, initiator: str, request: PrOutRequest) -> PrOutcome:
    """Apply one service action; raises ReservationConflict or CheckCondition."""
    if request.action in _REGISTERING:
        return PrOutcome(_register(state, initiator, request))
    if state.key_of(initiator) != request.key:
        raise ReservationConflict()  # unregistered, or the wrong key
    handler = _HANDLERS[request.action]
    return handler(state, initiator, request)


_REGISTERING = (PrOutAction.REGISTER, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY)


def _bump(state: ReservationState, **changes: object) -> ReservationState:
    generation = (state.generation + 1) % GENERATION_MODULUS
    return msgspec.structs.replace(state, generation=generation, **changes)


def _register(state: ReservationState, initiator: str, request: PrOutRequest) -> ReservationState:
    current_key = state.key_of(initiator)
    if request.action is PrOutAction.REGISTER:
        expected_key = 0 if current_key is None else current_key
        if request.key != expected_key:
            raise ReservationConflict()
    new_key = request.service_action_key
    if current_key is None and new_key == 0:
        return state  # nothing to register: GOOD, no change
    if new_key == 0:
        return _unregister(state, initiator, request.aptpl)
    registrations = _replace_key(state.registrations, initiator, new_key)
    return _bump(state, registrations=registrations, aptpl=request.aptpl)


def _replace_key(
    registrations: tuple[Registration, ...], initiator: str, key: int
) -> tuple[Registration, ...]:
    if all(r.initiator != initiator for r in registrations):
        return (*registrations, Registration(initiator, key))
    return tuple(
        Registration(r.initiator, key) if r.initiator == initiator else r for r in registrations
    )


def _unregister(state: ReservationState, initiator: str, aptpl: bool) -> ReservationState:
    was_holder = state.is_holder(initiator)
    remaining = tuple(r for r in state.registrations if r.initiator != initiator)
    reservation = state.reservation
    new_state = _bump(state, registrations=remaining, aptpl=aptpl)
    if reservation is None or not was_holder:
        return new_state
    if reservation.type.all_registrants:
        if remaining:
            return new_state  # the other registrants still hold it
        return msgspec.structs.replace(new_state, reservation=None)
    new_state = msgspec.structs.replace(new_state, reservation=None)
    if not reservation.type.single_holder:  # registrants-only: tell the registrants
        others = [r.initiator for r in remaining]
        new_state = add_unit_attention(new_state, others, RESERVATIONS_RELEASED)
    return new_state


def _check_scope_and_type(request: PrOutRequest) -> PrType:
    if request.scope != LU_SCOPE:
        raise invalid_field(2, 7)
    try:
        return PrType(request.type_code)
    except ValueError:
        raise invalid_field(2, 3) from None


def _reserve(state: ReservationState, initiator: str, request: PrOutRequest) -> PrOutcome:
    pr_type = _check_scope_and_type(request)
    if state.reservation is not None:
        if state.is_holder(initiator) and state.reservation.type is pr_type:
            return PrOutcome(state)
        raise ReservationConflict()
    return PrOutcome(msgspec.structs.replace(state, reservation=Reservation(initiator, pr_type)))


def _release(state: ReservationState, initiator: str, request: PrOutRequest) -> PrOutcome:
    reservation = state.reservation
    if reservation is None or not state.is_holder(initiator):
        return PrOutcome(state)
    if request.scope != LU_SCOPE or request.type_code != reservation.type_code:
        raise illegal_request(INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    new_state = msgspec.structs.replace(state, reservation=None)
    if not reservation.type.single_holder:
        others = [r.initiator for r in state.registrations if r.initiator != initiator]
        new_state = add_unit_attention(new_state, others, RESERVATIONS_RELEASED)
    return PrOutcome(new_state)


def _clear(state: ReservationState, initiator: str, request: PrOutRequest) -> PrOutcome:
    others = [r.initiator for r in state.registrations if r.initiator != initiator]
    new_state = _bump(state, registrations=(), reservation=None)
    return PrOutcome(add_unit_attention(new_state, others, RESERVATIONS_PREEMPTED))


def _preempt(state: ReservationState, initiator: str, request: PrOutRequest) -> PrOutcome:
    pr_type = _check_scope_and_type(request)
    reservation = state.reservation
    victim_key = request.service_action_key
    if reservation is not None and reservation.type.all_registrants and victim_key == 0:
        victims = [r.initiator for r in state.registrations if r.initiator != initiator]
        return _remove(state, initiator, victims, Reservation(initiator, pr_type))
    holds_alone = reservation is not None and not reservation.type.all_registrants
    if holds_alone and victim_key == state.reservation_key():
        return _preempt_holder(state, initiator, victim_key, pr_type)
    if victim_key == 0:
        raise invalid_parameter(8)
    return _remove_by_key(state, initiator, victim_key, state.reservation)


def _preempt_holder(
    state: ReservationState, initiator: str, victim_key: int, pr_type: PrType
) -> PrOutcome:
    victims = [
        r.initiator
        for r in state.registrations
        if r.key == victim_key and r.initiator != initiator
    ]
    return _remove(state, initiator, victims, Reservation(initiator, pr_type))


def _remove_by_key(
    state: ReservationState, initiator: str, victim_key: int, reservation: Reservation | None
) -> PrOutcome:
    matching = [r.initiator for r in state.registrations if r.key == victim_key]
    if not matching:
        raise ReservationConflict()
    victims = [name for name in matching if name != initiator]
    return _remove(state, initiator, victims, reservation)


def _remove(
    state: ReservationState,
    initiator: str,
    victims: list[str],
    reservation: Reservation | None,
) -> PrOutcome:
    """Drop the victims' registrations, install `reservation`, queue the unit attentions."""
    remaining = tuple(r for r in state.registrations if r.initiator not in victims)
    new_state = _bump(state, registrations=remaining, reservation=reservation)
    new_state = add_unit_attention(new_state, victims, REGISTRATIONS_PREEMPTED)
    old = state.reservation
    if old is not None and reservation is not None and old.type_code != reservation.type_code:
        survivors = [r.initiator for r in remaining if r.initiator != initiator]
        new_state = add_unit_attention(new_state, survivors, RESERVATIONS_RELEASED)
    return PrOutcome(new_state, tuple(victims))


def _preempt_and_abort(
    state: ReservationState, initiator: str, request: PrOutRequest
) -> PrOutcome:
    return _preempt(state, initiator, request)


def _preempt_only(state: ReservationState, initiator: str, request: PrOutRequest) -> PrOutcome:
    outcome = _preempt(state, initiator, request)
    return PrOutcome(outcome.state)  # PREEMPT does not abort the victims' commands


_HANDLERS: dict[PrOutAction, Callable[[ReservationState, str, PrOutRequest], PrOutcome]] = {
    PrOutAction.RESERVE: _reserve,
    PrOutAction.RELEASE: _release,
    PrOutAction.CLEAR: _clear,
    PrOutAction.PREEMPT: _preempt_only,
    PrOutAction.PREEMPT_AND_ABORT: _preempt_and_abort,
}
