"""Snapshots of a replica: a consistent copy made by one node, installed by another, on real
LMDB stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterfs import records
from clusterfs.namespace import apply, initialise
from clusterfs.store import CLUSTER_ID, SnapshotError, Store
from clusterfs.txn.driver import APPLIED_SEQ, valid_snapshot_token
from clusterfs.txn.messages import Batch, Entry, decode_batch, encode_batch

CLUSTER = b"cluster-a"


def make(name: bytes) -> records.MakeNode:
    return records.MakeNode(1, name, 0o100644, 0, 0, 0, 0)


def new_store(path: Path) -> Store:
    store = Store(path, durable=False)
    with store.write() as view:
        view.put_meta(CLUSTER_ID, CLUSTER)
        initialise(view, 0, 0, 0)
    return store


def commit(store: Store, first_seq: int, names: list[bytes]) -> None:
    """What the commit driver does for one batch: apply, count, keep it in the log."""
    entries = tuple(Entry("n1", first_seq + i, make(n)) for i, n in enumerate(names))
    with store.write(flush=False) as view:
        for name in names:
            apply(view, make(name))
        view.set_counter(APPLIED_SEQ, first_seq + len(names) - 1)
        view.append_log(first_seq, encode_batch(Batch(2, first_seq, entries)), 100)


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Store]:
    store = new_store(tmp_path / "source")
    for first_seq in range(1, 300, 3):
        commit(store, first_seq, [b"f%d" % (first_seq + i) for i in range(3)])
    with store.write() as view:
        view.put_meta(b"view", b"the source's view")
    yield store
    store.close()


@pytest.fixture
def laggard(tmp_path: Path) -> Iterator[Store]:
    store = new_store(tmp_path / "laggard")
    commit(store, 1, [b"f1", b"f2", b"f3"])
    with store.write() as view:
        view.put_meta(b"view", b"the laggard's view")
        view.put_meta(b"acceptor", b"the laggard's promises")
        view.put_prepared(4, b"an old prepared batch")
        view.put_prepared(400, b"a prepared batch after the snapshot")
    yield store
    store.close()


def test_installing_a_snapshot_makes_the_replicas_equal(source: Store, laggard: Store,
                                                        tmp_path: Path) -> None:
    assert source.digest() != laggard.digest()
    copy_seq = source.copy_snapshot(tmp_path / "snap")
    assert copy_seq == 300
    commit(source, 301, [b"after the copy"])  # not in the snapshot
    reports: list[tuple[int, int]] = []
    applied_seq, log = laggard.install_snapshot(tmp_path / "snap", CLUSTER,
                                                lambda done, total: reports.append((done, total)))
    assert applied_seq == 300
    assert [decode_batch(raw).first_seq for raw in log] == list(range(1, 300, 3))
    with laggard.read() as view:
        assert view.get_meta(b"view") == b"the laggard's view"  # its own, not the source's
        assert view.get_meta(b"acceptor") == b"the laggard's promises"
        assert view.get_meta(CLUSTER_ID) == CLUSTER
        assert view.prepared() == [b"a prepared batch after the snapshot"]
        assert view.get_counter(APPLIED_SEQ) == 300
        assert view.lookup(1, b"f300") is not None
        assert view.lookup(1, b"after the copy") is None
    commit(laggard, 301, [b"after the copy"])
    assert laggard.digest() == source.digest()
    assert reports and reports[-1][0] == reports[-1][1]


def test_a_snapshot_of_another_cluster_is_refused_and_changes_nothing(
        source: Store, laggard: Store, tmp_path: Path) -> None:
    source.copy_snapshot(tmp_path / "snap")
    before = laggard.digest()
    with pytest.raises(SnapshotError, match="not a replica of this cluster"):
        laggard.install_snapshot(tmp_path / "snap", b"cluster-b")
    assert laggard.digest() == before


def test_a_snapshot_is_never_written_over_an_existing_one(source: Store, tmp_path: Path) -> None:
    (tmp_path / "snap").mkdir()
    with pytest.raises(FileExistsError):
        source.copy_snapshot(tmp_path / "snap")


@pytest.mark.parametrize(("token", "valid"), [
    ("n3-0123abcd", True), ("a", True), ("n1.x_y-z", True),
    ("..", False), (".", False), ("", False), ("../x", False), ("a/b", False),
    ("-rf", False), ("x" * 101, False), ("n3\n", False),
])
def test_only_plain_names_are_snapshot_tokens(token: str, valid: bool) -> None:
    """The asker removes the directory a token names: it must stay in the snapshot area."""
    assert valid_snapshot_token(token) is valid
