"""One membership core, fed events by hand: one test per transition."""

from __future__ import annotations

from clusterfs.membership.config import MembershipConfig
from clusterfs.membership.core import Membership
from clusterfs.membership.events import (
    Action,
    AdmitMember,
    ClaimWitness,
    GoOffline,
    InstallView,
    MemberCaughtUp,
    MemberFailed,
    Persist,
    Rejoin,
    Send,
    Tick,
    WitnessResult,
)
from clusterfs.membership.messages import (
    Accept,
    Accepted,
    Ballot,
    Heartbeat,
    Install,
    JoinRequest,
    Leave,
    Prepare,
    Promise,
    Reject,
    Welcome,
)
from clusterfs.membership.view import View

ABC = View(1, ("a", "b", "c"), "a")
CONFIG = MembershipConfig()


def sends(actions: list[Action]) -> list[tuple[str, object]]:
    return [(a.to, a.message) for a in actions if isinstance(a, Send)]


def of_type(actions: list[Action], kind: type) -> list[Action]:
    return [a for a in actions if isinstance(a, kind)]


def keep_alive(node: Membership, peers: list[str], now_s: float) -> None:
    for peer in peers:
        node.handle(Heartbeat(node.view.epoch if node.view else 0, peer), now_s)


def test_tick_heartbeats_every_other_member_once_per_interval() -> None:
    node = Membership("b", ABC, 0.0)
    assert sends(node.handle(Tick(), 0.0)) == [("a", Heartbeat(1, "b")), ("c", Heartbeat(1, "b"))]
    assert sends(node.handle(Tick(), 0.1)) == []
    assert len(sends(node.handle(Tick(), 0.5))) == 2


def test_heard_members_are_not_suspected() -> None:
    leader = Membership("a", ABC, 0.0)
    for now_s in [1.0, 2.0, 3.0, 4.0]:
        keep_alive(leader, ["b", "c"], now_s)
        actions = leader.handle(Tick(), now_s)
        assert not [m for _, m in sends(actions) if isinstance(m, Prepare)]
    assert leader.online


def test_silent_member_is_proposed_for_removal_by_the_leader() -> None:
    leader = Membership("a", ABC, 0.0)
    keep_alive(leader, ["b"], 2.9)
    assert not [m for _, m in sends(leader.handle(Tick(), 2.9)) if isinstance(m, Prepare)]
    keep_alive(leader, ["b"], 3.0)
    actions = leader.handle(Tick(), 3.1)
    prepares = [(to, m) for to, m in sends(actions) if isinstance(m, Prepare)]
    assert [to for to, _ in prepares] == ["b", "c"]
    assert of_type(actions, Persist)  # its own promise, persisted first
    assert leader.proposer is not None and leader.proposer.wanted == View(2, ("a", "b"), "a")


def test_non_leader_does_not_propose_while_the_leader_is_heard() -> None:
    node = Membership("b", ABC, 0.0)
    keep_alive(node, ["a"], 3.1)
    actions = node.handle(Tick(), 3.1)
    assert not [m for _, m in sends(actions) if isinstance(m, Prepare)]
    assert node.proposer is None


def test_lowest_heard_member_proposes_when_the_leader_is_silent() -> None:
    node = Membership("b", ABC, 0.0)
    keep_alive(node, ["c"], 3.1)
    node.handle(Tick(), 3.1)
    assert node.proposer is not None and node.proposer.wanted == View(2, ("b", "c"), "b")


def full_round(leader: Membership, voters: list[str], now_s: float) -> list[Action]:
    """Answer the leader's proposal as `voters` would; the actions of the last step."""
    proposer = leader.proposer
    assert proposer is not None
    epoch, ballot = proposer.current.epoch, proposer.ballot
    for voter in voters:
        leader.handle(Promise(epoch, voter, ballot), now_s)
    actions: list[Action] = []
    for voter in voters:
        actions = leader.handle(Accepted(epoch, voter, ballot), now_s)
        if leader.proposer is None:
            break
    return actions


def test_chosen_view_is_announced_and_installed() -> None:
    leader = Membership("a", ABC, 0.0)
    keep_alive(leader, ["b"], 3.1)
    leader.handle(Tick(), 3.1)
    actions = full_round(leader, ["b"], 3.2)
    new = View(2, ("a", "b"), "a")
    assert ("b", Install(2, "a", new)) in sends(actions)
    assert ("c", Install(2, "a", new)) in sends(actions)  # so the removed node learns it
    assert of_type(actions, InstallView) == [InstallView(new)]
    assert leader.view == new and leader.online


