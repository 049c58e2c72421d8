"""Clients survive the loss of their node: kill -9 of the node holding sessions, and a node
that leaves gracefully; the clients re-route, open their files again (by inode: after the
kill the files are also renamed before the clients go on) and finish their work with the
right data."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import pytest
import trio

from clusterfs.client import Client
from clusterfs.credentials import Credentials
from tests.cluster.conftest import Cluster, addresses_of, credentials_of
from tests.util import run_cli

pytestmark = pytest.mark.mount

CLIENTS = 12
CHUNKS = 40
CHUNK_BYTES = 64 << 10
CALL_TIMEOUT_S = 2.0  # short: the clients of a killed node wait out timeouts


def chunk(client_id: str, index: int) -> bytes:
    seed = hashlib.sha256(f"{client_id}/{index}".encode()).digest()
    return seed * (CHUNK_BYTES // len(seed))


class Writer:
    """One client that writes its file chunk by chunk, holding it open throughout."""

    def __init__(self, client_id: str, addresses: list[str], credentials: Credentials
                 ) -> None:
        self.client_id = client_id
        self.client = Client(addresses, credentials, client_id,
                             call_timeout_s=CALL_TIMEOUT_S, route_timeout_s=120)
        self.written = 0
        self.first_node = ""

    async def run(self, halfway: trio.Event, go_on: trio.Event) -> None:
        async with self.client as client:
            assert client.session is not None
            self.first_node = client.session.node
            handle = await client.open(f"/work/{self.client_id}", os.O_RDWR | os.O_CREAT)
            for index in range(CHUNKS):
                if index == CHUNKS // 2:
                    halfway.set()
                    await go_on.wait()
                await client.write(handle, index * CHUNK_BYTES, chunk(self.client_id, index))
                self.written += 1
            await client.fsync(handle)
            data = await client.read(handle, 0, CHUNKS * CHUNK_BYTES)
            assert data == b"".join(chunk(self.client_id, i) for i in range(CHUNKS))
            await client.close(handle)


async def _run_through_a_loss(cluster: Cluster, lose: Callable[[str], None]
                              ) -> tuple[list[Writer], list[Writer]]:
    """Writers pause halfway, the node holding most of them is lost, they go on: all of
    them, and those that were on the lost node."""
    credentials = credentials_of(cluster)
    async with Client(addresses_of(cluster), credentials, "setup") as setup:
        await setup.mkdir("/work")
    writers = [Writer(f"writer-{i:02d}", addresses_of(cluster), credentials)
               for i in range(CLIENTS)]
    halfway = [trio.Event() for _ in writers]
    go_on = trio.Event()
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            for writer, event in zip(writers, halfway, strict=True):
                nursery.start_soon(writer.run, event, go_on)
            for event in halfway:
                await event.wait()
            victim = max({w.first_node for w in writers},
                         key=lambda node: sum(w.first_node == node for w in writers))
            await trio.to_thread.run_sync(lose, victim)
            go_on.set()
    assert all(writer.written == CHUNKS for writer in writers)
    moved = [w for w in writers if w.first_node == victim]
    assert moved and all(w.client.reroutes >= 1 for w in moved)
    assert all(w.client.session is None or w.client.session.node != victim for w in moved)
    return writers, moved


def _check_files(cluster: Cluster, writers: list[Writer], survivor: int, suffix: str = ""
                 ) -> None:
    for writer in writers:
        data = (cluster.mnt(survivor) / "work" / (writer.client_id + suffix)).read_bytes()
        assert data == b"".join(chunk(writer.client_id, i) for i in range(CHUNKS)), \
            writer.client_id


async def test_clients_of_a_killed_node_resume_on_live_nodes(
        new_cluster: Callable[..., Cluster]) -> None:
    cluster = new_cluster(3)
    killed: list[int] = []

    def kill_and_rename(node_name: str) -> None:
        index = [node.name for node in cluster.nodes].index(node_name)
        killed.append(index)
        cluster.kill9(index)
        work = cluster.mnt(next(i for i in range(3) if i not in killed)) / "work"
        for name in os.listdir(work):  # waits until the others have removed the dead node
            os.rename(work / name, work / (name + ".moved"))

    writers, _ = await _run_through_a_loss(cluster, kill_and_rename)
    survivor = next(i for i in range(3) if i not in killed)
    _check_files(cluster, writers, survivor, ".moved")


async def test_clients_of_a_node_that_leaves_move_at_once(
        new_cluster: Callable[..., Cluster]) -> None:
    cluster = new_cluster(3)
    left: list[int] = []

    def leave(node_name: str) -> None:
        index = [node.name for node in cluster.nodes].index(node_name)
        left.append(index)
        node = cluster.nodes[index]
        proc = run_cli("leave", str(node.mountpoint), timeout_s=60)
        assert proc.returncode == 0, proc.stderr
        assert node.wait_exit() == 0

    writers, moved = await _run_through_a_loss(cluster, leave)
    # The node's clients were told (a push), before any of them waited for an answer.
    assert all(w.client.losses == {"pushed": 1} for w in moved), \
        [w.client.losses for w in moved]
    survivor = next(i for i in range(3) if i not in left)
    _check_files(cluster, writers, survivor)
