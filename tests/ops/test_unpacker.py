"""The node's unpacker behind the protocol's TUNNEL call, against a temporary replica and
block directory (the local committer). Two `Unpacker`s on one file system stand for two nodes:
the reservation state they share is the replica's, as on every member of a cluster."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import trio

from clusterfs.namespace import NamespaceError
from clusterfs.protocol import messages as m
from clusterfs.protocol.ops import FileOps
from tests.ops.conftest import Rig
from vhdshare import directio, diskstate
from vhdshare import initiator as cdbs
from vhdshare.check import check_image
from vhdshare.dynamic import DynamicImage
from vhdshare.image import FixedImage, create_image
from vhdshare.reservations import PrInAction, PrOutAction, PrType
from vhdshare.scsi import SenseKey, Status
from vhdshare.tunnel import (
    Direction,
    TunnelRequest,
    TunnelResponse,
    pack_request,
    unpack_response,
)
from vhdshare.unpacker import Unpacker

MIB = 1 << 20


class Node:
    """One node's FileOps with its own unpacker, and a session's open disk."""

    def __init__(self, rig: Rig) -> None:
        self.unpacker = Unpacker(rig.fs)
        self.ops = FileOps(rig.fs, self.unpacker)
        self.handles: set[int] = set()
        self.handle = 0

    async def open(self, path: str) -> None:
        opened = await self.ops.run(m.Open(path, os.O_RDWR), self.handles)
        assert isinstance(opened, m.Handle)
        self.handle = opened.handle

    async def send(self, request: TunnelRequest) -> TunnelResponse:
        reply = await self.ops.run(m.Tunnel(self.handle, memoryview(pack_request(request))),
                                   self.handles)
        assert isinstance(reply, m.DataPieces)
        return unpack_response(b"".join(reply.pieces))

    def close(self) -> None:
        self.ops.close_all(self.handles)
        self.unpacker.close()


def command(request_id: int, initiator: str, cdb: bytes, data_out: bytes = b"",
            data_in: int = 0) -> TunnelRequest:
    direction = Direction.DATA_OUT if data_out else (
        Direction.DATA_IN if data_in else Direction.NONE)
    return TunnelRequest(request_id, initiator, cdb, direction,
                         len(data_out) or data_in, data_out)


def register(request_id: int, initiator: str, key: int) -> TunnelRequest:
    return command(request_id, initiator, cdbs.pr_out(PrOutAction.REGISTER),
                   cdbs.pr_out_parameters(0, key))


def read_keys(request_id: int, initiator: str) -> TunnelRequest:
    return command(request_id, initiator, cdbs.pr_in(PrInAction.READ_KEYS),
                   data_in=cdbs.PR_IN_ALLOCATION_BYTES)


async def make_disk(rig: Rig, tmp_path: Path, name: str = "/disk.vhd",
                    kind: str = "dynamic") -> None:
    """A 16 MiB VHD at `name` in the namespace, written through the file protocol."""
    create_image(tmp_path / "template.vhd", 16 * MIB, kind)
    ops, handles = FileOps(rig.fs), set[int]()
    opened = await ops.run(m.Open(name, os.O_RDWR | os.O_CREAT), handles)
    assert isinstance(opened, m.Handle)
    image = (tmp_path / "template.vhd").read_bytes()
    for offset in range(0, len(image), m.MAX_IO_BYTES):
        await ops.run(m.Write(opened.handle, offset, image[offset : offset + m.MAX_IO_BYTES]),
                      handles)
    ops.close_all(handles)


@pytest.fixture
async def nodes(rig: Rig, tmp_path: Path) -> list[Node]:
    await make_disk(rig, tmp_path)
    pair = [Node(rig), Node(rig)]
    for node in pair:
        await node.open("/disk.vhd")
    yield pair  # type: ignore[misc]
    for node in pair:
        node.close()


async def test_data_written_through_one_node_is_read_through_the_other(nodes: list[Node]
                                                                      ) -> None:
    a, b = nodes
    data = bytes(range(256)) * 2 * 8
    written = await a.send(command(1, "host-a", cdbs.write16(4096, 8), data))
    assert written.status == Status.GOOD
    read = await b.send(command(2, "host-b", cdbs.read16(4096, 8), data_in=8 * 512))
    assert (read.status, read.data_in) == (Status.GOOD, data)
    for node in nodes:  # the block directory here (ext4) takes O_DIRECT: no page cache
        (disk,) = node.unpacker._disks.values()
        assert directio.is_direct(disk.image.fileno())  # type: ignore[attr-defined]


async def test_a_retried_reservation_command_is_applied_once(rig: Rig, nodes: list[Node]
                                                            ) -> None:
    a, b = nodes
    first = await a.send(register(7, "host-a", 0xA1))
    assert first.status == Status.GOOD
    # The same packet again, through this node and through another (a failover): the answer
    # is the one given, and the registration is not applied twice.
    assert (await a.send(register(7, "host-a", 0xA1))).status == Status.GOOD
    assert (await b.send(register(7, "host-a", 0xA1))).status == Status.GOOD
    keys = cdbs.parse_read_keys((await b.send(read_keys(8, "host-a"))).data_in)
    assert (keys.generation, keys.keys) == (1, [0xA1])
    # The same command with a new request id is a new command: registering again with the
    # wrong current key (0) is a RESERVATION CONFLICT, so a duplicate would have shown.
    again = await b.send(register(9, "host-a", 0xA1))
    assert again.status == Status.RESERVATION_CONFLICT
    state = diskstate.decode(rig.fs.disk_state(rig.fs.find(1, b"disk.vhd").ino))
    assert [(c.initiator, c.request_id) for c in state.done] == [("host-a", 7)]


async def test_a_reservation_decided_on_a_stale_state_is_decided_again(rig: Rig,
                                                                       nodes: list[Node]
                                                                       ) -> None:
    a, b = nodes
    real_set = rig.fs.set_disk_state
    raced: list[TunnelResponse] = []

    async def set_after_a_rival(ino: int, expected: bytes, state: bytes) -> None:
        rig.fs.set_disk_state = real_set  # type: ignore[method-assign]
        # node b registers its host between a's read of the state and a's commit
        raced.append(await b.send(register(1, "host-b", 0xB2)))
        await real_set(ino, expected, state)

    rig.fs.set_disk_state = set_after_a_rival  # type: ignore[method-assign]
    try:
        assert (await a.send(register(1, "host-a", 0xA1))).status == Status.GOOD
    finally:
        rig.fs.set_disk_state = real_set  # type: ignore[method-assign]
    assert raced[0].status == Status.GOOD
    keys = cdbs.parse_read_keys((await a.send(read_keys(2, "host-a"))).data_in)
    assert (keys.generation, sorted(keys.keys)) == (2, [0xA1, 0xB2])


async def test_reservations_hold_on_every_node(nodes: list[Node]) -> None:
    a, b = nodes
    assert (await a.send(register(1, "host-a", 0xA1))).status == Status.GOOD
    reserve = command(2, "host-a", cdbs.pr_out(PrOutAction.RESERVE,
                                               PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY),
                      cdbs.pr_out_parameters(0xA1))
    assert (await a.send(reserve)).status == Status.GOOD
    blocked = await b.send(command(1, "host-b", cdbs.write16(0, 1), bytes(512)))
    assert blocked.status == Status.RESERVATION_CONFLICT
    assert (await b.send(register(2, "host-b", 0xB2))).status == Status.GOOD
    assert (await b.send(command(3, "host-b", cdbs.write16(0, 1), bytes(512)))).status == \
        Status.GOOD
    preempt = command(3, "host-a", cdbs.pr_out(PrOutAction.PREEMPT,
                                               PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY),
                      cdbs.pr_out_parameters(0xA1, 0xB2))
    assert (await a.send(preempt)).status == Status.GOOD
    # b first hears that its registration was preempted (a unit attention, which changes
    # the replicated state too), then is refused.
    attention = await b.send(command(4, "host-b", cdbs.write16(0, 1), bytes(512)))
    assert attention.status == Status.CHECK_CONDITION
    assert attention.sense[2] & 0x0F == SenseKey.UNIT_ATTENTION
    refused = await a.send(command(5, "host-b", cdbs.write16(0, 1), bytes(512)))
    assert refused.status == Status.RESERVATION_CONFLICT


async def test_bad_packets_and_bad_disks_are_errors(rig: Rig, nodes: list[Node]) -> None:
    a, _ = nodes
    with pytest.raises(OSError) as caught:
        await a.ops.run(m.Tunnel(a.handle, memoryview(b"VHDT garbage")), a.handles)
    assert caught.value.errno == errno.EBADMSG
    ops, handles = FileOps(rig.fs), set[int]()
    opened = await ops.run(m.Open("/broken.vhd", os.O_RDWR | os.O_CREAT), handles)
    assert isinstance(opened, m.Handle)
    footer = bytearray(512)
    footer[:8] = b"conectix"  # looks like a VHD, is not one
    await ops.run(m.Write(opened.handle, 0, bytes(4096) + footer), handles)
    ops.close_all(handles)
    await a.open("/broken.vhd")
    with pytest.raises(OSError) as caught:
        await a.send(read_keys(1, "host-a"))
    assert caught.value.errno == errno.EIO
    assert "not usable as a disk" in str(caught.value)


async def test_the_disk_state_is_refused_on_a_directory(rig: Rig) -> None:
    with pytest.raises(NamespaceError) as caught:
        await rig.fs.set_disk_state(1, b"", b"x")
    assert caught.value.errno == errno.EINVAL


@pytest.mark.parametrize(("kind", "image_class", "side_by_side"),
                         [("fixed", FixedImage, True), ("dynamic", DynamicImage, False)])
async def test_a_fixed_disks_writes_run_side_by_side(
        rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
        image_class: type[FixedImage | DynamicImage], side_by_side: bool) -> None:
    """Eight writes sent at once: on a fixed disk each changes only its own sectors, so
    they overlap (as on a real disk); a dynamic disk's take turns. All land either way."""
    in_flight, most = 0, 0
    count_lock = threading.Lock()
    write = image_class.write

    def counted_write(self: FixedImage | DynamicImage, lba: int, data: bytes) -> None:
        nonlocal in_flight, most
        with count_lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            time.sleep(0.05)  # long enough for the others to start, were they allowed to
            write(self, lba, data)  # type: ignore[arg-type]
        finally:
            with count_lock:
                in_flight -= 1

    monkeypatch.setattr(image_class, "write", counted_write)
    await make_disk(rig, tmp_path, kind=kind)
    node = Node(rig)
    await node.open("/disk.vhd")
    try:
        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(node.send, command(n + 1, "h", cdbs.write16(
                    n * 256, 128), bytes([n + 1]) * 65536))
        for n in range(8):
            back = await node.send(command(20 + n, "h", cdbs.read16(n * 256, 128),
                                           data_in=65536))
            assert back.data_in == bytes([n + 1]) * 65536, n
    finally:
        node.close()
    assert (most > 1) is side_by_side, most


