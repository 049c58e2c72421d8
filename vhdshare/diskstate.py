"""A shared disk's replicated state: its persistent reservations, and the reservation
commands already applied, so that a command retried after a failover is answered, not
applied again.

The cluster keeps the encoded value per disk in its replicated namespace and changes it only
by compare-and-set records (`clusterfs.records.SetDiskState`); this module gives the bytes
their meaning. A command is known by its initiator, its tunnel request id and a fingerprint
of its CDB and parameter data, so a reused id with a different command is not mistaken for
a retry.
"""

from __future__ import annotations

import hashlib

import msgspec

from clusterfs.pieces import Buffer
from vhdshare.reservations import ReservationState

DONE_PER_INITIATOR = 8  # reservation commands an initiator may have in flight at once
MAX_DONE = 1024  # bounds the state when many initiators come and go


class DoneCommand(msgspec.Struct, frozen=True):
    """A reservation command applied to the disk, and what it answered."""

    initiator: str
    request_id: int
    fingerprint: bytes
    status: int
    sense: bytes


class DiskState(msgspec.Struct, frozen=True):
    reservations: ReservationState = ReservationState()
    done: tuple[DoneCommand, ...] = ()  # oldest first

    def find_done(self, initiator: str, request_id: int, fingerprint: bytes
                  ) -> DoneCommand | None:
        for command in self.done:
            if (command.request_id == request_id and command.initiator == initiator
                    and command.fingerprint == fingerprint):
                return command
        return None

    def with_done(self, command: DoneCommand) -> DiskState:
        """This state with `command` remembered, forgetting the oldest ones beyond the bounds."""
        mine = [i for i, done in enumerate(self.done) if done.initiator == command.initiator]
        oldest = set(mine[:max(0, len(mine) + 1 - DONE_PER_INITIATOR)])
        kept = [done for i, done in enumerate(self.done) if i not in oldest]
        return DiskState(self.reservations, (*kept, command)[-MAX_DONE:])


def fingerprint(cdb: bytes, data_out: Buffer) -> bytes:
    return hashlib.sha256(cdb + b"\0" + data_out).digest()[:16]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(DiskState)


def encode(state: DiskState) -> bytes:
    return _encoder.encode(state)


def decode(raw: bytes) -> DiskState:
    """The state in `raw`; b"" (a disk that never had one) is the empty state."""
    return _decoder.decode(raw) if raw else DiskState()
