"""The balancer's messages survive the wire and are typed."""

from __future__ import annotations

import msgspec
import pytest

from lb.messages import (
    AffinityAnswer,
    AffinityQuery,
    HolderReport,
    Message,
    SessionAccept,
    SessionBusy,
    SessionClose,
    SessionRequest,
    Settle,
    decode,
    encode,
)

EXAMPLES: list[Message] = [
    SessionRequest("r1", "client-1", "10.0.0.1"),
    SessionClose("n1.1.5"),
    SessionAccept("r1", "n1", "n1.1.5"),
    SessionBusy("r1", "n2", 0.5),
    AffinityQuery(3, "n2", 7, b"c:client-1", 1234),
    AffinityAnswer(3, "n1", 7, b"c:client-1", 1234, mine=True, settled=False),
    HolderReport(3, "n1", [1, 2, 3]),
    Settle(3, "n1", [2]),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    assert decode(encode(message)) == message


def test_tags_tell_messages_apart() -> None:
    assert type(decode(encode(HolderReport(1, "n", [])))) is HolderReport
    assert type(decode(encode(Settle(1, "n", [])))) is Settle


def test_bad_input_is_rejected() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode(b"\xc1")
    with pytest.raises(msgspec.ValidationError):
        decode(msgspec.msgpack.encode({"type": "settle", "epoch": "x", "node": "n",
                                       "buckets": []}))
