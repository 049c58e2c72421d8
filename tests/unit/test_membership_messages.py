"""Membership wire messages: round trips, and one ProtocolError for any garbage."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterfs.membership.messages import (
    MAX_MESSAGE_BYTES,
    Accept,
    Accepted,
    Ballot,
    Heartbeat,
    Install,
    JoinRequest,
    Leave,
    Message,
    Prepare,
    Promise,
    ProtocolError,
    Reject,
    Welcome,
    decode,
    encode,
)
from clusterfs.membership.view import View

VIEW = View(3, ("a", "b", "c"), "b")
BALLOT = Ballot(4, "a")
EXAMPLES: list[Message] = [
    Heartbeat(2, "a"),
    Prepare(2, "a", BALLOT),
    Promise(2, "b", BALLOT),
    Promise(2, "b", BALLOT, Ballot(1, "c"), VIEW),
    Accept(2, "a", BALLOT, VIEW),
    Accepted(2, "c", BALLOT),
    Reject(2, "c", BALLOT, Ballot(9, "b")),
    Install(3, "a", VIEW),
    Welcome(3, "a", VIEW),
    JoinRequest("d", "10.0.0.4:7000", 17),
    JoinRequest("d", "10.0.0.4:7000", 17, 12),
    Leave("c"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Message) -> None:
    assert decode(encode(message)) == message


def test_ballots_order_by_round_then_node() -> None:
    assert Ballot(1, "z") < Ballot(2, "a") < Ballot(2, "b")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"garbage",
        msgspec.msgpack.encode({"type": "nonsense", "epoch": 1}),
        msgspec.msgpack.encode({"type": "heartbeat", "epoch": "one", "sender": "a"}),
        msgspec.msgpack.encode({"type": "heartbeat", "sender": "a"}),
        msgspec.msgpack.encode(
            {"type": "install", "epoch": 2, "sender": "a",
             "view": {"epoch": 2, "members": ["b", "a"], "leader": "a"}}
        ),
        msgspec.msgpack.encode(
            {"type": "install", "epoch": 2, "sender": "a",
             "view": {"epoch": 2, "members": ["a"], "leader": "z"}}
        ),
        msgspec.msgpack.encode(
            {"type": "install", "epoch": 2, "sender": "a",
             "view": {"epoch": 2, "members": [], "leader": "a"}}
        ),
        msgspec.msgpack.encode({"type": "prepare", "epoch": 1, "sender": "a", "ballot": [1]}),
        msgspec.msgpack.encode([1, 2, 3]),
    ],
)
def test_garbage_raises_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data)


def test_truncated_messages_raise_protocol_error() -> None:
    data = encode(EXAMPLES[4])
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            decode(data[:cut])


def test_oversized_message_is_refused_before_decoding() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(b"\x00" * (MAX_MESSAGE_BYTES + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([encode(m) for m in EXAMPLES]), st.data())
def test_mutated_messages_decode_or_raise_protocol_error(data: bytes, draw: st.DataObject) -> None:
    index = draw.draw(st.integers(0, len(data) - 1))
    byte = draw.draw(st.integers(0, 255))
    mutated = data[:index] + bytes([byte]) + data[index + 1 :]
    with contextlib.suppress(ProtocolError):
        decode(mutated)
