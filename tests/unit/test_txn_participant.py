"""The participant's transitions, one at a time (member n1; leader n0)."""

from __future__ import annotations

import errno

from clusterfs import records
from clusterfs.txn.actions import (
    Action,
    ApplyBatch,
    Discard,
    LogDurably,
    NeedSnapshot,
    Reply,
    Send,
)
from clusterfs.txn.messages import (
    Ack,
    Batch,
    CatchUp,
    Decide,
    Done,
    Entry,
    FetchLog,
    Forward,
    LogEntries,
    Prepare,
    Ready,
    Refused,
    Report,
    Survey,
    Vote,
)
from clusterfs.txn.participant import Participant, ParticipantConfig
from clusterfs.txn.view import View

VIEW = View(5, ("n0", "n1", "n2"), "n0")
CONFIG = ParticipantConfig(resend_interval_s=0.1, log_keep_batches=3)


def make(name: bytes) -> records.MakeNode:
    return records.MakeNode(1, name, 0o100644, 0, 0, 0, 0)


def batch(first_seq: int, *names: bytes, epoch: int = 5, origin: str = "n2") -> Batch:
    entries = tuple(Entry(origin, first_seq + i, make(n)) for i, n in enumerate(names))
    return Batch(epoch, first_seq, entries)


def joined(view: View = VIEW) -> Participant:
    participant = Participant("n1", config=CONFIG)
    participant.on_view(view, 0.0)
    participant.on_message("n0", Ready(view.epoch, 0), 0.0)
    return participant


def commit(participant: Participant, b: Batch) -> list[Action]:
    participant.on_message("n0", Prepare(5, b), 0.0)
    participant.logged(b.epoch, b.first_seq, True, 0.0)
    return participant.on_message("n0", Decide(5, b.first_seq, True), 0.0)


def test_a_capture_waits_for_ready_then_is_forwarded() -> None:
    participant = Participant("n1", config=CONFIG)
    participant.on_view(VIEW, 0.0)
    request_id, actions = participant.capture(make(b"a"), 0.0)
    assert actions == []
    actions = participant.on_message("n0", Ready(5, 0), 0.0)
    assert actions == [Send("n0", Forward(5, request_id, make(b"a"), request_id))]


def test_unanswered_forwards_are_resent() -> None:
    participant = joined()
    request_id, _ = participant.capture(make(b"a"), 0.0)
    assert participant.tick(0.05) == []
    assert participant.next_deadline_s() == 0.1
    assert participant.tick(0.1) == [Send("n0", Forward(5, request_id, make(b"a"), 1))]


def test_prepare_logs_then_votes_yes_once_durable() -> None:
    participant = joined()
    b = batch(1, b"a")
    assert participant.on_message("n0", Prepare(5, b), 0.0) == [LogDurably(b)]
    assert participant.on_message("n0", Prepare(5, b), 0.0) == []  # logging already
    assert participant.logged(5, 1, True, 0.0) == [Send("n0", Vote(5, 1, "n1", True))]
    assert participant.on_message("n0", Prepare(5, b), 0.0) == [
        Send("n0", Vote(5, 1, "n1", True))]


def test_a_failed_log_votes_no_every_time() -> None:
    participant = joined()
    b = batch(1, b"a")
    participant.on_message("n0", Prepare(5, b), 0.0)
    no = Send("n0", Vote(5, 1, "n1", False, "disk full"))
    assert participant.logged(5, 1, False, 0.0, "disk full") == [no]
    assert participant.on_message("n0", Prepare(5, b), 0.0) == [no]


def test_commit_applies_acks_and_done_answers_the_capturer() -> None:
    participant = joined()
    request_id, _ = participant.capture(make(b"a"), 0.0)
    b = Batch(5, 1, (Entry("n1", request_id, make(b"a")),))
    actions = commit(participant, b)
    assert actions == [ApplyBatch(b), Send("n0", Ack(5, "n1", 1))]
    assert participant.on_message("n0", Done(5, 1), 0.0) == [Reply(request_id, 0)]
    assert participant.pending_requests() == 0


def test_batches_are_applied_in_sequence_order_only() -> None:
    participant = joined()
    first, second = batch(1, b"a", b"b"), batch(3, b"c")
    for b in (first, second):
        participant.on_message("n0", Prepare(5, b), 0.0)
        participant.logged(5, b.first_seq, True, 0.0)
    early = participant.on_message("n0", Decide(5, 3, True), 0.0)
    assert not [a for a in early if isinstance(a, ApplyBatch)]
    actions = participant.on_message("n0", Decide(5, 1, True), 0.0)
    assert [a for a in actions if isinstance(a, ApplyBatch)] == [ApplyBatch(first),
                                                                  ApplyBatch(second)]
    assert participant.applied_seq == 3


def test_a_duplicate_decide_is_acknowledged_again_not_applied_twice() -> None:
    participant = joined()
    commit(participant, batch(1, b"a"))
    actions = participant.on_message("n0", Decide(5, 1, True), 0.0)
    assert actions == [Send("n0", Ack(5, "n1", 1))]


