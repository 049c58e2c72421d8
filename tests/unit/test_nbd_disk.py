"""`NbdDisk`: NBD requests as SCSI commands, against a real `Target` on an in-memory image
behind a recording backend (the backend is the fake; the mapping and the target are real)."""

from __future__ import annotations

import struct

import pytest

from tests.unit.test_scsi_target import MemoryImage
from vhdshare import initiator as cdbs
from vhdshare.frontend import BackendError
from vhdshare.nbd_disk import NbdDisk, NbdRequestError
from vhdshare.nbd_wire import STATE_HOLE, STATE_ZERO, NbdError
from vhdshare.reservations import PrOutAction, PrType
from vhdshare.scsi import ScsiResponse
from vhdshare.target import Target

SECTOR = 512


class Recorder:
    """Runs every command on the target and keeps (initiator, opcode, CDB) in order."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.commands: list[tuple[str, int, bytes]] = []
        self.fail_next = False

    async def execute(self, initiator: str, cdb: bytes, data_out: bytes,
                      data_in_bytes: int) -> ScsiResponse:
        if self.fail_next:
            self.fail_next = False
            raise BackendError("no node of the cluster answered")
        self.commands.append((initiator, cdb[0], cdb))
        return self.target.execute(initiator, cdb, data_out, data_in_bytes)


@pytest.fixture
def image() -> MemoryImage:
    return MemoryImage(8192)  # 4 MiB


@pytest.fixture
def recorder(image: MemoryImage) -> Recorder:
    return Recorder(Target(image, "disk"))


async def opened(recorder: Recorder) -> NbdDisk:
    return await NbdDisk.open(recorder, "host-a")


async def test_open_reads_the_capacity_and_io_round_trips(recorder: Recorder,
                                                          image: MemoryImage) -> None:
    disk = await opened(recorder)
    assert (disk.size_bytes, disk.block_bytes) == (4 << 20, SECTOR)
    await disk.write(4096, b"\x07" * 8192, fua=True)
    assert await disk.read(4096, 8192) == b"\x07" * 8192
    assert image.flushes == 1  # FUA
    await disk.flush()
    assert image.flushes == 2
    assert {initiator for initiator, _, _ in recorder.commands} == {"host-a"}


async def test_long_requests_are_split_at_the_transfer_limit(recorder: Recorder,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.setattr("vhdshare.nbd_disk.MAX_TRANSFER_BYTES", 64 * 1024)
    disk = await opened(recorder)
    data = bytes(range(256)) * 1024  # 256 KiB
    await disk.write(0, data, fua=False)
    writes = [cdb for _, opcode, cdb in recorder.commands if opcode == 0x8A]
    assert [struct.unpack_from(">QI", cdb, 2) for cdb in writes] == [
        (0, 128), (128, 128), (256, 128), (384, 128)]
    assert await disk.read(0, len(data)) == data


async def test_trim_unmaps_and_write_zeroes_writes_same(recorder: Recorder,
                                                        image: MemoryImage) -> None:
    disk = await opened(recorder)
    await disk.write(0, b"\x01" * 65536, fua=False)
    await disk.trim(0, 8192, fua=False)
    assert image.unmapped == [(0, 16)]
    await disk.write_zeroes(8192, 8192, fua=False, no_hole=True)
    await disk.write_zeroes(16384, 8192, fua=True, no_hole=False)
    same = [cdb for _, opcode, cdb in recorder.commands if opcode == 0x93]
    assert [cdb[1] & 0x08 for cdb in same] == [0, 0x08]  # UNMAP only when holes may be made
    assert await disk.read(0, 24576) == bytes(24576)
    assert await disk.read(24576, 4096) == b"\x01" * 4096


async def test_block_status_is_the_allocation_map(recorder: Recorder) -> None:
    disk = await opened(recorder)
    await disk.write(SECTOR * 10, b"\x01" * SECTOR * 2, fua=False)
    extents = await disk.block_status(0, 4 << 20)
    merged: list[tuple[int, int]] = []  # as the NBD core sends them
    for length, flags in extents:
        if merged and merged[-1][1] == flags:
            merged[-1] = (merged[-1][0] + length, flags)
        else:
            merged.append((length, flags))
    hole = STATE_HOLE | STATE_ZERO
    assert merged[:3] == [(10 * SECTOR, hole), (2 * SECTOR, 0), (merged[2][0], hole)]
    assert 0 < sum(length for length, _ in extents) <= 4 << 20


async def test_scsi_failures_become_nbd_errors(recorder: Recorder) -> None:
    disk = await opened(recorder)
    other = Target(recorder.target.image, "disk", state=recorder.target.state)
    other.execute("host-b", cdbs.pr_out(PrOutAction.REGISTER), cdbs.pr_out_parameters(0, 0xB))
    other.execute("host-b", cdbs.pr_out(PrOutAction.RESERVE, PrType.WRITE_EXCLUSIVE),
                  cdbs.pr_out_parameters(0xB))
    recorder.target.state = other.state
    with pytest.raises(NbdRequestError) as refused:
        await disk.write(0, bytes(SECTOR), fua=False)
    assert refused.value.code == NbdError.EIO
    assert "RESERVATION CONFLICT" in str(refused.value)
    assert await disk.read(0, SECTOR) == bytes(SECTOR)  # reads pass a WE reservation
    with pytest.raises(NbdRequestError) as beyond:
        await disk.read(4 << 20, SECTOR)
    assert beyond.value.code == NbdError.EINVAL
    recorder.fail_next = True
    with pytest.raises(NbdRequestError) as unreachable:
        await disk.flush()
    assert unreachable.value.code == NbdError.EIO and "no node" in str(unreachable.value)


async def test_a_unit_attention_is_taken_and_the_command_sent_again(recorder: Recorder
                                                                   ) -> None:
    disk = await opened(recorder)
    target = recorder.target
    target.execute("host-a", cdbs.pr_out(PrOutAction.REGISTER), cdbs.pr_out_parameters(0, 0xA))
    target.execute("host-b", cdbs.pr_out(PrOutAction.REGISTER), cdbs.pr_out_parameters(0, 0xB))
    # host-b preempts host-a's registration: host-a owes a unit attention
    target.execute("host-b", cdbs.pr_out(PrOutAction.PREEMPT, PrType.WRITE_EXCLUSIVE),
                   cdbs.pr_out_parameters(0xB, 0xA))
    recorder.commands.clear()
    assert await disk.read(0, SECTOR) == bytes(SECTOR)
    assert [opcode for _, opcode, _ in recorder.commands] == [0x88, 0x88]


