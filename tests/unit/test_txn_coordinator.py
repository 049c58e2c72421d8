"""The coordinator's transitions, one at a time (three members n0 (leader), n1, n2)."""

from __future__ import annotations

from clusterfs import records
from clusterfs.txn.actions import Action, RemoveMember, Send, Validate
from clusterfs.txn.coordinator import Coordinator, CoordinatorConfig, Phase, settle_chain
from clusterfs.txn.messages import (
    Ack,
    Batch,
    CatchUp,
    Decide,
    Done,
    Entry,
    Forward,
    Prepare,
    Ready,
    Refused,
    Report,
    Survey,
    Vote,
)
from clusterfs.txn.view import View

VIEW = View(5, ("n0", "n1", "n2"), "n0")
CONFIG = CoordinatorConfig(resend_interval_s=0.1, prepare_timeout_s=1.0, ack_timeout_s=1.0,
                           survey_timeout_s=1.0)


def make(name: bytes) -> records.MakeNode:
    return records.MakeNode(1, name, 0o100644, 0, 0, 0, 0)


def sends(actions: list[Action]) -> list[tuple[str, object]]:
    return [(a.to, a.message) for a in actions if isinstance(a, Send)]


def ready(applied_seq: int = 0) -> Coordinator:
    coordinator = Coordinator(VIEW, CONFIG)
    coordinator.start(0.0)
    for node in VIEW.members:
        coordinator.on_message(node, Report(5, node, applied_seq, ()), 0.0)
    assert coordinator.phase is Phase.READY
    return coordinator


def forward(coordinator: Coordinator, origin: str, request_id: int,
            name: bytes, answered_below: int = 0) -> list[Action]:
    return coordinator.on_message(origin, Forward(5, request_id, make(name), answered_below), 0.0)


def prepared(coordinator: Coordinator, name: bytes = b"a") -> Batch:
    """Forward one record from n1 and validate it: the coordinator is collecting votes."""
    [validate] = forward(coordinator, "n1", 1, name)
    assert isinstance(validate, Validate)
    actions = coordinator.validated(5, validate.first_seq, [0], 0.0)
    batch = sends(actions)[0][1].batch  # type: ignore[attr-defined]
    assert isinstance(batch, Batch)
    return batch


def test_start_surveys_every_member() -> None:
    actions = Coordinator(VIEW, CONFIG).start(0.0)
    assert sends(actions) == [(node, Survey(5)) for node in VIEW.members]


def test_all_reports_with_nothing_undecided_make_it_ready() -> None:
    coordinator = Coordinator(VIEW, CONFIG)
    coordinator.start(0.0)
    coordinator.on_message("n0", Report(5, "n0", 4, ()), 0.0)
    assert coordinator.on_message("n1", Report(5, "n1", 4, ()), 0.0) == []
    actions = coordinator.on_message("n2", Report(5, "n2", 4, ()), 0.0)
    assert sends(actions) == [(node, Ready(5, 4)) for node in VIEW.members]
    assert coordinator.next_seq == 5


def test_forwards_are_ignored_until_ready() -> None:
    coordinator = Coordinator(VIEW, CONFIG)
    coordinator.start(0.0)
    assert forward(coordinator, "n1", 1, b"a") == []


def test_messages_of_another_epoch_or_from_strangers_are_ignored() -> None:
    coordinator = ready()
    assert coordinator.on_message("n1", Forward(4, 1, make(b"a"), 0), 0.0) == []
    assert coordinator.on_message("n9", Forward(5, 1, make(b"a"), 0), 0.0) == []


def test_refused_records_get_their_errno_and_are_not_proposed() -> None:
    coordinator = ready()
    [validate] = forward(coordinator, "n1", 1, b"a")
    assert validate == Validate(5, 1, (make(b"a"),))
    actions = coordinator.validated(5, 1, [17], 0.0)
    assert sends(actions) == [("n1", Refused(5, 1, 17))]
    assert coordinator.next_seq == 1  # no sequence number used
    assert sends(forward(coordinator, "n1", 1, b"a")) == [("n1", Refused(5, 1, 17))]


def test_accepted_records_are_prepared_on_every_member() -> None:
    coordinator = ready()
    batch = prepared(coordinator)
    assert batch == Batch(5, 1, (Entry("n1", 1, make(b"a")),))
    assert coordinator.next_seq == 2


def test_all_yes_votes_decide_commit_then_all_acks_send_done() -> None:
    coordinator = ready()
    batch = prepared(coordinator)
    for node in ("n0", "n1"):
        assert coordinator.on_message(node, Vote(5, 1, node, True), 0.0) == []
    actions = coordinator.on_message("n2", Vote(5, 1, "n2", True), 0.0)
    assert sends(actions) == [(node, Decide(5, batch.first_seq, True)) for node in VIEW.members]
    coordinator.on_message("n0", Ack(5, "n0", 1), 0.0)
    coordinator.on_message("n1", Ack(5, "n1", 1), 0.0)
    actions = coordinator.on_message("n2", Ack(5, "n2", 1), 0.0)
    assert sends(actions) == [(node, Done(5, 1)) for node in VIEW.members]
    assert coordinator.is_idle()


def test_group_commit_forwards_during_a_round_form_the_next_batch() -> None:
    coordinator = ready()
    prepared(coordinator)
    assert forward(coordinator, "n2", 1, b"b") == []
    assert forward(coordinator, "n0", 1, b"c") == []
    for node in VIEW.members:
        coordinator.on_message(node, Vote(5, 1, node, True), 0.0)
    actions: list[Action] = []
    for node in VIEW.members:
        actions += coordinator.on_message(node, Ack(5, node, 1), 0.0)
    assert actions[-1] == Validate(5, 2, (make(b"b"), make(b"c")))


