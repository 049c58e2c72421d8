"""The trio driver of the commit cores: the cluster's committer on one node.

It feeds this node's `Member` everything that happens (messages from peers, local
captures, view changes, the answers of the replica, the passing of time) and performs the
actions it returns, in order, one event after another, so that batches are applied strictly
one after another: in its own task, or, for a peer's message that arrives while that task
waits with nothing queued, at once in the transport's task (`_offer`). Messages to this
node itself and `Validate` are handled inline.

The file system layer sees the `Committer` interface only: `submit` waits until the record
is applied on every member (or refused with an errno), `submit_lazy` does not wait.

Durability (DESIGN.md rule 3): a batch is logged as prepared in a flushed write transaction
before this node votes for it (in the event loop when the view has other members, in a
worker thread on a sole member; see `_logs_inline`); a committed batch is applied in one
transaction that also removes it from the prepared log, so the record is durable on every
member from the vote on, whichever of the two a crash leaves behind. A record is applied on
every node by the same function (`namespace.apply`), in the order of the global sequence
numbers.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import lmdb
import msgspec
import trio

from clusterfs import records
from clusterfs.committer import AppliedHook
from clusterfs.namespace import Applied, NamespaceError, apply
from clusterfs.store import CLUSTER_ID, SnapshotError, Store
from clusterfs.txn import faults
from clusterfs.txn.actions import (
    Action,
    ApplyBatch,
    Discard,
    LogDurably,
    NeedSnapshot,
    RemoveMember,
    Reply,
    Send,
    Validate,
)
from clusterfs.txn.coordinator import CoordinatorConfig
from clusterfs.txn.member import Member
from clusterfs.txn.messages import (
    AnyMessage,
    Batch,
    ProtocolError,
    SnapshotReady,
    SnapshotRequest,
    decode,
    decode_batch,
    encode,
    encode_batch,
)
from clusterfs.txn.participant import Participant, ParticipantConfig
from clusterfs.txn.view import View

log = logging.getLogger(__name__)
# What a joining or restarting node reports while it catches up: `clusterfs mount` shows
# these lines on the terminal until the mount is live (cli.py); they are in the log too.
progress = logging.getLogger("clusterfs.progress")


def _test_setting(name: str, default: int) -> int:
    """A positive whole number from the environment (set by tests only), else `default`."""
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else default


APPLIED_SEQ = b"applied_seq"
# Committed batches kept for catching up by log; a replica further behind installs a
# snapshot. Tests shorten it through the environment to exercise snapshots quickly.
LOG_KEEP_BATCHES = _test_setting("CLUSTERFS_TEST_LOG_KEEP_BATCHES", 10_000)
SNAPSHOT_MAX_AGE_S = 3600.0  # a snapshot left behind by an asker that died is removed then
_SNAPSHOT_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def valid_snapshot_token(token: str) -> bool:
    """A plain name in the snapshot area: never "..", never a path (the answer comes from
    the network, and the asker removes that directory once it is done)."""
    return _SNAPSHOT_TOKEN.fullmatch(token) is not None
LAZY_DELAY_S = 0.2  # how long a lazy record waits for company
INLINE_APPLY_RECORDS = 64  # bigger batches are applied in a worker thread
IDLE_FLUSH_DELAY_S = 0.02  # quiet time after which applied batches are flushed
INLINE_FLUSH_MAX_S = 0.002  # a prepared-log flush slower than this: the next in a thread

# Deadlines with room for a loaded two-core machine; a joiner's catch-up counts as an ack.
COORDINATOR_CONFIG = CoordinatorConfig(prepare_timeout_s=3.0, ack_timeout_s=5.0,
                                       survey_timeout_s=3.0)

SendFrame = Callable[[str, bytes], None]
MembershipReport = Callable[[RemoveMember], None]


@dataclass(eq=False)
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    result: Applied | None = None
    error: NamespaceError | None = None


@dataclass(frozen=True)
class _Message:
    sender: str
    message: AnyMessage


@dataclass(frozen=True)
class _Capture:
    record: records.Record
    waiter: _Waiter | None  # None: lazy, nobody waits


@dataclass(frozen=True)
class _Logged:
    epoch: int
    first_seq: int
    ok: bool
    reason: str


@dataclass(frozen=True)
class _NewView:
    view: View


@dataclass(frozen=True)
class _SnapshotInstalled:
    ok: bool
    applied_seq: int = 0
    log: tuple[Batch, ...] = ()


@dataclass(frozen=True)
class _Rest:
    """Actions of an event handled outside the loop, from the first that must wait on."""

    actions: tuple[Action, ...]


_Event = _Message | _Capture | _Logged | _NewView | _SnapshotInstalled | _Rest


def restore_participant(name: str, store: Store) -> Participant:
    """This node's participant as its replica left it: applied sequence, prepared batches
    and the tail of the commit log."""
    with store.read() as view:
        applied_seq = view.get_counter(APPLIED_SEQ)
        prepared = tuple(decode_batch(raw) for raw in view.prepared())
        tail = tuple(decode_batch(raw) for raw in view.log_tail(LOG_KEEP_BATCHES))
    return Participant(name, applied_seq, prepared, tail,
                       ParticipantConfig(log_keep_batches=LOG_KEEP_BATCHES),
                       first_request_id=time.time_ns())


class CommitDriver:
    """Runs one node's `Member` from one trio task; the `Committer` of a cluster node."""

    def __init__(self, name: str, store: Store, send_frame: SendFrame, on_applied: AppliedHook,
                 report: MembershipReport, snapshots_dir: Path,
                 before_ack: Callable[[], Awaitable[None]] | None = None) -> None:
        """`before_ack` runs after a batch is applied, before it is acknowledged: the file
        system layer waits there until the kernel has dropped what the batch changed.
        `snapshots_dir` (in the common block directory) is where replicas are copied for
        members that fell too far behind."""
        self.name = name
        self._snapshots_dir = snapshots_dir
        self._snapshot_source: str | None = None  # asked for a snapshot, not installed yet
        self._before_ack = before_ack
        self._store = store
        self._send_frame = send_frame
        self._on_applied = on_applied
        self._report = report
        self.member = Member(restore_participant(name, store), COORDINATOR_CONFIG)
        self._events_in, self._events = trio.open_memory_channel[_Event](math.inf)
        self._waiters: dict[int, _Waiter] = {}
        self._outcomes: dict[int, Applied] = {}
        self._nursery: trio.Nursery | None = None
        self._unflushed = False
        self._last_flush_s = 0.0  # how long the last flush of the prepared log took
        self._lazy: list[records.Record] = []
        self._lazy_due_s = math.inf
        self._waiting = trio.CancelScope()  # the loop's wait for the next event
        self._idle = False  # the loop waits for an event and none is queued
        self.offline_reason = ""
        self.changed = trio.Event()  # set (and replaced) whenever the view or readiness moves
        self._crash_point = faults.from_environment()

    # -- the Committer interface ------------------------------------------------------------
    async def submit(self, record: records.Record) -> Applied:
        waiter = _Waiter()
        # Queued, not offered: handled in this FUSE call's task, a bug in the cores would
        # end as one failed call (EIO), not as the stopped node it is in the loop.
        self._queue(_Capture(record, waiter))
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.result is not None
        return waiter.result

    def submit_lazy(self, record: records.Record) -> None:
        """Housekeeping (a purge): it rides along with the next captured record, or goes
        alone after LAZY_DELAY_S, so it rarely costs a commit round of its own."""
        if not self._lazy:
            self._lazy_due_s = trio.current_time() + LAZY_DELAY_S
            self._waiting.deadline = min(self._waiting.deadline, self._lazy_due_s)
        self._lazy.append(record)

    # -- inputs from the transport and the membership layer ---------------------------------
    def on_frame(self, sender: str, payload: bytes) -> None:
        try:
            message = decode(payload)
        except ProtocolError as exc:
            log.warning("dropped a commit-protocol frame from %s: %s", sender[:64], exc)
            return
        self._offer(_Message(sender, message))

    def on_view(self, view: View) -> None:
        self._queue(_NewView(view))

    def go_offline(self, reason: str) -> None:
        """Stop taking part at once: no vote, apply or acknowledgement; callers get EIO."""
        self.offline_reason = reason
        for waiter in self._waiters.values():
            waiter.error = NamespaceError(errno.EIO, f"offline: {reason}")
            waiter.done.set()
        self._waiters.clear()
        self._notify()

    @property
    def serving(self) -> bool:
        return not self.offline_reason and self.member.participant.serving

    @property
    def applied_seq(self) -> int:
        return self.member.participant.applied_seq

    # -- the loop ---------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                event: _Event | None = None
                with trio.move_on_at(self._next_deadline_s()) as self._waiting:
                    event = await self._receive_or_flush()
                now_s = trio.current_time()
                was_serving = self.serving
                if event is None:
                    actions = self.member.tick(now_s)
                    if self._lazy and now_s >= self._lazy_due_s:
                        actions += self._capture_lazy(now_s)
                else:
                    actions = self._feed(event, now_s)
                await self._perform(actions)
                if self.serving != was_serving:
                    self._notify()

    def _next_deadline_s(self) -> float:
        times = [self.member.next_deadline_s(), self._lazy_due_s if self._lazy else None]
        return min((t for t in times if t is not None), default=math.inf)

    def _capture_lazy(self, now_s: float) -> list[Action]:
        actions: list[Action] = []
        lazy, self._lazy = self._lazy, []
        for record in lazy:
            actions += self.member.capture(cast(records.AnyRecord, record), now_s)[1]
        return actions

    async def _receive_or_flush(self) -> _Event:
        """The next event; if none comes for a moment after an unflushed apply, flush the
        replica in a worker thread meanwhile (bounding what a power loss can undo)."""
        if self._unflushed:
            with trio.move_on_after(IDLE_FLUSH_DELAY_S):
                return await self._receive()
            self._unflushed = False
            try:
                await trio.to_thread.run_sync(self._store.sync)
            except (lmdb.Error, OSError) as exc:
                log.error("replica flush failed: %s", exc)
        return await self._receive()

    async def _receive(self) -> _Event:
        self._idle = self._events.statistics().current_buffer_used == 0
        try:
            return await self._events.receive()
        finally:
            self._idle = False

    def _queue(self, event: _Event) -> None:
        self._idle = False  # whatever comes next goes behind this event
        self._events_in.send_nowait(event)

    def _offer(self, event: _Event) -> None:
        """Queue `event` for the loop, or, while the loop waits with nothing queued,
        handle it at once in the caller's task. Trio runs one task at a time, so nothing of
        the loop's is under way then; a message spares the task switch to the loop (about
        50 us here, on every hop of a commit round). The first action that must wait (an
        apply) and all after it go to the loop, in order."""
        if not self._idle:
            self._queue(event)
            return
        now_s = trio.current_time()
        was_serving = self.serving
        rest = self._perform_now(collections.deque(self._feed(event, now_s)))
        if rest:
            self._queue(_Rest(tuple(rest)))
        if self.serving != was_serving:
            self._notify()
        self._waiting.deadline = min(self._waiting.deadline, self._next_deadline_s())

    def _feed(self, event: _Event, now_s: float) -> list[Action]:
        if isinstance(event, _NewView) and event.view.has(self.name):
            self.offline_reason = ""  # admitted again (re-join)
        if self.offline_reason:
            if isinstance(event, _Capture) and event.waiter is not None:
                event.waiter.error = NamespaceError(errno.EIO, f"offline: {self.offline_reason}")
                event.waiter.done.set()
            return []
        match event:
            case _Message(sender, SnapshotRequest()):
                self._serve_snapshot(sender)
                return []
            case _Message(sender, SnapshotReady() as ready):
                return self._on_snapshot_ready(sender, ready, now_s)
            case _Message(sender, message):
                return self.member.on_message(sender, message, now_s)
            case _SnapshotInstalled(ok, applied_seq, tail):
                if not ok:
                    return self.member.participant.snapshot_failed(now_s)
                return self.member.participant.installed_snapshot(applied_seq, tail, now_s)
            case _Capture(record, waiter):
                actions = self._capture_lazy(now_s)  # same batch, most likely
                request_id, more = self.member.capture(cast(records.AnyRecord, record), now_s)
                if waiter is not None:
                    self._waiters[request_id] = waiter
                return actions + more
            case _Logged(epoch, first_seq, ok, reason):
                return self.member.logged(epoch, first_seq, ok, now_s, reason)
            case _NewView(view):
                actions = self.member.on_view(view, now_s)
                self._notify()
                return actions
            case _Rest(actions):
                return list(actions)
        raise AssertionError(event)

    async def _perform(self, actions: list[Action]) -> None:
        """Perform in order; actions produced inline (messages to self, validation) queue
        behind the ones already there."""
        queue = self._perform_now(collections.deque(actions))
        while queue:
            apply = queue.popleft()
            assert isinstance(apply, ApplyBatch)
            await self._apply(apply.batch)
            queue = self._perform_now(queue)

    def _perform_now(self, queue: collections.deque[Action]) -> collections.deque[Action]:
        """Perform in order up to the first action that must wait (an apply); returns it
        and what follows (empty once all is done)."""
        while queue:
            if isinstance(queue[0], ApplyBatch):
                return queue
            action = queue.popleft()
            match action:
                case Send(to, message) if to == self.name:
                    queue.extend(self.member.on_message(self.name, message, trio.current_time()))
                case Send(to, message):
                    self._crash_point.before_send(type(message).__name__)
                    self._send_frame(to, encode(message))
                case LogDurably(batch) if self._logs_inline():
                    queue.extend(self._log_now(batch))
                case LogDurably(batch):
                    assert self._nursery is not None
                    self._nursery.start_soon(self._log_durably, batch)
                case Discard(first_seq):
                    self._discard(first_seq)
                case Validate(epoch, first_seq, batch_records):
                    errnos = self._validate(batch_records)
                    queue.extend(self.member.validated(epoch, first_seq, errnos,
                                                       trio.current_time()))
                case Reply(request_id, code):
                    self._reply(request_id, code)
                case RemoveMember():
                    self._report(action)
                case NeedSnapshot(source, reason):
                    self._ask_snapshot(source, reason)
        return queue

    # -- the replica --------------------------------------------------------------------------
    def _logs_inline(self) -> bool:
        """Where a batch is logged. With other members and a quick device, in the loop:
        the flush is shorter than the others' answers, so the loop still has time to read
        the next batch's requests, and each round goes without two thread hops (a
        follower's are on the way to success). Once a flush took longer than
        `INLINE_FLUSH_MAX_S` (a device busy with other writes), in a worker thread until
        one is quick again: the loop goes on answering lookups, reads, disk commands and
        heartbeats meanwhile. A sole member always flushes in a worker thread: blocked in
        the flush, its loop would read no request, and every batch would hold one record."""
        view = self.member.view
        return (view is not None and len(view.members) > 1
                and self._last_flush_s <= INLINE_FLUSH_MAX_S)

    def _log_now(self, batch: Batch) -> list[Action]:
        """Durability point 1, in the loop: the batch is on disk before this node votes."""
        reason = self._put_prepared(batch)
        return self.member.logged(batch.epoch, batch.first_seq, not reason,
                                  trio.current_time(), reason)

    async def _log_durably(self, batch: Batch) -> None:
        """Durability point 1, in a worker thread: the same, answered with an event."""
        reason = await trio.to_thread.run_sync(self._put_prepared, batch)
        self._queue(_Logged(batch.epoch, batch.first_seq, not reason, reason))

    def _put_prepared(self, batch: Batch) -> str:
        """Log `batch` and flush; "" when it is durable, else why not (this node votes no)."""
        started_s = time.monotonic()
        try:
            with self._store.write() as view:
                view.put_prepared(batch.first_seq, encode_batch(batch))
        except (lmdb.Error, OSError) as exc:
            log.error("cannot log batch %d durably: %s", batch.first_seq, exc)
            return str(exc) or type(exc).__name__
        finally:
            self._last_flush_s = time.monotonic() - started_s
        return ""

    def _discard(self, first_seq: int) -> None:
        with self._store.write(flush=False) as view:
            view.delete_prepared(first_seq)

    async def _apply(self, batch: Batch) -> None:
        """Apply to the replica, then this node's side effects (backing files, kernel
        caches); the outcomes of this node's own requests wait for their `Reply`.

        The apply is not flushed: the batch is durable in the prepared log (point 1) until
        this transaction removes it, so a crash either keeps the apply or the prepared
        batch, which the settle rule commits again. An idle flush follows soon after."""
        if len(batch.entries) <= INLINE_APPLY_RECORDS:
            outcomes = self._apply_in_replica(batch)  # cheaper than a thread hop
        else:
            outcomes = await trio.to_thread.run_sync(self._apply_in_replica, batch)
        self._unflushed = True
        for entry, outcome in zip(batch.entries, outcomes, strict=True):
            local = entry.origin == self.name
            if isinstance(outcome, NamespaceError):
                # Validated by the leader against an identical replica: this replica differs.
                log.error("record %s of batch %d failed here (%s): replica diverged",
                          type(entry.record).__name__, batch.first_seq, outcome)
                self._report(RemoveMember(self.name, f"cannot apply batch {batch.first_seq}"))
                continue
            self._on_applied(entry.record, outcome, local)
            if local and entry.request_id in self._waiters:
                self._outcomes[entry.request_id] = outcome
        if self._before_ack is not None:
            await self._before_ack()

    def _apply_in_replica(self, batch: Batch) -> list[Applied | NamespaceError]:
        outcomes: list[Applied | NamespaceError] = []
        with self._store.write(flush=False) as view:
            for entry in batch.entries:
                try:
                    with self._store.savepoint(view) as child:
                        outcomes.append(apply(child, entry.record))
                except NamespaceError as exc:
                    outcomes.append(exc)
            view.set_counter(APPLIED_SEQ, batch.last_seq)
            view.append_log(batch.first_seq, encode_batch(batch), LOG_KEEP_BATCHES)
            view.delete_prepared(batch.first_seq)
        return outcomes

    def _validate(self, batch_records: tuple[records.AnyRecord, ...]) -> list[int]:
        """The leader's check: each record against the replica as if the accepted ones
        before it were applied; nothing is kept."""
        errnos: list[int] = []
        with self._store.scratch() as view:
            for record in batch_records:
                try:
                    with self._store.savepoint(view) as child:
                        apply(child, record)
                    errnos.append(0)
                except NamespaceError as exc:
                    errnos.append(exc.errno)
        return errnos

    def _reply(self, request_id: int, code: int) -> None:
        waiter = self._waiters.pop(request_id, None)
        outcome = self._outcomes.pop(request_id, None)
        if waiter is None:
            return  # a lazy record
        if code:
            waiter.error = NamespaceError(code, "refused by the cluster")
        elif outcome is None:  # cannot happen: success comes after the local apply
            waiter.error = NamespaceError(errno.EIO, "applied elsewhere but not here")
        else:
            waiter.result = outcome
        waiter.done.set()

    # -- snapshots: a replica too far behind the others' logs copies one of theirs -------------
    def _ask_snapshot(self, source: str, reason: str) -> None:
        progress.warning("catching up by snapshot from %s: %s", source, reason)
        self._snapshot_source = source
        view = self.member.view
        self._send_frame(source, encode(SnapshotRequest(view.epoch if view else 0)))

    def _serve_snapshot(self, asker: str) -> None:
        view = self.member.view
        if view is None or not view.has(asker) or asker == self.name:
            log.warning("refused a snapshot to %s: not a member", asker[:64])
            return
        assert self._nursery is not None
        self._nursery.start_soon(self._make_snapshot, asker, view.epoch)

    async def _make_snapshot(self, asker: str, epoch: int) -> None:
        token = f"{asker}-{uuid.uuid4().hex}"
        started_s = time.monotonic()
        try:
            applied_seq = await trio.to_thread.run_sync(self._copy_snapshot, token)
        except (lmdb.Error, OSError) as exc:
            log.error("cannot copy the replica for %s: %s", asker, exc)
            reply = SnapshotReady(epoch, "", 0, f"{self.name} cannot copy its replica: {exc}")
        else:
            log.info("copied the replica for %s (through sequence %d) in %.1f s", asker,
                     applied_seq, time.monotonic() - started_s)
            reply = SnapshotReady(epoch, token, applied_seq)
        self._send_frame(asker, encode(reply))

    def _copy_snapshot(self, token: str) -> int:
        self._snapshots_dir.mkdir(parents=True, exist_ok=True)
        for old in self._snapshots_dir.iterdir():
            with contextlib.suppress(OSError):  # another node may be removing it too
                if time.time() - old.stat().st_mtime > SNAPSHOT_MAX_AGE_S:
                    shutil.rmtree(old, ignore_errors=True)
        return self._store.copy_snapshot(self._snapshots_dir / token)

    def _on_snapshot_ready(self, sender: str, ready: SnapshotReady, now_s: float
                           ) -> list[Action]:
        if sender != self._snapshot_source:
            return []  # not asked, or already being installed
        self._snapshot_source = None
        if ready.error or not valid_snapshot_token(ready.token):
            log.warning("no snapshot from %s: %s", sender, ready.error or "a malformed answer")
            return self.member.participant.snapshot_failed(now_s)
        assert self._nursery is not None
        self._nursery.start_soon(self._install_snapshot, sender, ready.token)
        return []

    async def _install_snapshot(self, source: str, token: str) -> None:
        path = self._snapshots_dir / token
        started_s = time.monotonic()
        try:
            applied_seq, raw_log = await trio.to_thread.run_sync(
                self._store_snapshot, path, source)
            tail = tuple(decode_batch(raw) for raw in raw_log)
        except (lmdb.Error, OSError, SnapshotError, msgspec.DecodeError) as exc:
            log.error("cannot install the snapshot from %s: %s", source, exc)
            self._queue(_SnapshotInstalled(False))
            return
        finally:
            await trio.to_thread.run_sync(shutil.rmtree, path, True)
        progress.warning("installed the snapshot from %s (through sequence %d) in %.1f s",
                         source, applied_seq, time.monotonic() - started_s)
        self._queue(_SnapshotInstalled(True, applied_seq, tail))

    def _store_snapshot(self, path: Path, source: str) -> tuple[int, list[bytes]]:
        with self._store.read() as view:
            cluster_id = view.get_meta(CLUSTER_ID) or b""
        reported = [-1]

        def report(copied: int, total: int) -> None:
            percent = 100 * copied // max(total, 1)
            if percent >= reported[0] + 10 or copied == total:
                reported[0] = percent
                progress.warning("snapshot from %s: %d of %d entries (%d%%)", source,
                                 copied, total, percent)

        return self._store.install_snapshot(path, cluster_id, report)

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
