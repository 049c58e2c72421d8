"""The commit protocol's wire format: round trips, and garbage raising ProtocolError only."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterfs import records
from clusterfs.txn import messages as m

RECORD = records.MakeNode(1, b"name", 0o100644, 0, 0, 0, 5)
BATCH = m.Batch(3, 10, (m.Entry("n1", 7, RECORD), m.Entry("n2", 1, records.Unlink(1, b"x", 6))))
SAMPLES: list[m.Message] = [
    m.Forward(3, 7, RECORD, 5),
    m.Vote(3, 10, "n1", False, "disk full"),
    m.Ack(3, "n1", 11),
    m.Report(3, "n1", 9, (BATCH,)),
    m.Refused(3, 7, 17),
    m.Prepare(3, BATCH),
    m.Decide(3, 10, True),
    m.Done(3, 11),
    m.Survey(3),
    m.CatchUp(3, 11, "n2"),
    m.Ready(3, 11),
    m.FetchLog(3, 10),
    m.LogEntries(3, (BATCH,), False),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda msg: type(msg).__name__)
def test_every_message_round_trips(message: m.Message) -> None:
    frame = m.encode(message)
    assert frame[0] == m.PROTOCOL_VERSION
    assert m.decode(frame) == message


def test_batch_covers_one_sequence_number_per_record() -> None:
    assert (BATCH.first_seq, BATCH.last_seq) == (10, 11)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda msg: type(msg).__name__)
def test_every_truncation_is_a_protocol_error(message: m.Message) -> None:
    frame = m.encode(message)
    for size in range(len(frame)):
        with pytest.raises(m.ProtocolError):
            m.decode(frame[:size])


def test_other_version_is_refused() -> None:
    frame = m.encode(m.Survey(1))
    with pytest.raises(m.ProtocolError, match="version"):
        m.decode(bytes([m.PROTOCOL_VERSION + 1]) + frame[1:])


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(m.ProtocolError):
        m.decode(m.encode(m.Survey(1)) + b"\x00")


def test_a_record_of_the_wrong_type_is_refused() -> None:
    frame = m.encode(m.Done(1, 2)).replace(b"Done", b"Ack\x00")
    with pytest.raises(m.ProtocolError):
        m.decode(frame)


def test_non_bytes_input_is_a_protocol_error() -> None:
    with pytest.raises(m.ProtocolError):
        m.decode("text")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_protocol_error_only(garbage: bytes) -> None:
    for frame in (garbage, bytes([m.PROTOCOL_VERSION]) + garbage):
        try:
            decoded = m.decode(frame)
        except m.ProtocolError:
            continue
        assert isinstance(decoded, m.Message)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SAMPLES), st.integers(0, 200), st.integers(0, 255))
def test_corrupted_frames_raise_protocol_error_only(message: m.Message, position: int,
                                                    value: int) -> None:
    frame = bytearray(m.encode(message))
    frame[position % len(frame)] = value
    with contextlib.suppress(m.ProtocolError):
        m.decode(bytes(frame))