def test_a_no_vote_removes_the_member_and_the_round_never_commits() -> None:
    coordinator = ready()
    prepared(coordinator)
    actions = coordinator.on_message("n2", Vote(5, 1, "n2", False, "disk full"), 0.0)
    assert actions == [RemoveMember("n2", "voted no: disk full")]
    for node in VIEW.members:
        assert coordinator.on_message(node, Vote(5, 1, node, True), 0.0) == []


def test_the_leaders_own_no_vote_aborts_and_steps_down() -> None:
    coordinator = ready()
    prepared(coordinator)
    actions = coordinator.on_message("n0", Vote(5, 1, "n0", False, "io"), 0.0)
    assert sends(actions) == [(node, Decide(5, 1, False)) for node in VIEW.members]
    assert actions[-1] == RemoveMember("n0", "voted no: io")


def test_prepare_is_resent_then_silent_members_are_removed_once() -> None:
    coordinator = ready()
    batch = prepared(coordinator)
    coordinator.on_message("n0", Vote(5, 1, "n0", True), 0.0)
    coordinator.on_message("n1", Vote(5, 1, "n1", True), 0.0)
    assert coordinator.next_deadline_s() == 0.1
    assert sends(coordinator.tick(0.1)) == [("n2", Prepare(5, batch))]
    actions = coordinator.tick(1.0)
    assert RemoveMember("n2", "no answer in ready phase") in actions
    assert not [a for a in coordinator.tick(2.0) if isinstance(a, RemoveMember)]


def test_duplicate_forwards_are_answered_not_proposed_again() -> None:
    coordinator = ready()
    prepared(coordinator)
    assert forward(coordinator, "n1", 1, b"a") == []  # in flight
    for node in VIEW.members:
        coordinator.on_message(node, Vote(5, 1, node, True), 0.0)
    for node in VIEW.members:
        coordinator.on_message(node, Ack(5, node, 1), 0.0)
    assert sends(forward(coordinator, "n1", 1, b"a")) == [("n1", Done(5, 1))]
    assert forward(coordinator, "n1", 1, b"a", answered_below=2) == []  # forgotten


def test_settle_chain_takes_the_highest_epoch_and_stops_at_a_gap() -> None:
    old = Batch(2, 4, (Entry("n1", 1, make(b"old")),))
    new = Batch(3, 4, (Entry("n2", 1, make(b"new")), Entry("n2", 2, make(b"x"))))
    after = Batch(3, 6, (Entry("n2", 3, make(b"y")),))
    stray = Batch(1, 9, (Entry("n1", 9, make(b"z")),))
    reports = [Report(4, "n0", 3, (old,)), Report(4, "n1", 3, (new, after, stray)),
               Report(4, "n2", 2, ())]
    assert settle_chain(reports) == (3, [new, after])


def test_settle_catches_laggards_up_then_redrives_then_ready() -> None:
    undecided = Batch(4, 4, (Entry("n1", 3, make(b"u")),))
    coordinator = Coordinator(VIEW, CONFIG)
    coordinator.start(0.0)
    coordinator.on_message("n0", Report(5, "n0", 3, ()), 0.0)
    coordinator.on_message("n1", Report(5, "n1", 3, (undecided,)), 0.0)
    actions = coordinator.on_message("n2", Report(5, "n2", 1, ()), 0.0)
    assert sends(actions) == [("n2", CatchUp(5, 3, "n0"))]
    assert coordinator.phase is Phase.SETTLE
    actions = coordinator.on_message("n2", Ack(5, "n2", 3), 0.0)
    redriven = Batch(5, 4, undecided.entries)  # proposed again in this epoch
    assert sends(actions) == [(node, Prepare(5, redriven)) for node in VIEW.members]
    for node in VIEW.members:
        coordinator.on_message(node, Vote(5, 4, node, True), 0.0)
    actions = []
    for node in VIEW.members:
        actions += coordinator.on_message(node, Ack(5, node, 4), 0.0)
    assert sends(actions)[-3:] == [(node, Ready(5, 4)) for node in VIEW.members]
    assert coordinator.phase is Phase.READY and coordinator.next_seq == 5


def test_a_redrive_already_applied_everywhere_needs_no_decide() -> None:
    undecided = Batch(4, 4, (Entry("n1", 3, make(b"u")),))
    coordinator = Coordinator(VIEW, CONFIG)
    coordinator.start(0.0)
    for node in VIEW.members:
        coordinator.on_message(node, Report(5, node, 3, (undecided,)), 0.0)
    for node in ("n0", "n1"):
        coordinator.on_message(node, Ack(5, node, 4), 0.0)
        coordinator.on_message(node, Vote(5, 4, node, True), 0.0)
    coordinator.on_message("n2", Ack(5, "n2", 4), 0.0)
    actions = coordinator.on_message("n2", Vote(5, 4, "n2", True), 0.0)
    assert ("n1", Done(5, 4)) in sends(actions)
    assert ("n1", Ready(5, 4)) in sends(actions)


def test_a_report_after_ready_gets_ready_again() -> None:
    coordinator = ready(applied_seq=2)
    actions = coordinator.on_message("n1", Report(5, "n1", 2, ()), 0.0)
    assert sends(actions) == [("n1", Ready(5, 2))]


def test_a_stale_validation_answer_is_ignored() -> None:
    coordinator = ready()
    forward(coordinator, "n1", 1, b"a")
    assert coordinator.validated(4, 1, [0], 0.0) == []
    assert coordinator.validated(5, 2, [0], 0.0) == []
