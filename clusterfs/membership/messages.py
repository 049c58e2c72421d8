"""Membership messages between nodes: typed msgspec structs, tagged, msgpack.

Every message but the join/leave requests carries `epoch`: the epoch of the
sender's installed view (for Prepare/Accept: the view whose successor is being
decided). A receiver acts only on messages of its own epoch; an older epoch
gets the receiver's view back (Install), so a lagging or removed node learns
the news; a newer one gets a Heartbeat back, which makes the sender answer with
its Install. Nothing else is done with a stale message.

  Heartbeat  "I am alive in view `epoch`"; sent every heartbeat interval.
  Prepare    Paxos phase 1 for the successor of view `epoch` (ballot).
  Promise    the acceptor's answer, with the value it accepted, if any.
  Accept     Paxos phase 2: please accept `view` at `ballot`.
  Accepted   the acceptor accepted `ballot`.
  Reject     the acceptor has promised a higher ballot (`promised`).
  Install    `view` was chosen; install it (also the answer to stale epochs).
  Welcome    to an admitted joiner: `view`, which includes it, was chosen.
  JoinRequest  a node asks the leader to be admitted (its applied sequence).
  Leave      a member asks to be removed gracefully.

`decode` raises `ProtocolError` (and nothing else) on garbage.
"""

from __future__ import annotations

import msgspec

from clusterfs.membership.view import View

MAX_MESSAGE_BYTES = 64 * 1024


class ProtocolError(Exception):
    """A peer sent bytes that are not a valid membership message."""


class Ballot(msgspec.Struct, frozen=True, order=True, array_like=True):
    """A proposal number; ordered by round, then proposer name."""

    round: int
    node: str


class Heartbeat(msgspec.Struct, frozen=True, tag="heartbeat"):
    epoch: int
    sender: str


class Prepare(msgspec.Struct, frozen=True, tag="prepare"):
    epoch: int
    sender: str
    ballot: Ballot


class Promise(msgspec.Struct, frozen=True, tag="promise"):
    epoch: int
    sender: str
    ballot: Ballot
    accepted_ballot: Ballot | None = None
    accepted_view: View | None = None


class Accept(msgspec.Struct, frozen=True, tag="accept"):
    epoch: int
    sender: str
    ballot: Ballot
    view: View


class Accepted(msgspec.Struct, frozen=True, tag="accepted"):
    epoch: int
    sender: str
    ballot: Ballot


class Reject(msgspec.Struct, frozen=True, tag="reject"):
    epoch: int
    sender: str
    ballot: Ballot
    promised: Ballot


class Install(msgspec.Struct, frozen=True, tag="install"):
    epoch: int
    sender: str
    view: View


class Welcome(msgspec.Struct, frozen=True, tag="welcome"):
    epoch: int
    sender: str
    view: View


class JoinRequest(msgspec.Struct, frozen=True, tag="join-request"):
    """`node`, reachable at `address`, asks to join; it has applied up to `applied_seq`
    and knew of views up to `known_epoch` when it started asking."""

    node: str
    address: str
    applied_seq: int = 0
    known_epoch: int = 0


class Leave(msgspec.Struct, frozen=True, tag="leave"):
    """`node` asks to leave the cluster gracefully."""

    node: str


PaxosMessage = Prepare | Promise | Accept | Accepted | Reject
EpochMessage = Heartbeat | PaxosMessage | Install | Welcome
Message = EpochMessage | JoinRequest | Leave

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """The wire form (msgpack) of a message."""
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """A message from its wire form; raises ProtocolError on anything invalid."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as error:
        raise ProtocolError(f"invalid membership message: {error}") from error
