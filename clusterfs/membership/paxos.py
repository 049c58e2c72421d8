"""Single-decree Paxos that decides the successor of one view.

Why Paxos: several nodes may try to change view e at once (two nodes each
suspecting the leader, a join racing a removal). Whatever happens, at most one
view e + 1 may ever be installed. The acceptors are exactly the members of
view e, and a quorum is a majority of them; any two majorities share a member,
and that member's memory (promised ballot, accepted view) makes a later
proposer adopt the earlier chosen view instead of a different one.

Two-node views add one more voter: the witness on the common storage, which a
compare-and-swap grants to at most one node per epoch. The quorums are then
{a, b}, {a, witness} (only if a holds it) or {b, witness} (only if b holds it);
the last two never both exist, and each meets {a, b} in a real acceptor.

Phase 1: Prepare(ballot) -> Promise(ballot, accepted so far) from a quorum;
the proposer adopts the accepted view with the highest ballot, if any, else
its own wish. Phase 2: Accept(ballot, view) -> Accepted from a quorum: the
view is chosen and the proposer sends Install to everyone.
"""

from __future__ import annotations

from clusterfs.membership.events import AcceptorState
from clusterfs.membership.messages import (
    Accept,
    Accepted,
    Ballot,
    Prepare,
    Promise,
    Reject,
)
from clusterfs.membership.view import View


class Acceptor:
    """One member's vote for the successor of view `epoch`; persisted by the driver."""

    def __init__(self, name: str, epoch: int) -> None:
        self.name = name
        self.epoch = epoch
        self.promised: Ballot | None = None
        self.accepted_ballot: Ballot | None = None
        self.accepted_view: View | None = None

    def state(self) -> AcceptorState:
        return AcceptorState(self.epoch, self.promised, self.accepted_ballot, self.accepted_view)

    def on_prepare(self, message: Prepare) -> tuple[Promise | Reject, bool]:
        """The reply, and whether the state changed (then persist before replying)."""
        if self.promised is not None and message.ballot < self.promised:
            return self._reject(message.ballot), False
        changed = message.ballot != self.promised
        self.promised = message.ballot
        promise = Promise(
            self.epoch, self.name, message.ballot, self.accepted_ballot, self.accepted_view
        )
        return promise, changed

    def on_accept(self, message: Accept) -> tuple[Accepted | Reject, bool]:
        if self.promised is not None and message.ballot < self.promised:
            return self._reject(message.ballot), False
        changed = message.ballot != self.accepted_ballot
        self.promised = message.ballot
        self.accepted_ballot = message.ballot
        self.accepted_view = message.view
        return Accepted(self.epoch, self.name, message.ballot), changed

    def _reject(self, ballot: Ballot) -> Reject:
        assert self.promised is not None
        return Reject(self.epoch, self.name, ballot, self.promised)


class Proposer:
    """One attempt, at one ballot, to get `wanted` chosen as the successor of `current`."""

    def __init__(self, current: View, ballot: Ballot, wanted: View, started_s: float) -> None:
        self.current = current
        self.ballot = ballot
        self.wanted = wanted
        self.started_s = started_s
        self.extra_votes = 0  # 1 while this node holds the witness of a two-node view
        self.promises: dict[str, Promise] = {}
        self.accepted: set[str] = set()
        self.value: View | None = None  # set once phase 2 began
        self.rejected = False

    def prepare(self) -> Prepare:
        return Prepare(self.current.epoch, self.ballot.node, self.ballot)

    def on_promise(self, message: Promise) -> Accept | None:
        """The Accept to send once a quorum promised (only once)."""
        if message.ballot != self.ballot or message.sender not in self.current.members:
            return None
        self.promises[message.sender] = message
        return self.try_accept_phase()

    def try_accept_phase(self) -> Accept | None:
        if self.value is not None or not self._quorum(len(self.promises)):
            return None
        self.value = self._adopted_value()
        return Accept(self.current.epoch, self.ballot.node, self.ballot, self.value)

    def on_accepted(self, message: Accepted) -> View | None:
        """The chosen view once a quorum accepted (from then on, every time)."""
        if message.ballot != self.ballot or message.sender not in self.current.members:
            return None
        self.accepted.add(message.sender)
        return self.chosen()

    def chosen(self) -> View | None:
        if self.value is not None and self._quorum(len(self.accepted)):
            return self.value
        return None

    def on_reject(self, message: Reject) -> None:
        if message.ballot == self.ballot:
            self.rejected = True

    def _quorum(self, votes: int) -> bool:
        return votes + self.extra_votes >= self.current.majority()

    def _adopted_value(self) -> View:
        accepted = [p for p in self.promises.values() if p.accepted_ballot is not None]
        if not accepted:
            return self.wanted
        best = max(accepted, key=lambda p: p.accepted_ballot or Ballot(-1, ""))
        assert best.accepted_view is not None
        return best.accepted_view