def test_prepare_is_persisted_before_the_promise_is_sent() -> None:
    node = Membership("b", ABC, 0.0)
    actions = node.handle(Prepare(1, "a", Ballot(1, "a")), 0.1)
    assert isinstance(actions[0], Persist) and actions[0].state.promised == Ballot(1, "a")
    assert sends(actions) == [("a", Promise(1, "b", Ballot(1, "a")))]


def test_accept_is_persisted_before_accepted_is_sent() -> None:
    node = Membership("b", ABC, 0.0)
    view = View(2, ("a", "b"), "a")
    actions = node.handle(Accept(1, "a", Ballot(1, "a"), view), 0.1)
    assert isinstance(actions[0], Persist) and actions[0].state.accepted_view == view
    assert sends(actions) == [("a", Accepted(1, "b", Ballot(1, "a")))]


def test_lower_ballot_is_rejected() -> None:
    node = Membership("b", ABC, 0.0)
    node.handle(Prepare(1, "c", Ballot(5, "c")), 0.1)
    actions = node.handle(Prepare(1, "a", Ballot(2, "a")), 0.2)
    assert sends(actions) == [("a", Reject(1, "b", Ballot(2, "a"), Ballot(5, "c")))]
    assert not of_type(actions, Persist)


def test_rejected_proposer_retries_with_a_higher_round() -> None:
    leader = Membership("a", ABC, 0.0)
    leader.handle(MemberFailed("c", "missed the prepare deadline"), 0.1)
    assert leader.proposer is not None
    leader.handle(Reject(1, "b", leader.proposer.ballot, Ballot(7, "b")), 0.2)
    assert leader.proposer is not None and leader.proposer.ballot == Ballot(8, "a")


def test_stalled_proposal_is_retried_after_the_propose_timeout() -> None:
    leader = Membership("a", ABC, 0.0)
    leader.handle(MemberFailed("c", "voted no"), 0.1)
    first = leader.proposer
    assert first is not None
    keep_alive(leader, ["b", "c"], 1.0)
    leader.handle(Tick(), 1.0)
    assert leader.proposer is first
    keep_alive(leader, ["b", "c"], 1.2)
    leader.handle(Tick(), 1.2)
    assert leader.proposer is not None and leader.proposer.ballot > first.ballot


def test_stale_epoch_message_is_answered_with_the_view_and_changes_nothing() -> None:
    current = View(4, ("a", "b", "c"), "a")
    node = Membership("b", current, 0.0)
    before = node.acceptor.state()
    actions = node.handle(Prepare(3, "c", Ballot(9, "c")), 0.1)
    assert sends(actions) == [("c", Install(4, "b", current))]
    assert node.acceptor.state() == before and node.view == current
    assert node.next_round == 1


def test_newer_epoch_message_is_answered_with_our_epoch() -> None:
    node = Membership("b", ABC, 0.0)
    actions = node.handle(Heartbeat(3, "a"), 0.1)
    assert sends(actions) == [("a", Heartbeat(1, "b"))]
    assert node.view == ABC


def test_install_of_a_newer_view_is_adopted() -> None:
    node = Membership("b", ABC, 0.0)
    new = View(3, ("a", "b"), "a")
    actions = node.handle(Install(3, "a", new), 0.1)
    assert of_type(actions, InstallView) == [InstallView(new)]
    assert sends(actions) == [("a", Heartbeat(3, "b"))]
    assert node.handle(Install(2, "a", View(2, ("b", "c"), "b")), 0.2) == []


def test_install_without_us_takes_us_offline() -> None:
    node = Membership("c", ABC, 0.0)
    actions = node.handle(Install(2, "a", View(2, ("a", "b"), "a")), 0.1)
    assert actions == [GoOffline("removed from the cluster in epoch 2")]
    assert not node.online


def test_lost_majority_goes_offline_after_the_offline_timeout() -> None:
    node = Membership("c", ABC, 0.0)
    assert node.handle(Tick(), 2.4) == [Send("a", Heartbeat(1, "c")), Send("b", Heartbeat(1, "c"))]
    actions = node.handle(Tick(), 2.6)
    offline = of_type(actions, GoOffline)
    assert len(offline) == 1 and "lost the majority" in offline[0].reason
    assert node.offline_reason.startswith("lost the majority")


