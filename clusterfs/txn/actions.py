"""What the commit cores ask their driver to do.

The driver performs the actions of one call in list order. `ApplyBatch` is done (in a synced
write transaction) before any later action of the same list; `LogDurably` and `Validate`
are answered later by the driver with an event (`Member.logged`, `Member.validated`), so a
driver may group the flushes of several nodes' work.
"""

from __future__ import annotations

from dataclasses import dataclass

from clusterfs.records import AnyRecord
from clusterfs.txn.messages import AnyMessage, Batch


@dataclass(frozen=True, slots=True)
class Send:
    """Send `message` to node `to` (possibly this node itself: deliver it locally)."""

    to: str
    message: AnyMessage


@dataclass(frozen=True, slots=True)
class LogDurably:
    """Store `batch` as prepared, synced; it replaces any prepared batch from
    `batch.first_seq` on. Confirm with `logged(epoch, first_seq, ok)`."""

    batch: Batch


@dataclass(frozen=True, slots=True)
class Discard:
    """Forget the prepared batch at `first_seq` (aborted); no sync needed."""

    first_seq: int


@dataclass(frozen=True, slots=True)
class ApplyBatch:
    """Apply the committed `batch` to the replica, in order, synced, and drop it from the
    prepared log. Batches arrive in strict sequence order with no gap."""

    batch: Batch


@dataclass(frozen=True, slots=True)
class Validate:
    """Leader only: check `records` in order against the replica as if each accepted one
    were applied before the next (then roll everything back). Answer with
    `validated(epoch, first_seq, errnos)`, one errno per record, 0 for accepted."""

    epoch: int
    first_seq: int
    records: tuple[AnyRecord, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer local request `request_id`: 0 is success (the record is applied on every
    member; the driver answers with what its own `ApplyBatch` returned for it)."""

    request_id: int
    errno: int


@dataclass(frozen=True, slots=True)
class RemoveMember:
    """Ask the membership layer to remove `node` (it voted no or missed a deadline)."""

    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class NeedSnapshot:
    """This replica fell behind the others' logs: install a snapshot of `source`'s replica
    (the driver confirms with `Participant.installed_snapshot` or `snapshot_failed`)."""

    source: str
    reason: str


Action = Send | LogDurably | Discard | ApplyBatch | Validate | Reply | RemoveMember | NeedSnapshot
