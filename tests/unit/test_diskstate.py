"""The replicated value of a shared disk: encoding, and the bounded memory of applied
reservation commands."""

from vhdshare import diskstate
from vhdshare.diskstate import DONE_PER_INITIATOR, DiskState, DoneCommand
from vhdshare.reservations import Registration, ReservationState


def done(initiator: str, request_id: int) -> DoneCommand:
    return DoneCommand(initiator, request_id, diskstate.fingerprint(b"cdb", b""), 0, b"")


def test_round_trip_and_the_empty_state() -> None:
    state = DiskState(ReservationState((Registration("a", 7),), generation=1), (done("a", 1),))
    assert diskstate.decode(diskstate.encode(state)) == state
    assert diskstate.decode(b"") == DiskState()


def test_each_initiator_keeps_its_newest_commands() -> None:
    state = DiskState()
    for request_id in range(DONE_PER_INITIATOR + 3):
        state = state.with_done(done("a", request_id)).with_done(done("b", request_id))
    kept = {(c.initiator, c.request_id) for c in state.done}
    newest = range(3, DONE_PER_INITIATOR + 3)
    assert kept == {(who, i) for who in "ab" for i in newest}
    mark = diskstate.fingerprint(b"cdb", b"")
    assert state.find_done("a", DONE_PER_INITIATOR + 2, mark) is not None
    assert state.find_done("a", 0, mark) is None  # forgotten
    assert state.find_done("a", DONE_PER_INITIATOR + 2, b"other") is None  # another command
