"""The commit protocol on the wire: typed msgspec tagged structs, versioned frames.

A frame is one version byte followed by the msgpack encoding of one message. Every message
names the epoch it belongs to; receivers fence older epochs (see docs/commit-protocol.md).
Decoding anything that is not a valid frame of this version raises `ProtocolError` and
nothing else, so a driver can drop hostile or garbled input with one `except`.

Sequence numbers count records: a batch whose first record has sequence `first_seq` and
that holds n entries covers `first_seq .. first_seq + n - 1`.
"""

from __future__ import annotations

import msgspec

from clusterfs.records import AnyRecord

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 1024 * 1024


class ProtocolError(Exception):
    """A frame that cannot be decoded into a message of this protocol version."""


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """One captured record with the request that waits for it on its origin node."""

    origin: str
    request_id: int
    record: AnyRecord


class Batch(msgspec.Struct, frozen=True, array_like=True):
    """Consecutive records proposed together; `epoch` is the epoch that proposed it."""

    epoch: int
    first_seq: int
    entries: tuple[Entry, ...]

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.entries) - 1


class Message(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """Base of every protocol message."""

    epoch: int


# -- to the coordinator ----------------------------------------------------------------------

class Forward(Message, frozen=True):
    """A captured record for the leader. `answered_below`: every request of the origin with
    a smaller id is answered, so the leader may forget them."""

    request_id: int
    record: AnyRecord
    answered_below: int


class Vote(Message, frozen=True):
    first_seq: int
    node: str
    yes: bool
    reason: str = ""


class Ack(Message, frozen=True):
    """The sender has applied (durably) every record up to `applied_seq`."""

    node: str
    applied_seq: int


class Report(Message, frozen=True):
    """A member's answer to `Survey`: what it applied and what it holds prepared."""

    node: str
    applied_seq: int
    prepared: tuple[Batch, ...]


# -- to participants ------------------------------------------------------------------------

class Refused(Message, frozen=True):
    """The leader's replica refuses the request's record with `errno`; it is never applied."""

    request_id: int
    errno: int


class Prepare(Message, frozen=True):
    batch: Batch


class Decide(Message, frozen=True):
    """The decision on the batch prepared as (`epoch`, `first_seq`)."""

    first_seq: int
    commit: bool


class Done(Message, frozen=True):
    """Every member has applied every record up to `through_seq`: answer their requests."""

    through_seq: int


class Survey(Message, frozen=True):
    """A new leader asks each member for a `Report` before it commits anything."""


class CatchUp(Message, frozen=True):
    """Records up to `through_seq` are committed; fetch what you lack from `source`."""

    through_seq: int
    source: str


class Ready(Message, frozen=True):
    """The leader has settled the epoch: everything up to `through_seq` is applied on every
    member, nothing later from an older epoch will ever commit. Forward your requests."""

    through_seq: int


class FetchLog(Message, frozen=True):
    from_seq: int


class LogEntries(Message, frozen=True):
    """Committed batches from `FetchLog.from_seq` on; `too_old` when the sender's log no
    longer reaches back that far (the asker needs a snapshot)."""

    batches: tuple[Batch, ...]
    too_old: bool = False


# -- between drivers: snapshots of a replica (not part of the commit cores) -------------------

class SnapshotRequest(Message, frozen=True):
    """Copy your replica into the block directory's snapshot area for the sender."""


class SnapshotReady(Message, frozen=True):
    """The copy is `token` in the snapshot area and holds every record up to
    `applied_seq`; `error` says why there is none."""

    token: str
    applied_seq: int
    error: str = ""


AnyMessage = (
    Forward | Vote | Ack | Report | Refused | Prepare | Decide | Done | Survey | CatchUp | Ready
    | FetchLog | LogEntries | SnapshotRequest | SnapshotReady
)
TO_COORDINATOR = (Forward, Vote, Ack, Report)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)


def encode(message: Message) -> bytes:
    return bytes([PROTOCOL_VERSION]) + _encoder.encode(message)


def decode(frame: bytes) -> AnyMessage:
    """Decode one frame; anything wrong with it raises `ProtocolError` only."""
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise ProtocolError(f"frame is {type(frame).__name__}, not bytes")
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes is over {MAX_FRAME_BYTES}")
    if len(frame) < 2:
        raise ProtocolError("frame too short")
    if frame[0] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {frame[0]}, expected {PROTOCOL_VERSION}")
    try:
        return _decoder.decode(memoryview(frame)[1:])
    except Exception as exc:  # msgspec raises several types on hostile input; one boundary
        raise ProtocolError(f"undecodable frame: {exc}") from None


_batch_decoder = msgspec.msgpack.Decoder(Batch)


def encode_batch(batch: Batch) -> bytes:
    """A batch as the replica's commit log stores it."""
    return _encoder.encode(batch)


def decode_batch(raw: bytes) -> Batch:
    return _batch_decoder.decode(raw)