def test_an_abort_discards_the_prepared_batch() -> None:
    participant = joined()
    participant.on_message("n0", Prepare(5, batch(1, b"a")), 0.0)
    participant.logged(5, 1, True, 0.0)
    assert participant.on_message("n0", Decide(5, 1, False), 0.0) == [Discard(1)]
    assert participant.prepared == {}


def test_old_epochs_and_non_leaders_are_fenced_off() -> None:
    participant = joined()
    assert participant.on_message("n0", Prepare(4, batch(1, b"a", epoch=4)), 0.0) == []
    assert participant.on_message("n2", Prepare(5, batch(1, b"a")), 0.0) == []
    assert participant.on_message("n0", Prepare(6, batch(1, b"a", epoch=6)), 0.0) == []


def test_refused_answers_the_capturer_with_the_errno() -> None:
    participant = joined()
    request_id, _ = participant.capture(make(b"a"), 0.0)
    actions = participant.on_message("n0", Refused(5, request_id, errno.EEXIST), 0.0)
    assert actions == [Reply(request_id, errno.EEXIST)]
    assert participant.on_message("n0", Refused(5, request_id, errno.EEXIST), 0.0) == []


def test_removal_from_the_view_fails_waiting_requests_with_eio() -> None:
    participant = joined()
    request_id, _ = participant.capture(make(b"a"), 0.0)
    actions = participant.on_view(View(6, ("n0", "n2"), "n0"), 0.0)
    assert actions == [Reply(request_id, errno.EIO)]
    assert participant.capture(make(b"b"), 0.0)[1] == [Reply(request_id + 1, errno.EIO)]


def test_survey_reports_applied_and_durably_prepared_batches() -> None:
    participant = joined()
    commit(participant, batch(1, b"a"))
    pending = batch(2, b"b")
    participant.on_message("n0", Prepare(5, pending), 0.0)
    participant.logged(5, 2, True, 0.0)
    participant.on_message("n0", Prepare(5, batch(3, b"c")), 0.0)  # not durable yet
    assert participant.on_message("n0", Survey(5), 0.0) == [
        Send("n0", Report(5, "n1", 1, (pending,)))]


def test_catch_up_fetches_from_the_source_and_applies_in_order() -> None:
    participant = joined()
    actions = participant.on_message("n0", CatchUp(5, 3, "n2"), 0.0)
    assert actions == [Send("n2", FetchLog(5, 1))]
    batches = (batch(1, b"a"), batch(2, b"b", b"c"))
    actions = participant.on_message("n2", LogEntries(5, batches), 0.0)
    assert actions[:2] == [ApplyBatch(batches[0]), ApplyBatch(batches[1])]
    assert participant.applied_seq == 3


def test_fetch_log_is_answered_from_the_kept_log() -> None:
    participant = joined()
    batches = [batch(seq, b"x") for seq in range(1, 6)]
    for b in batches:
        commit(participant, b)
    assert participant.on_message("n2", FetchLog(5, 4), 0.0) == [
        Send("n2", LogEntries(5, tuple(batches[3:])))]
    assert participant.on_message("n2", FetchLog(5, 1), 0.0) == [
        Send("n2", LogEntries(5, (), too_old=True))]
    assert participant.on_message("n2", FetchLog(5, 6), 0.0) == [Send("n2", LogEntries(5, ()))]


def test_a_log_that_does_not_reach_back_asks_for_a_snapshot_once() -> None:
    participant = joined()
    participant.on_message("n0", CatchUp(5, 3, "n2"), 0.0)
    actions = participant.on_message("n2", LogEntries(5, (), too_old=True), 0.0)
    assert len(actions) == 1 and isinstance(actions[0], NeedSnapshot)
    assert participant.on_message("n2", LogEntries(5, (), too_old=True), 0.0) == []


def test_after_a_snapshot_it_acks_and_fetches_what_was_committed_since() -> None:
    participant = joined()
    waiting, _ = participant.capture(make(b"mine"), 0.0)
    participant.on_message("n0", CatchUp(5, 12, "n2"), 0.0)
    [need] = participant.on_message("n2", LogEntries(5, (), too_old=True), 0.0)
    assert need == NeedSnapshot("n2", "n2's log does not reach back to 1")
    kept = tuple(batch(seq, b"x") for seq in range(6, 11))
    actions = participant.installed_snapshot(10, kept, 1.0)
    assert actions == [Reply(waiting, errno.EIO), Send("n0", Ack(5, "n1", 10)),
                       Send("n2", FetchLog(5, 11))]
    assert participant.applied_seq == 10 and list(participant.log) == [8, 9, 10]
    assert participant.on_message("n2", LogEntries(5, (batch(11, b"y", b"z"),)), 1.0) == [
        ApplyBatch(batch(11, b"y", b"z")), Send("n0", Ack(5, "n1", 12))]


