"""Every member's side of two-phase commit, sans-IO.

Theory of operation. A participant follows the view it is given and takes protocol
messages only from its epoch (older epochs are fenced off, newer ones wait for the view),
and leader messages only from the view's leader.

- Capture: a local record gets a request id and is forwarded to the leader once the leader
  has said `Ready` for this epoch; it is resent every `resend_interval_s` until answered.
  It is answered by `Refused` (errno), or — once applied here — by `Done`/`Ready` covering
  its sequence (success: applied on every member). When the view changes, requests that are
  not applied are forwarded again after the new leader's `Ready`; by then every batch of the
  old epochs that will ever commit is applied here, so nothing is forwarded twice.
- Prepare: the batch is logged durably (`LogDurably`, confirmed by `logged`), then the
  participant votes yes. A batch it has applied already (a re-drive) is voted yes at once.
- Commit: decided batches are applied strictly in sequence order (`ApplyBatch`), then
  acknowledged. A participant that learns of commits it cannot apply (a lost message, a
  catch-up order) fetches the committed batches from the leader or the named source
  (`FetchLog`/`LogEntries`). When that peer's log no longer reaches back, or the gap is
  wider than `snapshot_gap_records`, it asks the driver for a snapshot of the peer's
  replica (`NeedSnapshot`), then fetches the batches
  committed after the snapshot. Requests still waiting then fail with EIO: whether the
  snapshot holds their records is not known here.
- Survey: it reports its applied sequence and its durable prepared batches; an older
  durable batch stays reported until the batch replacing it is durable. A batch that
  becomes durable only after its epoch ended was never voted for, so it is not reported
  (it could otherwise resurface after a later leader refused one of its records).
- It keeps the last `log_keep_batches` committed batches to serve other members' fetches.
"""

from __future__ import annotations

import errno
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clusterfs.records import AnyRecord
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
    AnyMessage,
    Batch,
    CatchUp,
    Decide,
    Done,
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
from clusterfs.txn.view import View

_FROM_LEADER = (Prepare, Decide, Done, Survey, CatchUp, Ready, Refused)


@dataclass(frozen=True, slots=True)
class ParticipantConfig:
    resend_interval_s: float = 0.2
    log_keep_batches: int = 10_000
    max_fetch_batches: int = 1000
    # Further behind than this, a snapshot is faster than replaying the log (and a joiner
    # that replays for long holds up the leader's settling, and with it every commit).
    snapshot_gap_records: int = 10_000


@dataclass(slots=True)
class _Request:
    record: AnyRecord
    forwarded_epoch: int = 0  # 0: not forwarded in any epoch yet
    applied_seq: int = 0  # 0: not applied here yet
    resend_at_s: float = 0.0


