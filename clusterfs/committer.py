"""Committers: how a captured namespace record becomes a durable, applied change.

The file system layer only ever calls `submit` (wait for the result) or `submit_lazy` (for
housekeeping such as purging an unlinked inode, which may ride along with the next batch). The
local committer here commits on this node alone; the cluster's 2PC committer replaces it behind
the same interface.

Group commit: every record queued while a batch is being written joins the next batch, and a
batch costs one synced LMDB commit however many records it holds. Each record is applied in a
nested transaction, so a refused record (an errno) is rolled back without its neighbours.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import lmdb
import trio

from clusterfs import records
from clusterfs.namespace import Applied, NamespaceError, apply
from clusterfs.store import Store

log = logging.getLogger(__name__)

LAZY_DELAY_S = 0.2  # how long a lazy record waits for company before it commits alone
IDLE_SYNC_DELAY_S = 0.02  # idle time after which the last batch's meta page is flushed
APPLIED_SEQ = b"applied_seq"

# Called on every node for every record applied there, in sequence order, before the waiting
# call (if any) resumes; the bool says whether this node captured the record (`local`).
AppliedHook = Callable[[records.Record, Applied, bool], None]


class Committer(Protocol):
    async def submit(self, record: records.Record) -> Applied: ...

    def submit_lazy(self, record: records.Record) -> None: ...


@dataclass(eq=False)
class _Pending:
    record: records.Record
    done: trio.Event = field(default_factory=trio.Event)
    result: Applied | None = None
    error: NamespaceError | None = None


def commit_batch(store: Store, batch: Sequence[records.Record]) -> list[Applied | NamespaceError]:
    """Apply `batch` in order in one synced write transaction; one outcome per record."""
    outcomes: list[Applied | NamespaceError] = []
    with store.write() as view:
        seq = view.get_counter(APPLIED_SEQ)
        for record in batch:
            try:
                with store.savepoint(view) as child:
                    outcome: Applied | NamespaceError = apply(child, record)
                    seq += 1
            except NamespaceError as exc:
                outcome = exc
            outcomes.append(outcome)
        view.set_counter(APPLIED_SEQ, seq)
    return outcomes


class LocalCommitter:
    """Commits on this node alone, in batches, from one trio task."""

    def __init__(self, store: Store, on_applied: AppliedHook) -> None:
        self._store = store
        self._on_applied = on_applied
        self._queue: list[_Pending] = []
        self._lazy: list[records.Record] = []
        self._wakeup = trio.Event()
        self._waiting = trio.CancelScope()
        self._unsynced = False

    async def submit(self, record: records.Record) -> Applied:
        pending = _Pending(record)
        self._queue.append(pending)
        self._wakeup.set()
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def submit_lazy(self, record: records.Record) -> None:
        self._lazy.append(record)
        if self._waiting.deadline == math.inf:
            self._waiting.deadline = trio.current_time() + LAZY_DELAY_S

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self._idle_timeout_s()) as self._waiting:
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                if await self._commit_in_thread():
                    self._unsynced = True
                elif self._unsynced:
                    self._sync()
        finally:
            self.commit_queued()  # on shutdown: nothing queued is left unanswered
            self._sync()

    def _idle_timeout_s(self) -> float:
        if self._lazy:
            return LAZY_DELAY_S
        return IDLE_SYNC_DELAY_S if self._unsynced else math.inf

    def _sync(self) -> None:
        """Flush the last batch's meta page once the committer has been idle for a moment
        (under load, every commit's flush does it for the batch before; see `store`)."""
        self._unsynced = False
        try:
            self._store.sync()
        except (lmdb.Error, OSError) as exc:
            log.error("replica sync failed: %s", exc)

    def _take(self) -> tuple[list[_Pending], list[records.Record]]:
        waiting, self._queue = self._queue, []
        lazy, self._lazy = self._lazy, []
        return waiting, [p.record for p in waiting] + lazy

    async def _commit_in_thread(self) -> bool:
        """Group commit: the batch's write transaction and its flush run in a worker thread,
        so the event loop goes on answering lookups and queueing the next batch."""
        waiting, batch = self._take()
        if not batch:
            return False
        outcomes = await trio.to_thread.run_sync(self._commit, batch)
        self._finish(waiting, batch, outcomes)
        return True

    def commit_queued(self) -> bool:
        """Commit everything queued now, in this thread (shutdown, tests)."""
        waiting, batch = self._take()
        if not batch:
            return False
        self._finish(waiting, batch, self._commit(batch))
        return True

    def _commit(self, batch: list[records.Record]) -> list[Applied | NamespaceError]:
        try:
            return commit_batch(self._store, batch)
        except lmdb.MapFullError:
            return [NamespaceError(errno.ENOSPC, "replica is full")] * len(batch)
        except (lmdb.Error, OSError) as exc:
            log.error("replica commit failed: %s", exc)
            return [NamespaceError(errno.EIO, str(exc))] * len(batch)

    def _finish(self, waiting: list[_Pending], batch: list[records.Record],
                outcomes: list[Applied | NamespaceError]) -> None:
        """Side effects on this node, then wake every waiting submitter."""
        for record, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Applied):
                self._on_applied(record, outcome, True)  # every record is captured here
        for pending, outcome in zip(waiting, outcomes, strict=False):
            if isinstance(outcome, Applied):
                pending.result = outcome
            else:
                pending.error = outcome
            pending.done.set()
