"""The balancer's messages: typed records, tagged for msgspec.

Client <-> nodes:
  SessionRequest  a client asks for a session; it reaches every node.
  SessionAccept   the one node that takes the session answers with it.
  SessionBusy     the owner could not decide in time ("busy, retry").
  SessionClose    the client ends a session; the node's affinity lingers.

Node <-> node, only while membership changes leave buckets unsettled:
  AffinityQuery   the owner of a moved key asks a node that may hold it.
  AffinityAnswer  "mine" (I answer the client) or "not mine"; also says
                  whether the answering node is settled for the bucket.
  HolderReport    sent once per view change: the buckets a node does not own
                  but still holds affinity in; it is settled for all others.
  Settle          later: buckets for which the node's last affinity ended.

Every node-to-node message carries the epoch of its sender's view; reports
and settles only apply within the epoch they were made in.
"""

from __future__ import annotations

import msgspec


class SessionRequest(msgspec.Struct, frozen=True, tag="session-request"):
    """A client asks for a session. `request_id` is unique per attempt."""

    request_id: str
    client_id: str
    client_addr: str


class SessionClose(msgspec.Struct, frozen=True, tag="session-close"):
    """A client closes a session it holds on the receiving node."""

    session_id: str


class SessionAccept(msgspec.Struct, frozen=True, tag="session-accept"):
    """The node `node` holds the session `session_id` for request `request_id`."""

    request_id: str
    node: str
    session_id: str


class SessionBusy(msgspec.Struct, frozen=True, tag="session-busy"):
    """The owner could not learn in time who holds the key; retry later."""

    request_id: str
    node: str
    retry_after_s: float


class AffinityQuery(msgspec.Struct, frozen=True, tag="affinity-query"):
    """Does the receiver hold affinity for `key`? Sent by the owner of `bucket`."""

    epoch: int
    asker: str
    query_id: int
    key: bytes
    bucket: int


class AffinityAnswer(msgspec.Struct, frozen=True, tag="affinity-answer"):
    """The answer to query `query_id` from `holder`."""

    epoch: int
    holder: str
    query_id: int
    key: bytes
    bucket: int
    mine: bool
    settled: bool


class HolderReport(msgspec.Struct, frozen=True, tag="holder-report"):
    """In view `epoch`, `node` holds affinity only in `buckets` (among those it does not own)."""

    epoch: int
    node: str
    buckets: list[int]


class Settle(msgspec.Struct, frozen=True, tag="settle"):
    """In view `epoch`, `node` no longer holds affinity in `buckets`."""

    epoch: int
    node: str
    buckets: list[int]


ClientMessage = SessionRequest | SessionClose
ClientReply = SessionAccept | SessionBusy
PeerMessage = AffinityQuery | AffinityAnswer | HolderReport | Settle
Message = ClientMessage | ClientReply | PeerMessage

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """The wire form (msgpack) of a message."""
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """A message from its wire form; raises msgspec.DecodeError or ValidationError."""
    return _decoder.decode(data)
