"""vhdshare in a real 3-node cluster: VM hosts (the `RemoteDisk` API) send SCSI commands
through the tunnel to nodes, which execute them on one VHD in the common block directory.

- two initiators through two different nodes write one dynamic disk at once, and the image
  is consistent afterwards (`vhdshare check`, `qemu-img compare`);
- persistent reservations hold through every node, survive the loss of the node that serves
  the reservation holder (its attachment goes on elsewhere), a reservation command resent
  through another node is not applied twice, and everything survives a whole-cluster
  restart;
- an attachment whose node leaves gracefully moves at once (told by a push).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from clusterfs.credentials import Credentials
from tests.cluster.conftest import Cluster, addresses_of, credentials_of
from tests.util import run_cli
from vhdshare import initiator as cdbs
from vhdshare.host import RemoteDisk, ScsiError
from vhdshare.image import create_image
from vhdshare.reservations import PrOutAction, PrType
from vhdshare.scsi import Status
from vhdshare.tunnel import Direction, TunnelRequest, pack_request, unpack_response

pytestmark = pytest.mark.mount

MIB = 1 << 20
BLOCK_SECTORS = 2 * MIB // 512
WE_RO = PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY
KEY_A, KEY_B = 0xA1, 0xB2


def block_pattern(block: int, piece: int) -> bytes:
    return bytes([block % 250 + 1, piece + 1]) * (MIB // 2)


@asynccontextmanager
async def attached_on(cluster: Cluster, credentials: Credentials, path: str, initiator: str,
                      node: str | None = None, avoid: str | None = None
                      ) -> AsyncIterator[RemoteDisk]:
    """`initiator`'s attachment of `path`, with a session id that lb routes to `node` (or
    to any node but `avoid`): the session id picks the node, the initiator is the host's."""
    for attempt in range(200):
        async with RemoteDisk.attach(addresses_of(cluster), credentials, path, initiator,
                                     session_id=f"{initiator}-{attempt}") as disk:
            if (node is None or disk.node == node) and (avoid is None or disk.node != avoid):
                yield disk
                return
    raise AssertionError(f"no session id of 200 was routed to {node or 'another node'}")


def node_names(cluster: Cluster) -> list[str]:
    return [node.name for node in cluster.nodes]


async def test_two_initiators_through_two_nodes_write_one_dynamic_disk(
        shared_cluster: Cluster, croot: str, credentials: Credentials, tmp_path: Path) -> None:
    blocks = 24
    create_image(shared_cluster.mnt(0) / croot / "shared.vhd", blocks * 2 * MIB, "dynamic")
    path = f"/{croot}/shared.vhd"
    async with attached_on(shared_cluster, credentials, path, "host-a") as a, \
            attached_on(shared_cluster, credentials, path, "host-b", avoid=a.node) as b:
        assert a.node != b.node

        async def write_blocks(disk: RemoteDisk, first: int) -> None:
            # Interleaved blocks: both hosts allocate blocks of the same disk at once.
            for block in range(first, blocks, 2):
                for piece in range(2):
                    await disk.write(block * BLOCK_SECTORS + piece * BLOCK_SECTORS // 2,
                                     block_pattern(block, piece))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_blocks, a, 0)
            nursery.start_soon(write_blocks, b, 1)
        await a.flush()
        await b.flush()
        for reader in (a, b):  # each node reads what the other wrote
            for block in range(blocks):
                data = await reader.read(block * BLOCK_SECTORS, BLOCK_SECTORS)
                assert data == block_pattern(block, 0) + block_pattern(block, 1), \
                    f"block {block} through {reader.node}"
    for i in range(len(shared_cluster)):  # and so does every mount
        image = shared_cluster.mnt(i) / croot / "shared.vhd"
        check = subprocess.run(["vhdshare", "check", str(image)], capture_output=True,
                               text=True, env={**os.environ, "PATH": _venv_path()})
        assert check.returncode == 0, check.stdout + check.stderr
    expected = tmp_path / "expected.raw"
    with expected.open("wb") as out:
        for block in range(blocks):
            out.write(block_pattern(block, 0) + block_pattern(block, 1))
    compare = subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw",
                              str(shared_cluster.mnt(2) / croot / "shared.vhd"),
                              str(expected)], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def _venv_path() -> str:
    return f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"


async def write_status(disk: RemoteDisk, lba: int = 0) -> Status:
    """The status of a one-sector write, after the unit attentions a driver retries."""
    try:
        await disk.write(lba, bytes(512))
    except ScsiError as exc:
        return Status(exc.status)
    return Status.GOOD