def test_one_heard_peer_keeps_the_majority_of_three() -> None:
    node = Membership("c", ABC, 0.0)
    keep_alive(node, ["b"], 2.0)
    node.handle(Tick(), 4.0)
    assert node.online


def test_offline_node_ignores_everything_but_rejoin() -> None:
    node = Membership("c", ABC, 0.0)
    node.handle(MemberFailed("c", "could not apply record 17"), 0.1)
    assert not node.online and "could not apply" in node.offline_reason
    for event in [Tick(), Heartbeat(1, "a"), Prepare(1, "a", Ballot(3, "a")),
                  Install(2, "a", View(2, ("a", "b", "c"), "a")), JoinRequest("d", "x")]:
        assert node.handle(event, 5.0) == []


def test_rejoin_sends_join_requests_until_welcomed() -> None:
    node = Membership("c", None, 0.0)
    actions = node.handle(Rejoin(("a", "b"), "c:7000", 12), 0.0)
    assert sends(actions) == [("a", JoinRequest("c", "c:7000", 12)),
                              ("b", JoinRequest("c", "c:7000", 12))]
    assert node.handle(Tick(), 0.5) == []
    assert len(sends(node.handle(Tick(), 1.0))) == 2
    welcomed = View(5, ("a", "b", "c"), "a")
    assert node.handle(Install(5, "a", welcomed), 1.1) == []  # only a Welcome admits
    actions = node.handle(Welcome(5, "a", welcomed), 1.2)
    assert of_type(actions, InstallView) == [InstallView(welcomed)] and node.online


def test_joining_node_ignores_a_welcome_older_than_its_last_view() -> None:
    node = Membership("c", View(6, ("a", "b", "c"), "a"), 0.0)
    node.handle(Install(7, "a", View(7, ("a", "b"), "a")), 0.1)
    node.handle(Rejoin(("a",), "c:7000"), 0.2)
    assert node.handle(Welcome(5, "a", View(5, ("a", "b", "c"), "a")), 0.3) == []
    assert node.state == "joining"


def test_join_request_on_a_non_leader_is_forwarded() -> None:
    node = Membership("b", ABC, 0.0)
    request = JoinRequest("d", "d:7000")
    assert sends(node.handle(request, 0.1)) == [("a", request)]


def test_join_order_admit_then_caught_up_then_view_change() -> None:
    leader = Membership("a", ABC, 0.0)
    actions = leader.handle(JoinRequest("d", "d:7000", 3), 0.1)
    assert actions == [AdmitMember("d", "d:7000", 3)]
    assert leader.handle(JoinRequest("d", "d:7000", 3), 0.2) == []  # a retry
    assert leader.proposer is None  # not before the catch-up
    leader.handle(MemberCaughtUp("d"), 0.5)
    assert leader.proposer is not None
    assert leader.proposer.wanted == View(2, ("a", "b", "c", "d"), "a")
    assert [to for to, m in sends(full_round(leader, ["a", "b"], 0.6))] == ["b", "c", "d", "b", "c",
                                                                               "d"]


def test_joiner_gets_a_welcome_and_old_members_an_install() -> None:
    leader = Membership("a", ABC, 0.0)
    leader.handle(JoinRequest("d", "d:7000"), 0.1)
    leader.handle(MemberCaughtUp("d"), 0.2)
    actions = full_round(leader, ["a", "b"], 0.3)
    new = View(2, ("a", "b", "c", "d"), "a")
    assert ("d", Welcome(2, "a", new)) in sends(actions)
    assert ("c", Install(2, "a", new)) in sends(actions)
    assert leader.joins.admitted == {}


def test_join_request_from_a_member_removes_it_first() -> None:
    leader = Membership("a", ABC, 0.0)
    leader.handle(JoinRequest("c", "c:7000", 0, ABC.epoch), 0.1)
    assert leader.proposer is not None and leader.proposer.wanted == View(2, ("a", "b"), "a")


def test_a_join_request_older_than_the_view_that_has_the_member_is_ignored() -> None:
    """Sent during a partition, delivered after the heal that admitted its sender."""
    leader = Membership("a", View(5, ("a", "b", "c"), "a"), 0.0)
    assert leader.handle(JoinRequest("c", "c:7000", 0, 4), 0.1) == []
    assert leader.proposer is None and not leader.failed