class Participant:
    """One member's participant. Restore `applied_seq`, `prepared` and `log` from the
    replica when a node restarts."""

    def __init__(self, name: str, applied_seq: int = 0, prepared: tuple[Batch, ...] = (),
                 log: tuple[Batch, ...] = (), config: ParticipantConfig | None = None,
                 first_request_id: int = 1) -> None:
        self.name = name
        self.config = config or ParticipantConfig()
        self.view: View | None = None
        self.applied_seq = applied_seq
        self.prepared: dict[int, Batch] = {b.first_seq: b for b in prepared}
        self._durable = {(b.epoch, b.first_seq) for b in prepared}
        self._logged: dict[int, Batch] = dict(self.prepared)  # durable: what Report says
        self._logging: dict[tuple[int, int], Batch] = {}
        self._failed: dict[tuple[int, int], str] = {}  # batches it could not log: votes no
        self._decided: dict[int, int] = {}  # first_seq -> epoch of the commit decision
        self._fetched: dict[int, Batch] = {}  # committed batches learned by fetching
        self.log: OrderedDict[int, Batch] = OrderedDict((b.first_seq, b) for b in log)
        self._known_committed_seq = applied_seq
        self._source: str | None = None
        self._fetch_at_s = 0.0
        self._ready_epoch = 0
        self._ready_through_seq = 0
        self._requests: dict[int, _Request] = {}
        # A restarted node starts above every id it used before (the driver passes a clock
        # reading), so a leader that still remembers an old request never mistakes a new one.
        self._next_request_id = first_request_id
        self._report_at_s = 0.0
        self._snapshot_asked = False

    # -- inputs ---------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        return self.view is not None and self.view.has(self.name)

    @property
    def serving(self) -> bool:
        """Online, and the leader of this epoch has said `Ready`: captures go through."""
        return (self.online and self.view is not None and self._ready_epoch == self.view.epoch
                and self.applied_seq >= self._ready_through_seq)

    def on_view(self, view: View, now_s: float) -> list[Action]:
        if self.view is not None and view.epoch <= self.view.epoch:
            return []
        self.view = view
        self._source = None
        if view.has(self.name):
            return []
        return self._fail_requests()  # offline: no answer can be promised any more

    def capture(self, record: AnyRecord, now_s: float) -> tuple[int, list[Action]]:
        """A local namespace change; returns its request id and the actions."""
        request_id = self._next_request_id
        self._next_request_id += 1
        if not self.online:
            return request_id, [Reply(request_id, errno.EIO)]
        request = _Request(record)
        self._requests[request_id] = request
        return request_id, self._forward(request_id, request, now_s)

    def logged(self, epoch: int, first_seq: int, ok: bool, now_s: float,
               reason: str = "") -> list[Action]:
        """The driver's confirmation of `LogDurably` (ok=False: it could not log)."""
        key = (epoch, first_seq)
        batch = self._logging.pop(key, None)
        if batch is None:
            return []
        if self.view is None or epoch != self.view.epoch or not self.online:
            return []  # too late to vote: it cannot commit, so it is neither kept nor reported
        if ok:
            self._durable.add(key)
            self._keep_logged(batch)
        else:
            self._failed[key] = reason
        vote = Vote(epoch, first_seq, self.name, ok, reason)
        return [Send(self.view.leader, vote)]

    def on_message(self, sender: str, message: AnyMessage, now_s: float) -> list[Action]:
        view = self.view
        if view is None or not self.online or message.epoch != view.epoch:
            return []  # fenced: an older epoch, or one whose view is not here yet
        if isinstance(message, _FROM_LEADER) and sender != view.leader:
            return []
        handler = _HANDLERS.get(type(message))
        return handler(self, sender, message, now_s) if handler else []

    def tick(self, now_s: float) -> list[Action]:
        if not self.online:
            return []
        actions: list[Action] = []
        if self._ready_epoch == self._epoch():
            for request_id, request in self._requests.items():
                if request.forwarded_epoch == self._epoch() and request.resend_at_s <= now_s:
                    actions += self._send_forward(request_id, request, now_s)
        elif self._report_at_s <= now_s:
            # Ask for a Ready that was lost, or that went to this node's previous process:
            # one restarted faster than the failure detector is still a member of the
            # epoch, whose leader does not know it needs Ready again. Not only when a
            # request waits: a restarted node serves (and so captures) only after Ready.
            self._report_at_s = now_s + self.config.resend_interval_s
            actions.append(self._report())
        if self._behind() and self._fetch_at_s <= now_s:
            actions += self._fetch(now_s)
        return actions

    def next_deadline_s(self) -> float | None:
        ready = self._ready_epoch == self._epoch()
        times = [r.resend_at_s for r in self._requests.values()
                 if ready and r.forwarded_epoch == self._epoch()]
        if self._behind():
            times.append(self._fetch_at_s)
        if not ready:
            times.append(self._report_at_s)
        return min(times) if times and self.online else None

    def pending_requests(self) -> int:
        return len(self._requests)

    # -- messages -------------------------------------------------------------------------

    def _on_survey(self, sender: str, message: Survey, now_s: float) -> list[Action]:
        return [self._report()]

    def _on_prepare(self, sender: str, message: Prepare, now_s: float) -> list[Action]:
        batch = message.batch
        key = (batch.epoch, batch.first_seq)
        if batch.epoch != message.epoch:
            return []
        if batch.last_seq <= self.applied_seq or key in self._durable:
            return [Send(sender, Vote(message.epoch, batch.first_seq, self.name, True))]
        if key in self._failed:
            vote = Vote(message.epoch, batch.first_seq, self.name, False, self._failed[key])
            return [Send(sender, vote)]
        if key in self._logging:
            return []
        for first_seq in [s for s in self.prepared if s >= batch.first_seq]:
            del self.prepared[first_seq]  # leftovers of older epochs
        self.prepared[batch.first_seq] = batch
        self._logging[key] = batch
        return [LogDurably(batch)]

    def _keep_logged(self, batch: Batch) -> None:
        """Remember a durable batch for reports. Until a newer batch at a sequence is
        durable, the older one stays reported: a batch hidden while it is being replaced
        could be a committed one that a new leader must re-drive."""
        held = self._logged.get(batch.first_seq)
        if held is not None and held.epoch > batch.epoch:
            return  # confirmations may arrive out of order
        self._logged = {s: b for s, b in self._logged.items()
                        if s < batch.first_seq or b.epoch > batch.epoch}
        self._logged[batch.first_seq] = batch

    def _on_decide(self, sender: str, message: Decide, now_s: float) -> list[Action]:
        if not message.commit:
            held = self.prepared.get(message.first_seq)
            if held is None or held.epoch != message.epoch:
                return []
            del self.prepared[message.first_seq]
            self._durable.discard((held.epoch, held.first_seq))
            if self._logged.get(message.first_seq) == held:
                del self._logged[message.first_seq]
            return [Discard(message.first_seq)]
        if message.first_seq > self.applied_seq:
            self._decided[message.first_seq] = message.epoch
            self._known_committed_seq = max(self._known_committed_seq, message.first_seq)
        return self._pump(now_s) or [self._ack()]

    def _on_done(self, sender: str, message: Done, now_s: float) -> list[Action]:
        self._known_committed_seq = max(self._known_committed_seq, message.through_seq)
        return self._pump(now_s) + self._answer_applied(message.through_seq)

    def _on_refused(self, sender: str, message: Refused, now_s: float) -> list[Action]:
        if self._requests.pop(message.request_id, None) is None:
            return []
        return [Reply(message.request_id, message.errno)]

    def _on_catch_up(self, sender: str, message: CatchUp, now_s: float) -> list[Action]:
        self._known_committed_seq = max(self._known_committed_seq, message.through_seq)
        self._source = message.source
        self._fetch_at_s = now_s
        return self._pump(now_s) or [self._ack()]

    def _on_ready(self, sender: str, message: Ready, now_s: float) -> list[Action]:
        if self._ready_epoch == message.epoch:
            return []
        self._ready_epoch = message.epoch
        self._ready_through_seq = message.through_seq
        self._known_committed_seq = max(self._known_committed_seq, message.through_seq)
        self._source = None
        return self._pump(now_s) + self._maybe_reforward(now_s)

    def _on_fetch_log(self, sender: str, message: FetchLog, now_s: float) -> list[Action]:
        batches = tuple(b for s, b in self.log.items() if s >= message.from_seq)
        batches = batches[:self.config.max_fetch_batches]
        too_old = (message.from_seq <= self.applied_seq
                   and (not batches or batches[0].first_seq != message.from_seq))
        return [Send(sender, LogEntries(message.epoch, () if too_old else batches, too_old))]

    def _on_log_entries(self, sender: str, message: LogEntries, now_s: float) -> list[Action]:
        if message.too_old:
            if self._snapshot_asked:
                return []
            self._snapshot_asked = True
            return [NeedSnapshot(sender, f"{sender}'s log does not reach back to "
                                         f"{self.applied_seq + 1}")]
        for batch in message.batches:
            if batch.first_seq > self.applied_seq:
                self._fetched[batch.first_seq] = batch
                self._known_committed_seq = max(self._known_committed_seq, batch.last_seq)
        return self._pump(now_s)

    # -- snapshots ------------------------------------------------------------------------

    def installed_snapshot(self, applied_seq: int, log: tuple[Batch, ...],
                           now_s: float) -> list[Action]:
        """The driver installed a snapshot that holds every record up to `applied_seq` and
        the snapshot's commit log; go on from there."""
        self._snapshot_asked = False
        if applied_seq <= self.applied_seq:
            return self._pump(now_s)
        self.applied_seq = applied_seq
        for table in (self.prepared, self._decided, self._fetched, self._logged):
            for seq in [s for s in table if s <= applied_seq]:
                del table[seq]
        self._durable = {key for key in self._durable if key[1] > applied_seq}
        kept = log[-self.config.log_keep_batches:]
        self.log = OrderedDict((b.first_seq, b) for b in kept)
        self._known_committed_seq = max(self._known_committed_seq, applied_seq)
        self._fetch_at_s = now_s
        ack = [self._ack()] if self.view is not None else []
        return self._fail_requests() + ack + self._pump(now_s)

    def snapshot_failed(self, now_s: float) -> list[Action]:
        """The snapshot could not be had: fetch again, which asks again if still needed."""
        self._snapshot_asked = False
        self._fetch_at_s = now_s + self.config.resend_interval_s
        return []

    # -- applying in order ----------------------------------------------------------------

    def _next_committed(self) -> Batch | None:
        seq = self.applied_seq + 1
        fetched = self._fetched.get(seq)
        if fetched is not None:
            return fetched
        held = self.prepared.get(seq)
        if held is not None and self._decided.get(seq) == held.epoch:
            return held
        return None

    def _pump(self, now_s: float) -> list[Action]:
        """Apply every decided batch that is next in sequence, then ack or fetch."""
        actions: list[Action] = []
        while (batch := self._next_committed()) is not None:
            actions += self._apply(batch)
        if actions:
            actions.append(self._ack())
            if self._ready_epoch == self._epoch():
                actions += self._maybe_reforward(now_s)
        if self._behind() and self._fetch_at_s <= now_s:
            actions += self._fetch(now_s)
        return actions

    def _apply(self, batch: Batch) -> list[Action]:
        self.applied_seq = batch.last_seq
        for table in (self.prepared, self._decided, self._fetched, self._logged):
            for seq in [s for s in table if s <= self.applied_seq]:
                del table[seq]
        self._durable = {key for key in self._durable if key[1] > self.applied_seq}
        self.log[batch.first_seq] = batch
        while len(self.log) > self.config.log_keep_batches:
            self.log.popitem(last=False)
        for entry in batch.entries:
            request = self._requests.get(entry.request_id)
            if entry.origin == self.name and request is not None:
                request.applied_seq = batch.last_seq
        return [ApplyBatch(batch)]

    def _behind(self) -> bool:
        return self._known_committed_seq > self.applied_seq and self._next_committed() is None

    def _fetch(self, now_s: float) -> list[Action]:
        assert self.view is not None
        self._fetch_at_s = now_s + self.config.resend_interval_s
        source = self._source or self.view.leader
        gap = self._known_committed_seq - self.applied_seq
        if gap > self.config.snapshot_gap_records:
            if self._snapshot_asked:
                return []  # the driver is fetching one
            self._snapshot_asked = True
            return [NeedSnapshot(source, f"{gap} records behind")]
        return [Send(source, FetchLog(self.view.epoch, self.applied_seq + 1))]

    def _ack(self) -> Send:
        assert self.view is not None
        return Send(self.view.leader, Ack(self.view.epoch, self.name, self.applied_seq))

    def _report(self) -> Send:
        assert self.view is not None
        prepared = tuple(b for s, b in sorted(self._logged.items()) if s > self.applied_seq)
        report = Report(self.view.epoch, self.name, self.applied_seq, prepared)
        return Send(self.view.leader, report)

    # -- requests -------------------------------------------------------------------------

    def _epoch(self) -> int:
        return self.view.epoch if self.view is not None else 0

    def _answered_below(self) -> int:
        return min(self._requests, default=self._next_request_id)

    def _forward(self, request_id: int, request: _Request, now_s: float) -> list[Action]:
        if self._ready_epoch != self._epoch():
            return []  # forwarded after this epoch's Ready
        return self._send_forward(request_id, request, now_s)

    def _send_forward(self, request_id: int, request: _Request, now_s: float) -> list[Action]:
        assert self.view is not None
        request.forwarded_epoch = self.view.epoch
        request.resend_at_s = now_s + self.config.resend_interval_s
        forward = Forward(self.view.epoch, request_id, request.record, self._answered_below())
        return [Send(self.view.leader, forward)]

    def _answer_applied(self, through_seq: int) -> list[Action]:
        through_seq = min(through_seq, self.applied_seq)
        answered = [rid for rid, r in self._requests.items() if 0 < r.applied_seq <= through_seq]
        for request_id in answered:
            del self._requests[request_id]
        return [Reply(request_id, 0) for request_id in answered]

    def _maybe_reforward(self, now_s: float) -> list[Action]:
        """After Ready: once everything it covers is applied here, forward the rest."""
        if self.applied_seq < self._ready_through_seq:
            return []  # _pump calls again once caught up
        actions = self._answer_applied(self._ready_through_seq)
        for request_id, request in self._requests.items():
            if request.applied_seq == 0 and request.forwarded_epoch != self._epoch():
                actions += self._send_forward(request_id, request, now_s)
        return actions

    def _fail_requests(self) -> list[Action]:
        failed, self._requests = self._requests, {}
        return [Reply(request_id, errno.EIO) for request_id in failed]


_HANDLERS: dict[type, Callable[[Participant, str, Any, float], list[Action]]] = {
    Survey: Participant._on_survey,
    Prepare: Participant._on_prepare,
    Decide: Participant._on_decide,
    Done: Participant._on_done,
    Refused: Participant._on_refused,
    CatchUp: Participant._on_catch_up,
    Ready: Participant._on_ready,
    FetchLog: Participant._on_fetch_log,
    LogEntries: Participant._on_log_entries,
}
