"""The membership core of one node: heartbeats, suspicion, view changes, joins.

Theory of operation. A node is in one of three states:

  online   a member of its installed view: it heartbeats the other members,
           votes in view changes and (if it is the designated proposer)
           proposes them.
  offline  it stopped serving: it lost its majority, lost the witness, was
           removed, left, or was reported failed. It sends nothing and ignores
           every message, until the driver asks it to rejoin.
  joining  it sends JoinRequest to its contacts every `join_retry_s` and
           waits for a Welcome (a chosen view that includes it).

Every `handle(event, now_s)` returns actions for the driver, in order.

Majority rule. A node that has not heard a majority of its view (itself
included) within `offline_timeout_s` goes offline. In a two-node view it
first claims the witness on the common storage: granted, it stays online and
removes the other node; refused, it goes offline.

View changes. The designated proposer (the leader while it is heard, else the
lowest member name that is heard) proposes the successor view: minus members
silent for `suspect_timeout_s`, reported failed, or leaving; plus joiners that
caught up. `paxos.py` decides it among the members of the current view, so it
needs a majority of the CURRENT view. A stalled attempt is retried with a
higher ballot after `propose_timeout_s`.

Join order (leader side): JoinRequest -> AdmitMember(node, address, from_seq)
-> [driver: catch-up] -> MemberCaughtUp(node) -> Prepare/Accept with the node
added -> Install to the old members, Welcome to the joiner, InstallView here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from clusterfs.membership.config import MembershipConfig
from clusterfs.membership.detector import FailureDetector
from clusterfs.membership.events import (
    AcceptorState,
    Action,
    AdmitMember,
    ClaimWitness,
    Event,
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
    EpochMessage,
    Heartbeat,
    Install,
    JoinRequest,
    Leave,
    Message,
    Prepare,
    Promise,
    Reject,
    Welcome,
)
from clusterfs.membership.paxos import Acceptor, Proposer
from clusterfs.membership.view import View, founding_view, next_view

ONLINE = "online"
OFFLINE = "offline"
JOINING = "joining"


@dataclass
class _Witness:
    """This node's claim on the witness for `epoch` ("pending" or "granted")."""

    epoch: int
    state: str
    claimed_s: float


@dataclass
class _Joins:
    """The leader's admitted joiners: request and admission time; who caught up."""

    admitted: dict[str, tuple[JoinRequest, float]] = field(default_factory=dict)
    caught_up: set[str] = field(default_factory=set)

    def drop(self, node: str) -> None:
        self.admitted.pop(node, None)
        self.caught_up.discard(node)


