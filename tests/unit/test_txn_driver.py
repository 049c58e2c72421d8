"""The commit driver on a real replica (LMDB), fed frames as the transport would feed them:
where a prepared batch is logged, what a member votes when it cannot log it, and that a
message handled at once never overtakes what the loop has still to do."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from clusterfs import records
from clusterfs.namespace import initialise
from clusterfs.store import Store
from clusterfs.store import View as ReplicaView
from clusterfs.txn import driver
from clusterfs.txn.driver import CommitDriver
from clusterfs.txn.messages import (
    Ack,
    AnyMessage,
    Batch,
    Decide,
    Done,
    Entry,
    Forward,
    Prepare,
    Ready,
    Vote,
    decode,
    decode_batch,
    encode,
)
from clusterfs.txn.view import View


def batch(first_seq: int) -> Batch:
    record = records.MakeNode(1, b"f%d" % first_seq, 0o100644, 0, 0, 0, 0)
    return Batch(1, first_seq, (Entry("n0", first_seq, record),))


BATCH = batch(1)


class Follower:
    """Node n1 of the view (n0 leads), with what it sent to its peers."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = Store(tmp_path / "replica")
        with self.store.write() as view:
            initialise(view, 0, 0, 1_000)
        self.sent: list[tuple[str, AnyMessage]] = []
        self.sent_any = trio.Event()
        self.acks_allowed = trio.Event()  # the file system layer's wait before an Ack
        self.acks_allowed.set()
        self.driver = CommitDriver("n1", self.store, self._send, lambda *_: None,
                                   lambda _: None, tmp_path / "snapshots",
                                   before_ack=self._before_ack)

    async def _before_ack(self) -> None:
        await self.acks_allowed.wait()

    def _send(self, to: str, frame: bytes) -> None:
        self.sent.append((to, decode(frame)))
        self.sent_any.set()

    async def answer_to(self, sender: str, message: AnyMessage) -> list[tuple[str, AnyMessage]]:
        self.sent.clear()
        self.sent_any = trio.Event()
        self.driver.on_frame(sender, encode(message))
        with trio.fail_after(5):
            await self.sent_any.wait()
        return self.sent

    def prepared(self) -> list[Batch]:
        with self.store.read() as view:
            return [decode_batch(raw) for raw in view.prepared()]


@pytest.fixture
async def follower(tmp_path: Path) -> AsyncIterator[Follower]:
    node = Follower(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.driver.run)
        node.driver.on_view(View(1, ("n0", "n1"), "n0"))
        await node.answer_to("n0", Ready(1, 0))  # answered with an Ack (all applied)
        yield node
        nursery.cancel_scope.cancel()
    node.store.close()


async def test_a_member_votes_yes_once_the_batch_is_in_its_prepared_log(
        follower: Follower) -> None:
    assert await follower.answer_to("n0", Prepare(1, BATCH)) == [("n0", Vote(1, 1, "n1", True))]
    assert follower.prepared() == [BATCH]


@pytest.mark.allow_error_logs
async def test_a_member_that_cannot_log_votes_no_with_the_reason(
        follower: Follower, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def full_disk(flush: bool = True) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(follower.store, "write", full_disk)
    [(to, vote)] = await follower.answer_to("n0", Prepare(1, BATCH))
    assert to == "n0" and isinstance(vote, Vote)
    assert not vote.yes and "No space left" in vote.reason
    assert "cannot log batch 1 durably" in caplog.text
    monkeypatch.undo()
    assert follower.prepared() == []
    # Asked again, it says no again: it never votes yes for a batch it failed to log.
    [(_, again)] = await follower.answer_to("n0", Prepare(1, BATCH))
    assert isinstance(again, Vote) and not again.yes


async def test_while_the_device_is_slow_batches_are_logged_in_a_worker_thread(
        follower: Follower, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the loop while flushes are quick; after a slow one, in a worker thread (the loop
    keeps serving meanwhile) until one is quick again."""
    # A real flush takes well under a millisecond on a quiet disk, but can take more than
    # the 2 ms the node allows on a busy one (this test ran beside others): a wide margin.
    monkeypatch.setattr(driver, "INLINE_FLUSH_MAX_S", 0.5)
    real_write = follower.store.write
    writers: list[int] = []
    slow = {2}  # the second flush takes too long

    @contextmanager
    def write(flush: bool = True) -> Iterator[ReplicaView]:
        writers.append(threading.get_ident())
        with real_write(flush) as view:
            yield view
        if len(writers) in slow:
            time.sleep(0.6)

    monkeypatch.setattr(follower.store, "write", write)
    for first_seq in (1, 2, 3, 4):
        answer = await follower.answer_to("n0", Prepare(1, batch(first_seq)))
        assert answer == [("n0", Vote(1, first_seq, "n1", True))]
    loop = threading.get_ident()
    assert [ident == loop for ident in writers] == [True, True, False, True]


async def test_a_message_waits_behind_an_apply_that_is_under_way(follower: Follower) -> None:
    """Messages are handled at once only while the loop waits with nothing to do: a Done
    that arrives while this node's apply of the batch waits (here, for the kernel to drop
    what it changed) must not answer the caller before the apply is through."""
    results: list[object] = []

    async def create() -> None:
        results.append(await follower.driver.submit(records.MakeNode(
            1, b"mine", 0o100644, 0, 0, 0, 0)))

    def forwards() -> list[Forward]:
        return [message for _, message in follower.sent if isinstance(message, Forward)]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(create)
        with trio.fail_after(5):
            while not forwards():
                await trio.sleep(0.001)
        [forward] = forwards()
        mine = Batch(1, 1, (Entry("n1", forward.request_id, forward.record),))
        await follower.answer_to("n0", Prepare(1, mine))
        follower.acks_allowed = trio.Event()  # the kernel is slow to drop its entries
        follower.sent.clear()
        follower.driver.on_frame("n0", encode(Decide(1, 1, True)))
        await trio.sleep(0.05)
        follower.driver.on_frame("n0", encode(Done(1, 1)))
        await trio.sleep(0.05)
        assert results == [] and follower.sent == []  # neither acked nor answered yet
        follower.acks_allowed.set()
        with trio.fail_after(5):
            while not results:
                await trio.sleep(0.001)
    assert follower.sent == [("n0", Ack(1, "n1", 1))]
    assert len(results) == 1