async def test_reservations_through_every_node_failover_and_restart(
        new_cluster: Callable[..., Cluster]) -> None:
    cluster = new_cluster(3)
    credentials = credentials_of(cluster)
    create_image(cluster.mnt(0) / "fenced.vhd", 16 * MIB, "dynamic")
    path = "/fenced.vhd"
    names = node_names(cluster)
    async with attached_on(cluster, credentials, path, "host-a") as a, \
            attached_on(cluster, credentials, path, "host-b", names[0]) as b0, \
            attached_on(cluster, credentials, path, "host-b", names[1]) as b1, \
            attached_on(cluster, credentials, path, "host-b", names[2]) as b2:
        b_everywhere = [b0, b1, b2]
        await a.register(KEY_A, aptpl=True)
        await a.reserve(KEY_A, WE_RO)
        assert [await write_status(b) for b in b_everywhere] == \
            [Status.RESERVATION_CONFLICT] * 3
        assert await write_status(a) == Status.GOOD

        await b_everywhere[1].register(KEY_B)
        assert [await write_status(b) for b in b_everywhere] == [Status.GOOD] * 3
        keys = await b_everywhere[2].read_keys()
        assert sorted(keys.keys) == [KEY_A, KEY_B]

        await a.preempt(KEY_A, KEY_B, WE_RO)
        assert [await write_status(b) for b in b_everywhere] == \
            [Status.RESERVATION_CONFLICT] * 3
        assert (await b_everywhere[0].read_keys()).keys == [KEY_A]

        # A reservation command resent through another node (as after a failover, when
        # the answer was lost) is answered and not applied again.
        generation = (await a.read_keys()).generation
        packet = pack_request(TunnelRequest(
            1 << 40, "host-a", cdbs.pr_out(PrOutAction.REGISTER),
            Direction.DATA_OUT, 24, cdbs.pr_out_parameters(KEY_A, 0xA2)))
        for disk in b_everywhere:
            reply = unpack_response(await disk.client.tunnel(disk._handle, [packet]))
            assert reply.status == Status.GOOD, disk.node
        keys = await a.read_keys()
        assert (keys.generation, keys.keys) == (generation + 1, [0xA2])

        # The node serving A dies while A writes; A's attachment goes on elsewhere (its
        # commands in flight are sent again there: a pause, no error), reservation intact.
        served_by = a.node
        assert served_by is not None
        written: list[int] = []
        halfway = trio.Event()

        async def keep_writing() -> None:
            for lba in range(64):
                await a.write(lba, bytes([lba + 1]) * 512)
                written.append(lba)
                if lba == 16:
                    halfway.set()
                    await trio.sleep(0.2)  # the kill lands while commands are in flight

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_writing)
            await halfway.wait()
            cluster.kill9(names.index(served_by))
        assert written == list(range(64))
        assert a.node not in (None, served_by)
        assert a.client.reroutes >= 1
        assert await a.read(0, 64) == b"".join(bytes([lba + 1]) * 512 for lba in range(64))
        held = await a.read_reservation()
        assert held.reservation is not None
        assert (held.reservation.key, held.reservation.type) == (0xA2, WE_RO)
        survivors = [b for b in b_everywhere if b.node != served_by]
        assert [await write_status(b) for b in survivors] == \
            [Status.RESERVATION_CONFLICT] * len(survivors)

    # The whole cluster restarted: the reservation (made with APTPL) is still there.
    cluster.kill9()
    cluster.restart_all()
    async with attached_on(cluster, credentials, path, "host-b") as b:
        held = await b.read_reservation()
        assert held.reservation is not None
        assert (held.reservation.key, held.reservation.type) == (0xA2, WE_RO)
        assert (await b.read_keys()).keys == [0xA2]
        assert await write_status(b) == Status.RESERVATION_CONFLICT


async def test_an_attachment_moves_when_its_node_leaves(
        new_cluster: Callable[..., Cluster]) -> None:
    cluster = new_cluster(3)
    credentials = credentials_of(cluster)
    create_image(cluster.mnt(0) / "moving.vhd", 16 * MIB, "dynamic")
    names = node_names(cluster)
    async with attached_on(cluster, credentials, "/moving.vhd", "host-a",
                           avoid=names[0]) as a:
        await a.register(KEY_A)
        await a.reserve(KEY_A, WE_RO)
        served_by = a.node
        assert served_by is not None
        for lba in range(8):
            await a.write(lba, bytes([lba + 1]) * 512)
        leaving = cluster.nodes[names.index(served_by)]
        left = await trio.to_thread.run_sync(
            lambda: run_cli("leave", str(leaving.mountpoint), timeout_s=60))
        assert left.returncode == 0, left.stderr
        assert leaving.wait_exit() == 0
        for lba in range(8, 16):  # the host goes on writing: a pause, no error
            await a.write(lba, bytes([lba + 1]) * 512)
        assert a.node not in (None, served_by)
        assert a.client.losses == {"pushed": 1}  # told by a push, not by a timeout
        assert await a.read(0, 16) == b"".join(bytes([lba + 1]) * 512 for lba in range(16))
        held = await a.read_reservation()
        assert held.reservation is not None and held.reservation.key == KEY_A