class Membership:
    """The sans-IO membership state machine of node `name`."""

    def __init__(
        self,
        name: str,
        view: View | None,
        now_s: float,
        config: MembershipConfig | None = None,
        *,
        acceptor_state: AcceptorState | None = None,
        online: bool = True,
    ) -> None:
        """A node with its last installed `view` (None: never a member).

        After a restart, pass the last persisted `acceptor_state`, and
        `online=False` if the node had gone offline (it then stays offline
        until a Rejoin, whatever its view says).
        """
        self.name = name
        self.config = config or MembershipConfig()
        self.view = view
        member = online and view is not None and name in view.members
        self.state = ONLINE if member else OFFLINE
        self.offline_reason = "" if member else "not a member"
        self.last_epoch = view.epoch if view is not None else 0
        self.detector = FailureDetector(self._peers(), now_s)
        self.acceptor = Acceptor(name, self.last_epoch)
        self.next_round = 1
        if acceptor_state is not None and acceptor_state.epoch == self.last_epoch:
            self._restore(acceptor_state)
        self.proposer: Proposer | None = None
        self.failed: dict[str, str] = {}
        self.leaving: set[str] = set()
        self.joins = _Joins()
        self.witness: _Witness | None = None
        self.last_heartbeat_s = -math.inf
        self.join_request: JoinRequest | None = None
        self.join_contacts: tuple[str, ...] = ()
        self.last_join_sent_s = -math.inf

    def _restore(self, state: AcceptorState) -> None:
        self.acceptor.promised = state.promised
        self.acceptor.accepted_ballot = state.accepted_ballot
        self.acceptor.accepted_view = state.accepted_view
        if state.promised is not None:
            self._note_round(state.promised)

    @classmethod
    def founding(
        cls, name: str, now_s: float, config: MembershipConfig | None = None
    ) -> Membership:
        """The first node of a new cluster (view 1 with itself as leader)."""
        return cls(name, founding_view(name), now_s, config)

    @property
    def online(self) -> bool:
        return self.state == ONLINE

    def handle(self, event: Event, now_s: float) -> list[Action]:
        """Feed one event at time `now_s`; the actions to perform, in order."""
        actions: list[Action] = []
        if self.state == OFFLINE:
            if isinstance(event, Rejoin):
                self._start_join(event, now_s, actions)
            return actions
        if self.state == JOINING:
            self._handle_joining(event, now_s, actions)
            return actions
        self._handle_online(event, now_s, actions)
        if self.state == ONLINE:
            self._check_majority(now_s, actions)
        if self.state == ONLINE:
            self._maybe_propose(now_s, actions)
        return actions

    # ----------------------------------------------------------------- online

    def _handle_online(self, event: Event, now_s: float, actions: list[Action]) -> None:
        if isinstance(event, Tick):
            self._tick(now_s, actions)
        elif isinstance(event, MemberFailed):
            self._member_failed(event, actions)
        elif isinstance(event, MemberCaughtUp):
            if event.node in self.joins.admitted:
                self.joins.caught_up.add(event.node)
        elif isinstance(event, WitnessResult):
            self._witness_result(event, actions)
        elif isinstance(event, JoinRequest):
            self._join_request(event, now_s, actions)
        elif isinstance(event, Leave):
            self._leave(event, actions)
        elif isinstance(event, Rejoin):
            pass  # already a member
        else:
            self._receive(event, now_s, actions)

    def _tick(self, now_s: float, actions: list[Action]) -> None:
        if now_s - self.last_heartbeat_s >= self.config.heartbeat_interval_s:
            self._send_heartbeats(now_s, actions)
        proposer = self.proposer
        if proposer is not None and now_s - proposer.started_s > self.config.propose_timeout_s:
            self.proposer = None
        for node, (_, admitted_s) in list(self.joins.admitted.items()):
            if now_s - admitted_s > self.config.join_timeout_s:
                self.joins.drop(node)

    def _send_heartbeats(self, now_s: float, actions: list[Action]) -> None:
        self.last_heartbeat_s = now_s
        beat = Heartbeat(self._view().epoch, self.name)
        actions.extend(Send(peer, beat) for peer in self._peers())
        leader = self._view().leader
        if self.name in self.leaving and leader != self.name:
            actions.append(Send(leader, Leave(self.name)))  # until the leader acts on it

    def _member_failed(self, event: MemberFailed, actions: list[Action]) -> None:
        if event.node == self.name:
            self._go_offline(f"failed: {event.reason}", actions)
        elif event.node in self._view().members:
            self.failed[event.node] = event.reason

    def _join_request(self, event: JoinRequest, now_s: float, actions: list[Action]) -> None:
        view = self._view()
        if view.leader != self.name:
            actions.append(Send(view.leader, event))
        elif event.node in view.members:
            # A member asking again went offline: removed first, admitted afresh later.
            # Unless it asked before this view, which already has it: a request repeated
            # during a partition and delivered after the heal. Were it really gone, the
            # failure detector removes it and its next request admits it.
            if event.known_epoch >= view.epoch:
                self.failed[event.node] = "re-joining"
        elif event.node not in self.joins.admitted:
            self.joins.admitted[event.node] = (event, now_s)
            actions.append(AdmitMember(event.node, event.address, event.applied_seq))

    def _leave(self, event: Leave, actions: list[Action]) -> None:
        view = self._view()
        if event.node not in view.members:
            return
        if view.leader == self.name or event.node == self.name:
            self.leaving.add(event.node)
        if view.leader != self.name:
            actions.append(Send(view.leader, event))

    def _witness_result(self, event: WitnessResult, actions: list[Action]) -> None:
        witness = self.witness
        if witness is None or witness.epoch != event.epoch or witness.state != "pending":
            return
        if not event.granted:
            self._go_offline(f"the witness of epoch {event.epoch} is held by the other node",
                             actions)
            return
        witness.state = "granted"
        for peer in self._peers():
            self.failed.setdefault(peer, "lost the witness")
        if self.proposer is not None:
            self.proposer.extra_votes = 1

    # -------------------------------------------------------------- messages

    def _receive(self, message: EpochMessage, now_s: float, actions: list[Action]) -> None:
        view = self._view()
        if isinstance(message, Install | Welcome):
            self._view_news(message.view, now_s, actions)
            return
        if message.epoch < view.epoch:
            if message.sender != self.name:
                actions.append(Send(message.sender, Install(view.epoch, self.name, view)))
            return
        if message.epoch > view.epoch:
            actions.append(Send(message.sender, Heartbeat(view.epoch, self.name)))
            return
        if message.sender not in view.members:
            return
        if message.sender != self.name:
            self.detector.heard(message.sender, now_s)
        self._paxos(message, now_s, actions)

    def _paxos(self, message: EpochMessage, now_s: float, actions: list[Action]) -> None:
        if isinstance(message, Prepare):
            self._note_round(message.ballot)
            reply, changed = self.acceptor.on_prepare(message)
            self._reply(message.sender, reply, changed, now_s, actions)
        elif isinstance(message, Accept):
            self._note_round(message.ballot)
            accepted, changed = self.acceptor.on_accept(message)
            self._reply(message.sender, accepted, changed, now_s, actions)
        elif isinstance(message, Promise | Accepted | Reject):
            self._proposer_reply(message, now_s, actions)

    def _reply(
        self,
        to: str,
        reply: Promise | Accepted | Reject,
        changed: bool,
        now_s: float,
        actions: list[Action],
    ) -> None:
        if changed:
            actions.append(Persist(self.acceptor.state()))
        self._send(to, reply, now_s, actions)

    def _proposer_reply(
        self, message: Promise | Accepted | Reject, now_s: float, actions: list[Action]
    ) -> None:
        proposer = self.proposer
        if proposer is None:
            return
        if isinstance(message, Reject):
            self._note_round(message.promised)
            proposer.on_reject(message)
            if proposer.rejected:
                self.proposer = None
        elif isinstance(message, Promise):
            accept = proposer.on_promise(message)
            if accept is not None:
                self._broadcast(accept, now_s, actions)
        else:
            chosen = proposer.on_accepted(message)
            if chosen is not None:
                self._announce(chosen, now_s, actions)

    def _send(self, to: str, message: Message, now_s: float, actions: list[Action]) -> None:
        """Send, or handle at once when the receiver is this node."""
        if to == self.name:
            self._handle_online(message, now_s, actions)
        else:
            actions.append(Send(to, message))

    def _broadcast(self, message: Message, now_s: float, actions: list[Action]) -> None:
        view = self._view()
        # Ourselves first: our own promise is persisted before any peer sees the
        # ballot, so a restarted node never reuses a ballot it already sent.
        ordered = sorted(view.members, key=lambda member: member != self.name)
        for member in ordered:
            if self.view is not view or self.state != ONLINE:
                break  # handling our own copy changed the view; the rest is stale
            self._send(member, message, now_s, actions)

    def _note_round(self, ballot: Ballot) -> None:
        self.next_round = max(self.next_round, ballot.round + 1)

    # ---------------------------------------------------------- view changes

    def _designated_proposer(self, now_s: float) -> str | None:
        view = self._view()
        silent = self.detector.silent_peers(now_s, self.config.suspect_timeout_s)
        alive = [m for m in view.members if m not in silent and m not in self.failed]
        if not alive:
            return None
        return view.leader if view.leader in alive else alive[0]

    def _wanted_view(self, now_s: float) -> View | None:
        view = self._view()
        silent = self.detector.silent_peers(now_s, self.config.suspect_timeout_s)
        remove = silent | set(self.failed) | self.leaving
        if set(view.members) <= remove:
            remove -= self.leaving  # the last member's leave waits for someone to hand over to
        add = {n for n in self.joins.caught_up if n not in view.members}
        return next_view(view, remove=remove & set(view.members), add=add)

    def _maybe_propose(self, now_s: float, actions: list[Action]) -> None:
        if self.proposer is not None or self._designated_proposer(now_s) != self.name:
            return
        wanted = self._wanted_view(now_s)
        if wanted is None:
            return
        ballot = Ballot(self.next_round, self.name)
        self.next_round += 1
        proposer = Proposer(self._view(), ballot, wanted, now_s)
        if self.witness is not None and self.witness.state == "granted":
            proposer.extra_votes = 1
        self.proposer = proposer
        self._broadcast(proposer.prepare(), now_s, actions)

    def _announce(self, chosen: View, now_s: float, actions: list[Action]) -> None:
        """Tell everyone concerned about the chosen view, then install it here."""
        old = self._view()
        for node in sorted(set(old.members) | set(chosen.members)):
            if node == self.name:
                continue
            if node in old.members:
                actions.append(Send(node, Install(chosen.epoch, self.name, chosen)))
            else:
                actions.append(Send(node, Welcome(chosen.epoch, self.name, chosen)))
        self._view_news(chosen, now_s, actions)

    def _view_news(self, view: View, now_s: float, actions: list[Action]) -> None:
        if view.epoch <= self.last_epoch:
            return
        if self.name not in view.members:
            self.last_epoch = view.epoch
            left = self.name in self.leaving
            why = "left the cluster" if left else "removed from the cluster"
            self._go_offline(f"{why} in epoch {view.epoch}", actions)
            return
        self._install(view, now_s, actions)

    def _install(self, view: View, now_s: float, actions: list[Action]) -> None:
        was_leader = self.view is not None and self.view.leader == self.name
        self.view = view
        self.state = ONLINE
        self.offline_reason = ""
        self.last_epoch = view.epoch
        self.detector.reset(self._peers(), now_s)
        self.acceptor = Acceptor(self.name, view.epoch)
        self.proposer = None
        self.witness = None
        self.failed = {n: r for n, r in self.failed.items() if n in view.members}
        self.leaving &= set(view.members)
        for node in list(self.joins.admitted):
            if node in view.members or not (was_leader and view.leader == self.name):
                self.joins.drop(node)
        actions.append(InstallView(view))
        self._send_heartbeats(now_s, actions)

    # -------------------------------------------------------------- majority

    def _check_majority(self, now_s: float, actions: list[Action]) -> None:
        view = self._view()
        heard = self.detector.heard_peers(now_s, self.config.offline_timeout_s)
        if len(heard) + 1 >= view.majority():
            return
        if len(view.members) != 2:
            self._go_offline(
                f"lost the majority of epoch {view.epoch}: heard {len(heard)} of "
                f"{len(view.members) - 1} peers within {self.config.offline_timeout_s} s",
                actions,
            )
            return
        witness, timeout_s = self.witness, self.config.offline_timeout_s
        if witness is None or witness.epoch != view.epoch:
            self.witness = _Witness(view.epoch, "pending", now_s)
            actions.append(ClaimWitness(view.epoch, self.name))
        elif witness.state == "pending" and now_s - witness.claimed_s > timeout_s:
            self._go_offline(f"no answer from the witness of epoch {view.epoch}", actions)

    def _go_offline(self, reason: str, actions: list[Action]) -> None:
        self.state = OFFLINE
        self.offline_reason = reason
        self.proposer = None
        self.joins = _Joins()
        self.witness = None
        self.leaving.clear()
        self.failed.clear()
        actions.append(GoOffline(reason))

    # ------------------------------------------------------------------ join

    def _start_join(self, event: Rejoin, now_s: float, actions: list[Action]) -> None:
        self.state = JOINING
        self.join_request = JoinRequest(self.name, event.address, event.applied_seq,
                                        self.last_epoch)
        self.join_contacts = event.contacts
        self._send_join(now_s, actions)

    def _send_join(self, now_s: float, actions: list[Action]) -> None:
        assert self.join_request is not None
        self.last_join_sent_s = now_s
        actions.extend(Send(contact, self.join_request) for contact in self.join_contacts)

    def _handle_joining(self, event: Event, now_s: float, actions: list[Action]) -> None:
        if isinstance(event, Tick):
            if now_s - self.last_join_sent_s >= self.config.join_retry_s:
                self._send_join(now_s, actions)
        elif isinstance(event, Welcome) and self._welcomes_me(event.view):
            self._install(event.view, now_s, actions)

    def _welcomes_me(self, view: View) -> bool:
        return self.name in view.members and view.epoch > self.last_epoch

    # --------------------------------------------------------------- helpers

    def _view(self) -> View:
        assert self.view is not None, "an online node has a view"
        return self.view

    def _peers(self) -> list[str]:
        if self.view is None:
            return []
        return [m for m in self.view.members if m != self.name]