def test_a_join_request_names_the_last_epoch_its_sender_knew() -> None:
    node = Membership("c", View(6, ("a", "b", "c"), "a"), 0.0)
    node.handle(Install(7, "a", View(7, ("a", "b"), "a")), 0.1)  # c was removed in 7
    actions = node.handle(Rejoin(("a",), "c:7000", 9), 0.2)
    assert sends(actions) == [("a", JoinRequest("c", "c:7000", 9, 7))]


def test_member_failed_on_the_leader_proposes_removal() -> None:
    leader = Membership("a", ABC, 0.0)
    leader.handle(MemberFailed("b", "missed the commit deadline"), 0.1)
    assert leader.proposer is not None and leader.proposer.wanted == View(2, ("a", "c"), "a")


def test_graceful_leave_of_the_leader_hands_over_and_goes_offline() -> None:
    leader = Membership("a", ABC, 0.0)
    leader.handle(Leave("a"), 0.1)
    assert leader.proposer is not None and leader.proposer.wanted == View(2, ("b", "c"), "b")
    actions = full_round(leader, ["a", "b"], 0.2)
    assert of_type(actions, GoOffline) == [GoOffline("left the cluster in epoch 2")]


def test_leave_on_a_non_leader_is_forwarded_until_acted_on() -> None:
    node = Membership("c", ABC, 0.0)
    assert sends(node.handle(Leave("c"), 0.1)) == [("a", Leave("c"))]
    assert ("a", Leave("c")) in sends(node.handle(Tick(), 0.2))


PAIR = View(3, ("a", "b"), "a")


def test_two_node_view_claims_the_witness_instead_of_going_offline() -> None:
    node = Membership("b", PAIR, 0.0)
    actions = node.handle(Tick(), 2.6)
    assert of_type(actions, ClaimWitness) == [ClaimWitness(3, "b")]
    assert node.online
    assert not of_type(node.handle(Tick(), 2.7), ClaimWitness)  # claimed once


def test_granted_witness_removes_the_other_node() -> None:
    node = Membership("b", PAIR, 0.0)
    node.handle(Tick(), 2.6)
    actions = node.handle(WitnessResult(3, True), 2.7)
    alone = View(4, ("b",), "b")
    assert of_type(actions, InstallView) == [InstallView(alone)]
    assert ("a", Install(4, "b", alone)) in sends(actions)
    assert node.online and node.view == alone


def test_refused_witness_goes_offline() -> None:
    node = Membership("a", PAIR, 0.0)
    node.handle(Tick(), 2.6)
    actions = node.handle(WitnessResult(3, False), 2.7)
    assert len(of_type(actions, GoOffline)) == 1 and not node.online


def test_unanswered_witness_claim_goes_offline() -> None:
    node = Membership("a", PAIR, 0.0)
    node.handle(Tick(), 2.6)
    assert node.online and not of_type(node.handle(Tick(), 5.0), GoOffline)
    offline = of_type(node.handle(Tick(), 5.2), GoOffline)
    assert offline == [GoOffline("no answer from the witness of epoch 3")]


def test_witness_result_for_another_epoch_is_ignored() -> None:
    node = Membership("a", PAIR, 0.0)
    node.handle(Tick(), 2.6)
    assert node.handle(WitnessResult(2, False), 2.7) == []
    assert node.online


def test_single_node_cluster_changes_view_alone() -> None:
    node = Membership.founding("a", 0.0)
    assert node.handle(Tick(), 100.0) == []  # no peers, no majority problem
    node.handle(JoinRequest("b", "b:7000"), 100.1)
    actions = node.handle(MemberCaughtUp("b"), 100.2)
    assert of_type(actions, InstallView) == [InstallView(View(2, ("a", "b"), "a"))]
    assert ("b", Welcome(2, "a", View(2, ("a", "b"), "a"))) in sends(actions)


def test_config_is_honoured() -> None:
    config = MembershipConfig(heartbeat_interval_s=0.1, offline_timeout_s=0.5,
                              suspect_timeout_s=0.6)
    node = Membership("c", ABC, 0.0, config)
    assert of_type(node.handle(Tick(), 0.6), GoOffline)
