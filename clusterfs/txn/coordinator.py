"""The leader's side of two-phase commit: one coordinator per epoch, sans-IO.

Theory of operation. The leader of the current view is the only coordinator. It starts in
SURVEY: it asks every member for a `Report` (applied sequence, prepared batches). With all
reports in, it settles what older epochs left undecided by the re-drive rule: records up to
the highest applied sequence are committed (laggards are told to `CatchUp`); after that, the
chain of prepared batches that starts right after it (highest epoch wins for each first
sequence) is committed again in this epoch, batch by batch; anything else is dropped. Then it
broadcasts `Ready` and is READY: members forward their captured records.

In READY it runs one round at a time: validate the queued records against the leader's own
replica (`Validate` → `validated`), answer refused ones with their errno (`Refused`), send
`Prepare` of the rest to every member, collect every `Vote`, send `Decide(commit)`, collect
`Ack`s that every member has applied the batch, and broadcast `Done` (capturers answer
their callers). Records forwarded meanwhile queue for the next round (group commit).

A member that votes no or misses a deadline is reported with `RemoveMember`; the coordinator
then waits: the membership layer installs a new view, which starts a new coordinator (epoch
fencing makes the old one's messages void). Every wait resends to the laggards every
`resend_interval_s`, so lost and duplicated messages are harmless. No state is durable here:
the members' prepared logs are what a new leader settles from.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from clusterfs.txn.actions import Action, RemoveMember, Send, Validate
from clusterfs.txn.messages import (
    Ack,
    AnyMessage,
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


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    resend_interval_s: float = 0.2
    prepare_timeout_s: float = 2.0  # votes of one round
    ack_timeout_s: float = 2.0  # applies of one committed round, and catch-up
    survey_timeout_s: float = 2.0
    max_batch_records: int = 1000


class Phase(enum.Enum):
    SURVEY = "survey"  # waiting for every member's Report
    SETTLE = "settle"  # catching laggards up, re-driving undecided batches
    READY = "ready"  # committing forwarded records


@dataclass(slots=True)
class _Wait:
    """Members that still owe an answer, with the time to resend and the deadline."""

    owing: set[str]
    resend_at_s: float
    deadline_s: float


@dataclass(slots=True)
class _Round:
    batch: Batch
    committing: bool = False  # False: collecting votes; True: collecting acks
    refused: bool = False  # a member voted no: the round waits for the next view


@dataclass(slots=True)
class _Known:
    """What this epoch did with one request: queued (0), accepted into a batch, refused."""

    first_seq: int = 0
    errno: int = 0


@dataclass(slots=True)
class _OriginRequests:
    floor: int = 0  # every request below this is answered: forget and ignore it
    known: dict[int, _Known] = field(default_factory=dict)


def settle_chain(reports: Iterable[Report]) -> tuple[int, list[Batch]]:
    """The re-drive rule: (highest applied sequence, prepared batches to commit again)."""
    reports = list(reports)
    applied_seq = max(report.applied_seq for report in reports)
    best: dict[int, Batch] = {}
    for report in reports:
        for batch in report.prepared:
            held = best.get(batch.first_seq)
            if held is None or batch.epoch > held.epoch:
                best[batch.first_seq] = batch
    chain: list[Batch] = []
    seq = applied_seq + 1
    while seq in best:
        chain.append(best[seq])
        seq = best[seq].last_seq + 1
    return applied_seq, chain


class Coordinator:
    """The coordinator of one epoch on its leader. One driver task calls it."""

    def __init__(self, view: View, config: CoordinatorConfig | None = None) -> None:
        self.view = view
        self.name = view.leader
        self.config = config or CoordinatorConfig()
        self.phase = Phase.SURVEY
        self.next_seq = 0  # first sequence of the next batch, known once surveyed
        self.done_seq = 0  # every member has applied up to here
        self._reports: dict[str, Report] = {}
        self._acked: dict[str, int] = {}
        self._redrive: list[Batch] = []
        self._catch_up_seq = 0
        self._catch_up_source = self.name
        self._round: _Round | None = None
        self._validating: tuple[int, list[tuple[str, int, Forward]]] | None = None
        self._queue: list[tuple[str, int, Forward]] = []
        self._origins: dict[str, _OriginRequests] = {}
        self._wait: _Wait | None = None
        self._removed: set[str] = set()

    # -- inputs ---------------------------------------------------------------------------

    def start(self, now_s: float) -> list[Action]:
        """Begin the epoch: survey every member."""
        return self._await(set(self.view.members), now_s, self.config.survey_timeout_s,
                           Survey(self.view.epoch))

    def on_message(self, sender: str, message: AnyMessage, now_s: float) -> list[Action]:
        if message.epoch != self.view.epoch or not self.view.has(sender):
            return []  # epoch fencing; strangers are ignored
        if isinstance(message, Report):
            return self._on_report(sender, message, now_s)
        if isinstance(message, Forward):
            return self._on_forward(sender, message, now_s)
        if isinstance(message, Vote):
            return self._on_vote(sender, message, now_s)
        if isinstance(message, Ack):
            return self._on_ack(sender, message, now_s)
        return []

    def validated(self, epoch: int, first_seq: int, errnos: list[int],
                  now_s: float) -> list[Action]:
        """The driver's answer to `Validate`: one errno per record, 0 for accepted."""
        if (epoch != self.view.epoch or self._validating is None
                or self._validating[0] != first_seq):
            return []
        requests = self._validating[1]
        self._validating = None
        if len(errnos) != len(requests):
            raise ValueError(f"{len(errnos)} outcomes for {len(requests)} records")
        actions: list[Action] = []
        entries: list[Entry] = []
        for (origin, request_id, forward), errno in zip(requests, errnos, strict=True):
            known = self._origins[origin].known.setdefault(request_id, _Known())
            if errno:
                known.errno = errno
                actions.append(Send(origin, Refused(self.view.epoch, request_id, errno)))
            else:
                known.first_seq = first_seq
                entries.append(Entry(origin, request_id, forward.record))
        if entries:
            batch = Batch(self.view.epoch, first_seq, tuple(entries))
            self.next_seq = batch.last_seq + 1
            return actions + self._prepare(batch, now_s)
        return actions + self._maybe_validate()

    def tick(self, now_s: float) -> list[Action]:
        """Resend to laggards and enforce deadlines."""
        wait = self._wait
        if wait is None or not wait.owing:
            return []
        actions: list[Action] = []
        if now_s >= wait.deadline_s:
            wait.deadline_s = math.inf  # asked once; the new view restarts the coordinator
            for node in sorted(wait.owing - self._removed):
                self._removed.add(node)
                actions.append(RemoveMember(node, f"no answer in {self.phase.value} phase"))
        if now_s >= wait.resend_at_s:
            wait.resend_at_s = now_s + self.config.resend_interval_s
            actions += self._resend(wait.owing)
        return actions

    def next_deadline_s(self) -> float | None:
        if self._wait is None or not self._wait.owing:
            return None
        return min(self._wait.resend_at_s, self._wait.deadline_s)

    def is_idle(self) -> bool:
        return (self.phase is Phase.READY and self._round is None
                and self._validating is None and not self._queue)

    # -- survey and settle ----------------------------------------------------------------

    def _on_report(self, sender: str, report: Report, now_s: float) -> list[Action]:
        if self.phase is Phase.READY:  # a member that missed Ready asks again
            return [Send(sender, Ready(self.view.epoch, self.done_seq))]
        if self.phase is not Phase.SURVEY:
            return []
        self._reports[sender] = report
        self._acked[sender] = report.applied_seq
        self._answered(sender)
        if len(self._reports) < len(self.view.members):
            return []
        applied_seq, chain = settle_chain(self._reports.values())
        self._redrive = [Batch(self.view.epoch, b.first_seq, b.entries) for b in chain]
        self.done_seq = applied_seq
        self.next_seq = (chain[-1].last_seq if chain else applied_seq) + 1
        self._catch_up_seq = applied_seq
        self._catch_up_source = next(node for node, report in sorted(self._reports.items())
                                     if report.applied_seq == applied_seq)
        if self._acked[self.name] == applied_seq:
            self._catch_up_source = self.name
        self.phase = Phase.SETTLE
        laggards = {n for n in self.view.members if self._acked[n] < applied_seq}
        message = CatchUp(self.view.epoch, applied_seq, self._catch_up_source)
        return self._await(laggards, now_s, self.config.ack_timeout_s, message) + \
            self._settle_progress(now_s)

    def _settle_progress(self, now_s: float) -> list[Action]:
        if self.phase is not Phase.SETTLE or self._round is not None or self._waiting():
            return []
        if self._redrive:
            return self._prepare(self._redrive.pop(0), now_s)
        self.phase = Phase.READY
        ready = Ready(self.view.epoch, self.done_seq)
        return [Send(node, ready) for node in self.view.members] + self._maybe_validate()

    # -- ready: forwarded records -----------------------------------------------------------

    def _on_forward(self, origin: str, forward: Forward, now_s: float) -> list[Action]:
        if self.phase is not Phase.READY:
            return []  # the origin forwards again after Ready
        requests = self._origins.setdefault(origin, _OriginRequests())
        self._raise_floor(requests, forward.answered_below)
        if forward.request_id < requests.floor:
            return []
        known = requests.known.get(forward.request_id)
        if known is None:
            requests.known[forward.request_id] = _Known()
            self._queue.append((origin, forward.request_id, forward))
            return self._maybe_validate()
        if known.errno:
            return [Send(origin, Refused(self.view.epoch, forward.request_id, known.errno))]
        if known.first_seq and known.first_seq <= self.done_seq:
            return [Send(origin, Done(self.view.epoch, self.done_seq))]
        return []  # queued or in flight: the answer will come

    @staticmethod
    def _raise_floor(requests: _OriginRequests, answered_below: int) -> None:
        if answered_below <= requests.floor:
            return
        requests.floor = answered_below
        for request_id in [r for r in requests.known if r < answered_below]:
            del requests.known[request_id]

    def _maybe_validate(self) -> list[Action]:
        if (self.phase is not Phase.READY or self._round is not None
                or self._validating is not None or not self._queue):
            return []
        taken = self._queue[:self.config.max_batch_records]
        del self._queue[:len(taken)]
        self._validating = (self.next_seq, taken)
        records = tuple(forward.record for _, _, forward in taken)
        return [Validate(self.view.epoch, self.next_seq, records)]

    # -- one round: prepare, vote, decide, ack, done -----------------------------------------

    def _prepare(self, batch: Batch, now_s: float) -> list[Action]:
        self._round = _Round(batch)
        return self._await(set(self.view.members), now_s, self.config.prepare_timeout_s,
                           Prepare(self.view.epoch, batch))

    def _on_vote(self, sender: str, vote: Vote, now_s: float) -> list[Action]:
        round_ = self._round
        if (round_ is None or round_.committing or round_.refused
                or vote.first_seq != round_.batch.first_seq):
            return []
        if not vote.yes:
            round_.refused = True  # never commit after a no, even if a retry says yes
            return self._vote_no(sender, vote.reason)
        self._answered(sender)
        if self._waiting():
            return []
        round_.committing = True
        decide = Decide(self.view.epoch, round_.batch.first_seq, commit=True)
        laggards = {n for n in self.view.members if self._acked[n] < round_.batch.last_seq}
        actions = self._await(laggards, now_s, self.config.ack_timeout_s, decide)
        return actions if self._waiting() else actions + self._finish_round(now_s)

    def _vote_no(self, sender: str, reason: str) -> list[Action]:
        """A member that cannot log is removed; if it is this node, the round is aborted
        and the leader steps down (the others' prepared logs settle it later)."""
        actions: list[Action] = []
        if sender == self.name and self._round is not None:
            abort = Decide(self.view.epoch, self._round.batch.first_seq, commit=False)
            actions += [Send(node, abort) for node in self.view.members]
        if sender not in self._removed:
            self._removed.add(sender)
            actions.append(RemoveMember(sender, f"voted no: {reason}"))
        return actions

    def _on_ack(self, sender: str, ack: Ack, now_s: float) -> list[Action]:
        self._acked[sender] = max(self._acked.get(sender, 0), ack.applied_seq)
        target = self._ack_target()
        if target is None or self._acked[sender] < target:
            return []
        self._answered(sender)
        if self._waiting():
            return []
        if self.phase is Phase.SETTLE and self._round is None:
            return self._settle_progress(now_s)  # catch-up finished
        return self._finish_round(now_s)

    def _ack_target(self) -> int | None:
        if self._round is not None:
            return self._round.batch.last_seq if self._round.committing else None
        return self._catch_up_seq if self.phase is Phase.SETTLE else None

    def _finish_round(self, now_s: float) -> list[Action]:
        assert self._round is not None
        self.done_seq = self._round.batch.last_seq
        self._round = None
        self._wait = None
        done = Done(self.view.epoch, self.done_seq)
        actions: list[Action] = [Send(node, done) for node in self.view.members]
        if self.phase is Phase.SETTLE:
            return actions + self._settle_progress(now_s)
        return actions + self._maybe_validate()

    # -- waits ------------------------------------------------------------------------------

    def _await(self, owing: set[str], now_s: float, timeout_s: float,
               message: AnyMessage) -> list[Action]:
        self._wait = _Wait(owing, now_s + self.config.resend_interval_s, now_s + timeout_s)
        self._message = message
        return [Send(node, message) for node in sorted(owing)]

    def _resend(self, owing: set[str]) -> list[Action]:
        return [Send(node, self._message) for node in sorted(owing)]

    def _answered(self, node: str) -> None:
        if self._wait is not None:
            self._wait.owing.discard(node)

    def _waiting(self) -> bool:
        return self._wait is not None and bool(self._wait.owing)
