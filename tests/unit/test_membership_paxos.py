"""The single-decree Paxos pieces that decide one view change."""

from __future__ import annotations

from clusterfs.membership.messages import Accept, Accepted, Ballot, Prepare, Promise, Reject
from clusterfs.membership.paxos import Acceptor, Proposer
from clusterfs.membership.view import View

CURRENT = View(5, ("a", "b", "c"), "a")
WANTED = View(6, ("a", "b"), "a")
OTHER = View(6, ("a", "c"), "a")


def test_acceptor_promises_higher_ballots_and_reports_what_it_accepted() -> None:
    acceptor = Acceptor("b", 5)
    reply, changed = acceptor.on_prepare(Prepare(5, "a", Ballot(1, "a")))
    assert reply == Promise(5, "b", Ballot(1, "a")) and changed
    reply, changed = acceptor.on_accept(Accept(5, "a", Ballot(1, "a"), WANTED))
    assert reply == Accepted(5, "b", Ballot(1, "a")) and changed
    reply, changed = acceptor.on_prepare(Prepare(5, "c", Ballot(2, "c")))
    assert reply == Promise(5, "b", Ballot(2, "c"), Ballot(1, "a"), WANTED) and changed


def test_acceptor_rejects_lower_ballots_without_changing() -> None:
    acceptor = Acceptor("b", 5)
    acceptor.on_prepare(Prepare(5, "c", Ballot(3, "c")))
    before = acceptor.state()
    reply, changed = acceptor.on_prepare(Prepare(5, "a", Ballot(2, "a")))
    assert reply == Reject(5, "b", Ballot(2, "a"), Ballot(3, "c")) and not changed
    reply, changed = acceptor.on_accept(Accept(5, "a", Ballot(2, "a"), WANTED))
    assert isinstance(reply, Reject) and not changed
    assert acceptor.state() == before


def test_repeated_prepare_is_answered_without_a_new_persist() -> None:
    acceptor = Acceptor("b", 5)
    acceptor.on_prepare(Prepare(5, "a", Ballot(1, "a")))
    reply, changed = acceptor.on_prepare(Prepare(5, "a", Ballot(1, "a")))
    assert isinstance(reply, Promise) and not changed


def test_proposer_needs_a_majority_of_promises_then_of_accepts() -> None:
    proposer = Proposer(CURRENT, Ballot(1, "a"), WANTED, 0.0)
    assert proposer.on_promise(Promise(5, "a", Ballot(1, "a"))) is None
    accept = proposer.on_promise(Promise(5, "b", Ballot(1, "a")))
    assert accept == Accept(5, "a", Ballot(1, "a"), WANTED)
    assert proposer.on_promise(Promise(5, "c", Ballot(1, "a"))) is None  # only once
    assert proposer.on_accepted(Accepted(5, "a", Ballot(1, "a"))) is None
    assert proposer.on_accepted(Accepted(5, "c", Ballot(1, "a"))) == WANTED


def test_proposer_ignores_other_ballots_and_strangers() -> None:
    proposer = Proposer(CURRENT, Ballot(2, "a"), WANTED, 0.0)
    assert proposer.on_promise(Promise(5, "b", Ballot(1, "a"))) is None
    assert proposer.on_promise(Promise(5, "x", Ballot(2, "a"))) is None
    assert proposer.on_promise(Promise(5, "a", Ballot(2, "a"))) is None
    assert proposer.promises.keys() == {"a"}


def test_proposer_adopts_the_highest_accepted_view() -> None:
    proposer = Proposer(CURRENT, Ballot(3, "a"), WANTED, 0.0)
    proposer.on_promise(Promise(5, "a", Ballot(3, "a"), Ballot(1, "b"), WANTED))
    accept = proposer.on_promise(Promise(5, "c", Ballot(3, "a"), Ballot(2, "c"), OTHER))
    assert accept is not None and accept.view == OTHER


def test_proposer_is_rejected_by_its_own_ballot_only() -> None:
    proposer = Proposer(CURRENT, Ballot(3, "a"), WANTED, 0.0)
    proposer.on_reject(Reject(5, "b", Ballot(2, "a"), Ballot(4, "c")))
    assert not proposer.rejected
    proposer.on_reject(Reject(5, "b", Ballot(3, "a"), Ballot(4, "c")))
    assert proposer.rejected


def test_witness_vote_completes_a_two_node_quorum() -> None:
    pair = View(7, ("a", "b"), "a")
    alone = View(8, ("a",), "a")
    proposer = Proposer(pair, Ballot(1, "a"), alone, 0.0)
    assert proposer.on_promise(Promise(7, "a", Ballot(1, "a"))) is None
    proposer.extra_votes = 1
    assert proposer.try_accept_phase() == Accept(7, "a", Ballot(1, "a"), alone)
    assert proposer.on_accepted(Accepted(7, "a", Ballot(1, "a"))) == alone