async def test_commands_sent_together_grow_the_disk_once_per_block(nodes: list[Node]) -> None:
    """Eight writes into eight unallocated 2 MiB blocks at once, and reads among them, on
    one node: the writes take turns (two allocating the same file end at once would give
    two blocks one place), the reads need not, and everything reads back."""
    a, _ = nodes
    sectors_per_block = 2 * MIB // 512
    answers: dict[int, TunnelResponse] = {}

    async def send(n: int, request: TunnelRequest) -> None:
        answers[n] = await a.send(request)

    async with trio.open_nursery() as nursery:
        for block in range(8):
            data = bytes([block + 1]) * 65536
            nursery.start_soon(send, block, command(100 + block, "h", cdbs.write16(
                block * sectors_per_block + 8, 128), data))
            nursery.start_soon(send, 10 + block, command(200 + block, "h", cdbs.read16(
                block * sectors_per_block, 8), data_in=4096))
    assert all(answer.status == Status.GOOD for answer in answers.values()), answers
    for block in range(8):
        back = await a.send(command(300 + block, "h", cdbs.read16(
            block * sectors_per_block + 8, 128), data_in=65536))
        assert back.data_in == bytes([block + 1]) * 65536, block
    attrs = await a.ops.run(m.Stat("/disk.vhd"), a.handles)
    assert isinstance(attrs, m.Attrs)
    assert check_image(a.unpacker.store.backing_path(attrs.ino)) == []
