"""Sessions routed by lb with real node processes: 200 clients spread over 3 nodes as the
Maglev table says, a reconnecting client lands where its session is, and a node added
while 200 sessions are open moves none of them while new sessions reach it."""

from __future__ import annotations

import resource
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import trio

from clusterfs.client import Client
from clusterfs.credentials import Credentials
from lb.hashing import AffinityMode, affinity_key, key_bucket
from lb.table import DEFAULT_TABLE_SIZE, table_for
from tests.cluster.conftest import Cluster, addresses_of, credentials_of

pytestmark = pytest.mark.mount

CLIENTS = 200
# 200 sessions over 3 nodes at random: the fullest node holds about 1.1x the mean; the
# lb issue measured the table's spread as good as random (docs/benchmarks.md, lb).
MAX_OVER_MEAN = 1.25


def owner(client_id: str, members: list[str]) -> str:
    """The node lb's rules give a fresh client id: its bucket's owner in the table."""
    key = affinity_key(AffinityMode.CLIENT_ID, client_id, "")
    table = table_for(tuple(sorted(members)), DEFAULT_TABLE_SIZE)
    return table.owners()[key_bucket(key, DEFAULT_TABLE_SIZE)]


class Fleet:
    """Many clients, each held open in its own task until `release` is set."""

    def __init__(self, cluster: Cluster, credentials: Credentials) -> None:
        self.addresses = addresses_of(cluster)
        self.credentials = credentials
        self.clients: dict[str, Client] = {}
        self.release = trio.Event()

    async def open(self, nursery: trio.Nursery, client_ids: list[str]) -> None:
        async with trio.open_nursery() as opening:
            for client_id in client_ids:
                await trio.lowlevel.checkpoint()
                opening.start_soon(nursery.start, self._hold, client_id)

    async def _hold(self, client_id: str, *, task_status: trio.TaskStatus[None]) -> None:
        async with Client(self.addresses, self.credentials, client_id) as client:
            self.clients[client_id] = client
            task_status.started()
            await self.release.wait()

    def nodes(self, client_ids: list[str]) -> dict[str, str]:
        return {cid: self.node_of(cid) for cid in client_ids}

    def node_of(self, client_id: str) -> str:
        session = self.clients[client_id].session
        assert session is not None, f"{client_id} has no session"
        return session.node


def _check_spread(placed: dict[str, str], members: list[str]) -> Counter[str]:
    wrong = {cid: (node, owner(cid, members)) for cid, node in placed.items()
             if node != owner(cid, members)}
    assert not wrong, f"sessions not on their bucket's owner: {list(wrong.items())[:5]}"
    counts = Counter(placed.values())
    mean = len(placed) / len(members)
    assert set(counts) == set(members), counts
    assert max(counts.values()) / mean <= MAX_OVER_MEAN, counts
    return counts


def _sessions_by_node(cluster: Cluster) -> dict[str, int]:
    return {entry["name"]: entry["sessions"] for entry in cluster.status(0)["nodes"]}


@pytest.fixture
def _many_files() -> Iterator[None]:
    """400 clients hold a connection and a few sockets each per node: more descriptors
    than a default soft limit of 1,024 allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("_many_files")
async def test_sessions_spread_stick_and_stay_when_a_node_is_added(
        new_cluster: Callable[..., Cluster]) -> None:
    cluster = new_cluster(4, start=False)
    cluster.format()
    for i in range(3):
        cluster.start_node(i)
    fleet = Fleet(cluster, credentials_of(cluster))
    first = [f"host-{i:03d}" for i in range(CLIENTS)]
    async with trio.open_nursery() as nursery:
        await fleet.open(nursery, first)
        placed = fleet.nodes(first)
        counts = _check_spread(placed, ["n1", "n2", "n3"])
        assert _sessions_by_node(cluster) == dict(counts)

        # A client that comes back with its id (a restarted VM host) while its session
        # lives lands on the node that holds it.
        for client_id in first[:20]:
            async with Client(fleet.addresses, fleet.credentials, client_id) as again:
                assert again.session is not None
                assert again.session.node == placed[client_id], client_id

        # Every session does some work: the calls go to its own node.
        async with trio.open_nursery() as work:
            for client_id in first:
                work.start_soon(fleet.clients[client_id].mkdir, f"/{client_id}")

        await trio.to_thread.run_sync(cluster.start_node, 3)  # n4 joins
        await _wait_members(fleet.clients[first[0]], 4)
        async with trio.open_nursery() as work:
            for client_id in first:
                work.start_soon(fleet.clients[client_id].stat, f"/{client_id}")
        assert fleet.nodes(first) == placed, "a session moved although its node stayed"
        assert all(fleet.clients[cid].reroutes == 0 for cid in first)

        fleet.addresses = addresses_of(cluster)
        second = [f"new-host-{i:03d}" for i in range(CLIENTS)]
        await fleet.open(nursery, second)
        new_placed = fleet.nodes(second)
        assert Counter(new_placed.values())["n4"] > 0, Counter(new_placed.values())
        mismatched = [cid for cid, node in new_placed.items()
                      if node != owner(cid, ["n1", "n2", "n3", "n4"])]
        assert not mismatched, f"new sessions not on their owner: {mismatched[:5]}"
        fleet.release.set()
    for i in range(4):
        assert (cluster.mnt(i) / first[-1]).is_dir()
    assert all(rc == 0 for rc in cluster.stop())


async def _wait_members(client: Client, count: int) -> None:
    """Until `client` has been told of `count` members (the nodes push the change)."""
    with trio.fail_after(30):
        while len(client._addresses) < count:
            await trio.sleep(0.05)
