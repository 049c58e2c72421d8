"""The balancer of one node: sans-IO decisions, all state transitions here.

Every session request reaches every node; each node calls `on_request` and
exactly one of them replies. Theory of operation:

1. A node with affinity to the request's key (a live session, or one closed
   less than `linger_s` ago) accepts it.
2. Otherwise the owner of the key's bucket in the current view decides. If no
   other node may hold the bucket (steady state: always) it accepts at once,
   with no message to anyone.
3. If the bucket moved recently, the owner asks the nodes that may still hold
   it (usually one: the bucket's owner in the previous view; every member when
   this node has no history) and waits. One "mine" means that node answers the
   client and the owner stays silent; "not mine" from all means the owner
   accepts. No answer by the deadline means "busy, retry" to the client: a
   silent member may still hold the session, so accepting could duplicate it.
   When the membership layer removes that member, its sessions are lost and
   the owner stops waiting for it.
4. A node that answers "mine" pins its affinity long enough for the request to
   reach it too, so its answer and its own decision agree.
5. A decision in progress continues across a view change. If a node that
   started deciding in an older epoch is asked about the same key by a node
   deciding in a newer epoch, the older decision is dropped (the newer owner
   wins); in the other direction the question waits for the decision.
6. After each view change every node reports the moved buckets it still holds
   (HolderReport) and later settles each as its last affinity there ends. When
   all moved buckets are settled the cluster is back in steady state and no
   balancer messages flow.

Inputs: `install_view`, `on_request`, `on_close`, `on_peer`, `tick`; each
takes `now` (seconds, any monotonic origin) and returns actions for the
driver: `Send` to a peer, `Reply` to a client. `next_deadline` says when to
call `tick`. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from lb.affinity import AffinityTable
from lb.hashing import AffinityMode, affinity_key, key_bucket
from lb.holders import HolderMap
from lb.messages import (
    AffinityAnswer,
    AffinityQuery,
    ClientReply,
    HolderReport,
    PeerMessage,
    SessionAccept,
    SessionBusy,
    SessionClose,
    SessionRequest,
    Settle,
)
from lb.table import DEFAULT_TABLE_SIZE
from lb.view import View, view_change

MAX_EARLY_MESSAGES = 100_000  # reports and settles held for a view not yet installed


@dataclass(frozen=True)
class BalancerConfig:
    """Tunables; the same on every node of a cluster."""

    affinity: AffinityMode = AffinityMode.CLIENT_ID
    linger_s: float = 60.0
    query_timeout_s: float = 0.5
    pin_s: float = 10.0
    retry_after_s: float = 0.5
    table_size: int = DEFAULT_TABLE_SIZE


class Send(msgspec.Struct, frozen=True):
    """Send `message` to the peer node `to`."""

    to: str
    message: PeerMessage


class Reply(msgspec.Struct, frozen=True):
    """Answer the client that sent a request."""

    client_id: str
    client_addr: str
    message: ClientReply


Action = Send | Reply


class _Pending:
    """A decision the owner is waiting on, for one key."""

    __slots__ = ("bucket", "deadline", "deferred", "epoch", "key", "query_id", "requests",
                 "waiting")

    def __init__(self, key: bytes, bucket: int, epoch: int, query_id: int,
                 waiting: set[str], deadline: float) -> None:
        self.key = key
        self.bucket = bucket
        self.epoch = epoch
        self.query_id = query_id
        self.waiting = waiting
        self.deadline = deadline
        self.requests: list[SessionRequest] = []
        self.deferred: list[AffinityQuery] = []


class Balancer:
    """One node's balancer. Not thread-safe; one driver task calls it."""

    def __init__(self, name: str, config: BalancerConfig | None = None,
                 incarnation: int = 0) -> None:
        self.name = name
        self.config = config or BalancerConfig()
        self.incarnation = incarnation
        self.view: View | None = None
        self.active = False
        self._owners: Sequence[str] = ()
        self._reset_state()
        self._sessions_opened = 0
        self._queries_started = 0

    def _reset_state(self) -> None:
        self.affinity = AffinityTable(self.config.linger_s)
        self.holders = HolderMap(self.name)
        self._pending: dict[bytes, _Pending] = {}
        self._pending_buckets: Counter[int] = Counter()
        self._reported: set[int] = set()
        self._early: list[HolderReport | Settle] = []

    # -- inspection -------------------------------------------------------------

    def is_steady(self) -> bool:
        """True when this node keeps no routing state and waits on nothing."""
        return self.holders.is_settled() and not self._pending and not self._reported

    def pending_count(self) -> int:
        """Keys whose decision waits on answers."""
        return len(self._pending)

    def next_deadline(self) -> float | None:
        """When `tick` must next be called, or None."""
        deadlines = [pending.deadline for pending in self._pending.values()]
        expiry = self.affinity.next_expiry()
        if expiry is not None:
            deadlines.append(expiry)
        return min(deadlines, default=None)

    # -- membership -------------------------------------------------------------

    def install_view(self, view: View, now: float) -> list[Action]:
        """Adopt the next membership view; a view without this node takes it offline."""
        if self.view is not None and view.epoch <= self.view.epoch:
            return []
        previous, was_active = self.view, self.active
        self.view = view
        if self.name not in view.members:
            self.active = False
            self._reset_state()
            return []
        self._owners = view.table(self.config.table_size).owners()
        others = [member for member in view.members if member != self.name]
        if was_active and previous is not None and view.follows(previous):
            change = view_change(previous, view, self.config.table_size)
            self.holders.apply_change(change, self._owners)
        else:
            self.holders.forget_history(others)
        self.active = True
        actions = self._stop_waiting_on_nonmembers(now)
        actions += self._report(others)
        actions += self._replay_early(now)
        return actions

    def _stop_waiting_on_nonmembers(self, now: float) -> list[Action]:
        assert self.view is not None
        members = set(self.view.members)
        actions: list[Action] = []
        for pending in list(self._pending.values()):
            pending.waiting &= members
            if not pending.waiting:
                actions += self._finish(pending, accept=True, now=now)
        return actions

    def _report(self, others: list[str]) -> list[Action]:
        assert self.view is not None
        held = self.affinity.buckets() | set(self._pending_buckets)
        self._reported = {bucket for bucket in held if self._owners[bucket] != self.name}
        report = HolderReport(self.view.epoch, self.name, sorted(self._reported))
        return [Send(other, report) for other in others]

    def _replay_early(self, now: float) -> list[Action]:
        early, self._early = self._early, []
        actions: list[Action] = []
        for message in early:
            actions += self.on_peer(message, now)
        return actions

    # -- clients ----------------------------------------------------------------

    def on_request(self, request: SessionRequest, now: float) -> list[Action]:
        """A session request (every node sees every one)."""
        if not self.active:
            return []
        key = affinity_key(self.config.affinity, request.client_id, request.client_addr)
        bucket = key_bucket(key, self.config.table_size)
        if self.affinity.has(key, now):
            return [self._accept(request, key, bucket)]
        if self._owners[bucket] != self.name:
            return []
        pending = self._pending.get(key)
        if pending is not None:
            pending.requests.append(request)
            return []
        holders = self.holders.holders(bucket)
        if not holders:
            return [self._accept(request, key, bucket)]
        return self._ask(request, key, bucket, set(holders), now)

    def on_close(self, close: SessionClose, now: float) -> list[Action]:
        """A client closed a session held here; its affinity starts to linger."""
        self.affinity.close(close.session_id, now)
        return []

    def _accept(self, request: SessionRequest, key: bytes, bucket: int) -> Reply:
        self._sessions_opened += 1
        session_id = f"{self.name}.{self.incarnation}.{self._sessions_opened}"
        self.affinity.open(key, bucket, session_id)
        accept = SessionAccept(request.request_id, self.name, session_id)
        return Reply(request.client_id, request.client_addr, accept)

    def _busy(self, request: SessionRequest) -> Reply:
        busy = SessionBusy(request.request_id, self.name, self.config.retry_after_s)
        return Reply(request.client_id, request.client_addr, busy)

    def _ask(self, request: SessionRequest, key: bytes, bucket: int, holders: set[str],
             now: float) -> list[Action]:
        assert self.view is not None
        self._queries_started += 1
        deadline = now + self.config.query_timeout_s
        pending = _Pending(key, bucket, self.view.epoch, self._queries_started, holders,
                           deadline)
        pending.requests.append(request)
        self._pending[key] = pending
        self._pending_buckets[bucket] += 1
        query = AffinityQuery(self.view.epoch, self.name, pending.query_id, key, bucket)
        return [Send(holder, query) for holder in sorted(holders)]

    def _finish(self, pending: _Pending, *, accept: bool, now: float) -> list[Action]:
        """End a decision: accept its requests or not, then answer deferred questions."""
        del self._pending[pending.key]
        self._pending_buckets[pending.bucket] -= 1
        if not self._pending_buckets[pending.bucket]:
            del self._pending_buckets[pending.bucket]
        actions: list[Action] = []
        if accept:
            actions += [self._accept(r, pending.key, pending.bucket) for r in pending.requests]
        actions += [self._answer(query, now) for query in pending.deferred]
        if not accept:
            actions += self._settle_free({pending.bucket})
        return actions

    # -- peers ------------------------------------------------------------------

    def on_peer(self, message: PeerMessage, now: float) -> list[Action]:
        """A message from another node's balancer."""
        if not self.active:
            return []
        if isinstance(message, AffinityQuery):
            return self._on_query(message, now)
        if isinstance(message, AffinityAnswer):
            return self._on_answer(message, now)
        return self._on_settlement(message)

    def _on_query(self, query: AffinityQuery, now: float) -> list[Action]:
        pending = self._pending.get(query.key)
        if pending is None:
            return [self._answer(query, now)]
        if query.epoch > pending.epoch:
            return [*self._finish(pending, accept=False, now=now), self._answer(query, now)]
        pending.deferred.append(query)
        return []

    def _answer(self, query: AffinityQuery, now: float) -> Send:
        assert self.view is not None
        mine = self.affinity.has(query.key, now)
        if mine:
            self.affinity.pin(query.key, now + self.config.pin_s)
        answer = AffinityAnswer(self.view.epoch, self.name, query.query_id, query.key,
                                query.bucket, mine, self._is_free(query.bucket))
        return Send(query.asker, answer)

    def _on_answer(self, answer: AffinityAnswer, now: float) -> list[Action]:
        assert self.view is not None
        if answer.settled and answer.epoch == self.view.epoch:
            self.holders.apply_settle(answer.holder, [answer.bucket])
        pending = self._pending.get(answer.key)
        if pending is None or pending.query_id != answer.query_id:
            return []
        if answer.mine:
            return self._finish(pending, accept=False, now=now)
        pending.waiting.discard(answer.holder)
        if pending.waiting:
            return []
        return self._finish(pending, accept=True, now=now)

    def _on_settlement(self, message: HolderReport | Settle) -> list[Action]:
        assert self.view is not None
        if message.epoch > self.view.epoch:
            if len(self._early) < MAX_EARLY_MESSAGES:
                self._early.append(message)
        elif message.epoch == self.view.epoch and message.node in self.view.members:
            if isinstance(message, HolderReport):
                self.holders.apply_report(message.node, message.buckets, self._owners)
            else:
                self.holders.apply_settle(message.node, message.buckets)
        return []

    # -- time -------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Handle deadlines that passed: busy replies, expired affinity, settles."""
        if not self.active:
            return []
        actions: list[Action] = []
        for pending in [p for p in self._pending.values() if p.deadline <= now]:
            actions += [self._busy(request) for request in pending.requests]
            actions += self._finish(pending, accept=False, now=now)
        actions += self._settle_free(self.affinity.expire(now))
        return actions

    def _is_free(self, bucket: int) -> bool:
        """True when this node neither owns nor holds anything in `bucket`."""
        return (self._owners[bucket] != self.name
                and not self.affinity.holds_bucket(bucket)
                and bucket not in self._pending_buckets)

    def _settle_free(self, buckets: set[int]) -> list[Action]:
        assert self.view is not None
        free = sorted(b for b in buckets & self._reported if self._is_free(b))
        if not free:
            return []
        self._reported.difference_update(free)
        settle = Settle(self.view.epoch, self.name, free)
        return [Send(member, settle) for member in self.view.members if member != self.name]
