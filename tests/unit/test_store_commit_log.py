"""The replica's commit log (committed and prepared batches) and its transactions, on a real
LMDB store, and the participant a restarted node restores from it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterfs import records
from clusterfs.store import Store
from clusterfs.txn.driver import APPLIED_SEQ, restore_participant
from clusterfs.txn.messages import Batch, Entry, decode_batch, encode_batch


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "r")
    yield s
    s.close()


def blob(seq: int) -> bytes:
    return b"batch %d" % seq


def make(name: bytes) -> records.MakeNode:
    return records.MakeNode(1, name, 0o100644, 0, 0, 0, 0)


def batch(first_seq: int, count: int, epoch: int = 2, origin: str = "n1") -> Batch:
    entries = tuple(Entry(origin, first_seq + i, make(b"f%d" % (first_seq + i)))
                    for i in range(count))
    return Batch(epoch, first_seq, entries)


# -- the committed log --------------------------------------------------------------------

def test_an_empty_log_has_an_empty_tail(store: Store) -> None:
    with store.read() as view:
        assert view.log_tail(5) == []
        assert view.prepared() == []


def test_append_log_keeps_only_the_last_batches(store: Store) -> None:
    for seq in range(1, 8):
        with store.write() as view:
            view.append_log(seq, blob(seq), keep_batches=3)
    with store.read() as view:
        assert view.log_tail(100) == [blob(5), blob(6), blob(7)]


def test_append_log_within_one_transaction_trims_too(store: Store) -> None:
    with store.write() as view:
        for seq in range(10, 20):
            view.append_log(seq, blob(seq), keep_batches=4)
        assert view.log_tail(100) == [blob(s) for s in range(16, 20)]


def test_log_tail_is_the_last_count_oldest_first(store: Store) -> None:
    seqs = [1, 2, 255, 256, 65_536, 2**40]  # numeric order, not the order of decimal text
    with store.write() as view:
        for seq in seqs:
            view.append_log(seq, blob(seq), keep_batches=100)
    with store.read() as view:
        assert view.log_tail(1) == [blob(2**40)]
        assert view.log_tail(3) == [blob(256), blob(65_536), blob(2**40)]
        assert view.log_tail(len(seqs)) == [blob(s) for s in seqs]
        assert view.log_tail(1000) == [blob(s) for s in seqs]


def test_log_tail_of_zero_is_empty(store: Store) -> None:
    with store.write() as view:
        view.append_log(1, blob(1), keep_batches=10)
        view.append_log(2, blob(2), keep_batches=10)
    with store.read() as view:
        assert view.log_tail(0) == []


def test_append_log_of_the_same_first_seq_replaces_it(store: Store) -> None:
    with store.write() as view:
        view.append_log(1, b"old", keep_batches=10)
        view.append_log(1, b"new", keep_batches=10)
        assert view.log_tail(10) == [b"new"]


# -- the prepared batches -----------------------------------------------------------------

def test_prepared_batches_are_listed_in_sequence_order(store: Store) -> None:
    with store.write() as view:
        view.put_prepared(300, blob(300))
    with store.write() as view:
        view.put_prepared(1, blob(1))  # replaces 300: everything from 1 on goes
    with store.read() as view:
        assert view.prepared() == [blob(1)]
    with store.write() as view:
        view.put_prepared(2, blob(2))
        view.put_prepared(256, blob(256))
    with store.read() as view:
        assert view.prepared() == [blob(1), blob(2), blob(256)]


def test_put_prepared_replaces_every_batch_from_its_first_seq_on(store: Store) -> None:
    with store.write() as view:
        for seq in (1, 5, 9, 13):
            view.put_prepared(seq, blob(seq))
    with store.write() as view:
        view.put_prepared(5, b"replacement")  # a new leader re-proposed from 5
    with store.read() as view:
        assert view.prepared() == [blob(1), b"replacement"]


def test_put_prepared_between_batches_drops_the_later_ones(store: Store) -> None:
    with store.write() as view:
        for seq in (1, 5, 9):
            view.put_prepared(seq, blob(seq))
        view.put_prepared(7, blob(7))
        assert view.prepared() == [blob(1), blob(5), blob(7)]


def test_delete_prepared_removes_one_batch(store: Store) -> None:
    with store.write() as view:
        for seq in (1, 5, 9):
            view.put_prepared(seq, blob(seq))
    with store.write() as view:
        view.delete_prepared(5)
        view.delete_prepared(42)  # absent: nothing happens
    with store.read() as view:
        assert view.prepared() == [blob(1), blob(9)]


@pytest.mark.parametrize(("first_seq", "left"), [
    (0, []), (1, []), (2, [1]), (5, [1]), (6, [1, 5]), (9, [1, 5]), (10, [1, 5, 9]),
])
def test_delete_prepared_from(store: Store, first_seq: int, left: list[int]) -> None:
    with store.write() as view:
        for seq in (1, 5, 9):
            view.put_prepared(seq, blob(seq))
    with store.write() as view:
        view.delete_prepared_from(first_seq)
    with store.read() as view:
        assert view.prepared() == [blob(s) for s in left]


def test_delete_prepared_from_on_an_empty_table(store: Store) -> None:
    with store.write() as view:
        view.delete_prepared_from(1)
        assert view.prepared() == []


def test_the_log_and_the_prepared_batches_are_separate(store: Store) -> None:
    with store.write() as view:
        view.append_log(1, b"committed", keep_batches=10)
        view.put_prepared(1, b"prepared")
        view.delete_prepared_from(0)
    with store.read() as view:
        assert view.log_tail(10) == [b"committed"]
        assert view.prepared() == []


# -- transactions ---------------------------------------------------------------------------

def test_write_without_flush_commits(store: Store) -> None:
    with store.write(flush=False) as view:
        view.append_log(3, blob(3), keep_batches=10)
        view.put_prepared(4, blob(4))
        view.set_counter(APPLIED_SEQ, 3)
    with store.read() as view:
        assert view.log_tail(10) == [blob(3)]
        assert view.prepared() == [blob(4)]
        assert view.get_counter(APPLIED_SEQ) == 3


def test_committed_batches_survive_reopening(tmp_path: Path) -> None:
    first = Store(tmp_path / "r")
    with first.write(flush=False) as view:
        view.append_log(1, blob(1), keep_batches=10)
    with first.write() as view:
        view.put_prepared(2, blob(2))
    first.close()
    second = Store(tmp_path / "r")
    try:
        with second.read() as view:
            assert view.log_tail(10) == [blob(1)]
            assert view.prepared() == [blob(2)]
    finally:
        second.close()


def test_a_write_that_raises_is_rolled_back(store: Store) -> None:
    with pytest.raises(RuntimeError), store.write() as view:
        view.put_prepared(1, blob(1))
        raise RuntimeError("boom")
    with store.read() as view:
        assert view.prepared() == []


def test_scratch_always_rolls_back(store: Store) -> None:
    with store.write() as view:
        view.append_log(1, blob(1), keep_batches=10)
    with store.scratch() as view:
        view.append_log(2, blob(2), keep_batches=1)  # trims 1 away, inside the scratch only
        view.put_prepared(3, blob(3))
        assert view.log_tail(10) == [blob(2)]  # the scratch sees its own writes
    with pytest.raises(RuntimeError), store.scratch() as view:
        view.put_prepared(4, blob(4))
        raise RuntimeError("boom")
    with store.read() as view:
        assert view.log_tail(10) == [blob(1)]
        assert view.prepared() == []


# -- restoring a participant ------------------------------------------------------------------

def test_restore_participant_of_an_empty_replica(store: Store) -> None:
    participant = restore_participant("n1", store)
    assert participant.name == "n1"
    assert participant.applied_seq == 0
    assert participant.prepared == {}
    assert list(participant.log.values()) == []


def test_restore_participant_from_the_replica(store: Store) -> None:
    committed = [batch(1, 2), batch(3, 1), batch(4, 3)]  # covers 1 .. 6
    prepared = [batch(7, 2, epoch=3), batch(9, 1, epoch=3)]
    with store.write() as view:
        for b in committed:
            view.append_log(b.first_seq, encode_batch(b), keep_batches=10)
        view.set_counter(APPLIED_SEQ, committed[-1].last_seq)
        for b in prepared:
            view.put_prepared(b.first_seq, encode_batch(b))
    participant = restore_participant("n1", store)
    assert participant.name == "n1"
    assert participant.applied_seq == 6
    assert participant.prepared == {7: prepared[0], 9: prepared[1]}
    assert list(participant.log.items()) == [(b.first_seq, b) for b in committed]
    assert participant.config.log_keep_batches >= len(committed)


def test_encoded_batches_round_trip_through_the_store(store: Store) -> None:
    b = batch(11, 4, epoch=7, origin="n2")
    with store.write() as view:
        view.put_prepared(b.first_seq, encode_batch(b))
        view.append_log(b.first_seq, encode_batch(b), keep_batches=10)
    with store.read() as view:
        assert [decode_batch(raw) for raw in view.prepared()] == [b]
        assert [decode_batch(raw) for raw in view.log_tail(1)] == [b]
