"""One node's commit machinery: routing, and a fresh coordinator per view on the leader."""

from __future__ import annotations

import pytest

from clusterfs import records
from clusterfs.txn.actions import Send, Validate
from clusterfs.txn.coordinator import Phase
from clusterfs.txn.member import Member
from clusterfs.txn.messages import Forward, Ready, Report, Survey
from clusterfs.txn.participant import Participant
from clusterfs.txn.view import View

VIEW = View(1, ("n0", "n1"), "n0")


def test_view_rejects_a_leader_that_is_not_a_member() -> None:
    with pytest.raises(ValueError, match="not a member"):
        View(1, ("n0",), "n1")


def test_only_the_leader_runs_a_coordinator_and_each_view_restarts_it() -> None:
    leader, other = Member(Participant("n0")), Member(Participant("n1"))
    assert [a for a in leader.on_view(VIEW, 0.0) if isinstance(a, Send)] == [
        Send("n0", Survey(1)), Send("n1", Survey(1))]
    assert other.on_view(VIEW, 0.0) == [] and other.coordinator is None
    first = leader.coordinator
    leader.on_view(View(2, VIEW.members, "n0"), 0.0)
    assert leader.coordinator is not first
    assert leader.on_view(VIEW, 0.0) == []  # an older view changes nothing


def test_messages_are_routed_to_coordinator_or_participant() -> None:
    leader = Member(Participant("n0"))
    leader.on_view(VIEW, 0.0)
    for node in VIEW.members:
        leader.on_message(node, Report(1, node, 0, ()), 0.0)
    assert leader.coordinator is not None and leader.coordinator.phase is Phase.READY
    assert leader.on_message("n0", Ready(1, 0), 0.0) == []  # participant: now ready
    _, actions = leader.capture(records.Unlink(1, b"a", 0), 0.0)
    [forward] = actions
    assert isinstance(forward, Send) and isinstance(forward.message, Forward)
    actions = leader.on_message("n0", forward.message, 0.0)
    assert actions == [Validate(1, 1, (records.Unlink(1, b"a", 0),))]
    assert leader.next_deadline_s() is not None


def test_a_non_leader_drops_coordinator_messages() -> None:
    other = Member(Participant("n1"))
    other.on_view(VIEW, 0.0)
    assert other.on_message("n0", Forward(1, 1, records.Unlink(1, b"a", 0), 0), 0.0) == []
    assert other.validated(1, 1, [0], 0.0) == []