def test_far_behind_it_asks_for_a_snapshot_without_replaying_the_log() -> None:
    participant = Participant("n1", config=ParticipantConfig(snapshot_gap_records=100))
    participant.on_view(VIEW, 0.0)
    assert participant.on_message("n0", CatchUp(5, 100, "n2"), 0.0) == [
        Send("n2", FetchLog(5, 1))]
    participant = Participant("n1", config=ParticipantConfig(snapshot_gap_records=100))
    participant.on_view(VIEW, 0.0)
    actions = participant.on_message("n0", CatchUp(5, 101, "n2"), 0.0)
    assert actions == [NeedSnapshot("n2", "101 records behind")]
    assert [a for a in participant.tick(1.0)  # the driver is on it: no fetch, no request
            if not (isinstance(a, Send) and isinstance(a.message, Report))] == []


def test_a_failed_snapshot_is_asked_for_again() -> None:
    participant = joined()
    participant.on_message("n0", CatchUp(5, 3, "n2"), 0.0)
    assert participant.on_message("n2", LogEntries(5, (), too_old=True), 0.0)
    assert participant.snapshot_failed(1.0) == []
    assert participant.tick(1.05) == []  # not before the resend interval
    assert participant.tick(1.2) == [Send("n2", FetchLog(5, 1))]
    actions = participant.on_message("n2", LogEntries(5, (), too_old=True), 1.2)
    assert len(actions) == 1 and isinstance(actions[0], NeedSnapshot)


def test_after_a_view_change_applied_requests_succeed_and_the_rest_are_forwarded_again() -> None:
    participant = joined()
    applied_id, _ = participant.capture(make(b"a"), 0.0)
    lost_id, _ = participant.capture(make(b"b"), 0.0)
    new_view = View(6, VIEW.members, "n2")
    participant.on_view(new_view, 0.0)
    redriven = Batch(6, 1, (Entry("n1", applied_id, make(b"a")),))
    participant.on_message("n2", Prepare(6, redriven), 0.0)
    participant.logged(6, 1, True, 0.0)
    participant.on_message("n2", Decide(6, 1, True), 0.0)
    actions = participant.on_message("n2", Ready(6, 1), 0.0)
    assert actions == [Reply(applied_id, 0), Send("n2", Forward(6, lost_id, make(b"b"), lost_id))]


def test_ready_waits_until_what_it_covers_is_applied_here() -> None:
    participant = joined()
    request_id, _ = participant.capture(make(b"a"), 0.0)
    participant.on_view(View(6, VIEW.members, "n2"), 0.0)
    assert participant.on_message("n2", Ready(6, 1), 0.0) == [Send("n2", FetchLog(6, 1))]
    mine = Batch(5, 1, (Entry("n1", request_id, make(b"a")),))
    actions = participant.on_message("n2", LogEntries(6, (mine,)), 0.0)
    assert actions == [ApplyBatch(mine), Send("n2", Ack(6, "n1", 1)), Reply(request_id, 0)]


def test_without_ready_a_waiting_member_reports_to_ask_again() -> None:
    participant = Participant("n1", config=CONFIG)
    participant.on_view(VIEW, 0.0)
    participant.capture(make(b"a"), 0.0)
    assert participant.tick(0.0) == [Send("n0", Report(5, "n1", 0, ()))]
    assert participant.tick(0.05) == []


def test_a_member_restarted_within_its_epoch_asks_for_ready_with_no_request_waiting() -> None:
    """Restarted faster than the failure detector: still a member of the same epoch, whose
    leader sent Ready to the previous process. It serves (and captures) only after Ready,
    so it must ask with nothing captured yet, until Ready comes."""
    participant = Participant("n1", 3, config=CONFIG)
    participant.on_view(VIEW, 0.0)
    assert participant.next_deadline_s() == 0.0
    assert participant.tick(0.0) == [Send("n0", Report(5, "n1", 3, ()))]
    assert participant.tick(0.05) == []
    assert participant.tick(1.0) == [Send("n0", Report(5, "n1", 3, ()))]
    participant.on_message("n0", Ready(5, 3), 1.0)
    assert participant.serving and participant.tick(2.0) == []


def test_a_durable_batch_stays_reported_while_its_replacement_is_being_logged() -> None:
    participant = joined()
    old = batch(1, b"a")
    participant.on_message("n0", Prepare(5, old), 0.0)
    participant.logged(5, 1, True, 0.0)
    participant.on_view(View(6, VIEW.members, "n0"), 0.0)
    redriven = Batch(6, 1, old.entries)
    assert participant.on_message("n0", Prepare(6, redriven), 0.0) == [LogDurably(redriven)]
    assert participant.on_message("n0", Survey(6), 0.0) == [
        Send("n0", Report(6, "n1", 0, (old,)))]
    participant.logged(6, 1, True, 0.0)
    assert participant.on_message("n0", Survey(6), 0.0) == [
        Send("n0", Report(6, "n1", 0, (redriven,)))]


def test_a_batch_durable_only_after_its_epoch_ended_is_not_reported() -> None:
    participant = joined()
    participant.on_message("n0", Prepare(5, batch(1, b"a")), 0.0)
    participant.on_view(View(6, VIEW.members, "n0"), 0.0)
    assert participant.logged(5, 1, True, 0.0) == []  # no vote for an old epoch
    assert participant.on_message("n0", Survey(6), 0.0) == [Send("n0", Report(6, "n1", 0, ()))]
