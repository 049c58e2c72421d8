"""The node's unpacker: executes tunnel packets from VM hosts on shared disks.

Theory of operation. A VM host opens a disk's file in a file-protocol session and sends
each SCSI command as a tunnel request packet (`vhdshare.tunnel`) with the protocol's TUNNEL
call; the node hands the packet to `Unpacker` with the file's inode. The unpacker keeps one
`SharedDisk` per inode: the image opened in shared mode straight from the block directory,
with O_DIRECT where the file system allows (`vhdshare.directio`: neither the node's FUSE
mount nor the host's page cache is in the way), and a SCSI `Target`.

    packet ─► unpack ─► state from the replica ─► Target.execute (worker thread) ─►
              state changed? ─► SetDiskState (2PC, compare-and-set) ─► response packet

The persistent-reservation state lives in the replicated namespace, not here: every command
starts from the replica's value, so every node enforces the same registrations. A command
that changes it (PERSISTENT RESERVE OUT, or a unit attention being reported) answers only
once the change is committed on every member; if another node changed the state first, the
compare-and-set fails and the command runs again on the new state. Commands that change the
state do no disk I/O, so running one again is harmless. A reservation command is remembered
with its answer in the same record (`vhdshare.diskstate`): the same command retried through
any node (after a failover) gets that answer and is not applied twice.

Commands of one disk run side by side on a node (a VM keeps many in flight), each with a
`Target` of its own on the shared image, in a worker thread unless they cannot block for
long (`_runs_inline`). On a dynamic disk, commands that change the medium run one at a
time per disk and node: the growth lock between nodes is a file lock, which does not keep
apart the threads of one process, and a dynamic disk's bitmaps are read, changed and
written back. A fixed disk's writes change only their own sectors and run side by side,
as on a real disk, where the order of overlapping commands in flight is not defined. Disks idle for
`IDLE_CLOSE_S` are closed. Bad packets are EBADMSG for the TUNNEL call; a
file that cannot be opened as a disk is EIO with the reason; SCSI errors are SCSI answers.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from clusterfs.namespace import NamespaceError
from clusterfs.pieces import Buffer
from vhdshare import diskstate
from vhdshare.blockimage import BlockImage, ImageError
from vhdshare.diskstate import DiskState, DoneCommand
from vhdshare.image import open_block_image
from vhdshare.reservations import ReservationState
from vhdshare.scsi import OpClass, Opcode, ScsiResponse, Status
from vhdshare.target import Target
from vhdshare.tunnel import (
    Direction,
    TunnelProtocolError,
    TunnelRequest,
    TunnelResponse,
    pack_response_pieces,
    request_features,
    unpack_request,
)

log = logging.getLogger(__name__)

IDLE_CLOSE_S = 60.0
# Commands run in the node's loop rather than a worker thread when they cannot wait long:
# no disk I/O, or a small read (one device read, ~0.1 ms; the FUSE handlers read inline
# too). Writes may wait for another node's growth lock and flush: never inline.
INLINE_READ_MAX_BYTES = 128 << 10
_NO_IO = frozenset({OpClass.INQUIRY, OpClass.RESERVATION, OpClass.OTHER})
MAX_STATE_ATTEMPTS = 20  # compare-and-set rounds before answering BUSY


class DiskStore(Protocol):
    """What the unpacker needs of the node's file system (`clusterfs.filesystem`);
    `set_disk_state` raises NamespaceError(EAGAIN) when the state is no longer `expected`."""

    def disk_state(self, ino: int) -> bytes: ...

    def set_disk_state(self, ino: int, expected: bytes, state: bytes) -> Awaitable[None]: ...

    def backing_path(self, ino: int) -> str: ...


@dataclass
class SharedDisk:
    ino: int
    image: BlockImage
    write_lock: trio.Lock = field(default_factory=trio.Lock)
    commands_running: int = 0
    last_used_s: float = 0.0
    _raw: bytes | None = None
    _state: DiskState = field(default_factory=DiskState)

    def state_of(self, raw: bytes) -> DiskState:
        if raw != self._raw:
            self._state, self._raw = diskstate.decode(raw), raw
        return self._state

    def target(self, reservations: ReservationState) -> Target:
        return Target(self.image, f"clusterfs-{self.ino}", state=reservations)


class Unpacker:
    """The node's tunnel service; see the module docstring."""

    def __init__(self, store: DiskStore) -> None:
        self.store = store
        self._disks: dict[int, SharedDisk] = {}

    async def __call__(self, ino: int, fd: int, payload: memoryview) -> list[Buffer]:
        try:
            request = unpack_request(payload)
        except TunnelProtocolError as exc:
            raise OSError(errno.EBADMSG, f"bad tunnel packet: {exc}") from None
        disk = self._disk(ino)
        disk.commands_running += 1
        try:
            if request_features(request.cdb, request.data_length_bytes).op_class \
                    is OpClass.WRITE and not disk.image.writes_in_place:
                async with disk.write_lock:
                    response = await self._execute(disk, request)
            else:
                response = await self._execute(disk, request)
        finally:
            disk.commands_running -= 1
            disk.last_used_s = time.monotonic()
        return pack_response_pieces(TunnelResponse(request.request_id, response.status,
                                                   response.sense, response.data_in))

    def close(self) -> None:
        for disk in self._disks.values():
            disk.image.close()
        self._disks.clear()

    # -- disks ---------------------------------------------------------------------------
    def _disk(self, ino: int) -> SharedDisk:
        self._close_idle(time.monotonic())
        disk = self._disks.get(ino)
        if disk is None:
            path = self.store.backing_path(ino)
            try:
                image = open_block_image(path, writable=True, shared=True, direct=True)
            except (ImageError, OSError) as exc:
                raise OSError(errno.EIO, f"not usable as a disk: {exc}") from None
            disk = SharedDisk(ino, image)
            self._disks[ino] = disk
        disk.last_used_s = time.monotonic()  # not idle while a command waits for it
        return disk

    def _close_idle(self, now_s: float) -> None:
        for ino, disk in list(self._disks.items()):
            if now_s - disk.last_used_s > IDLE_CLOSE_S and not disk.commands_running:
                del self._disks[ino]
                disk.image.close()

    # -- commands ------------------------------------------------------------------------
    async def _execute(self, disk: SharedDisk, request: TunnelRequest) -> ScsiResponse:
        reserving = bool(request.cdb) and request.cdb[0] == Opcode.PERSISTENT_RESERVE_OUT
        mark = diskstate.fingerprint(request.cdb, request.data_out) if reserving else b""
        data_in_limit = (request.data_length_bytes if request.direction is Direction.DATA_IN
                         else 0)
        for _ in range(MAX_STATE_ATTEMPTS):
            raw = self.store.disk_state(disk.ino)
            state = disk.state_of(raw)
            done = state.find_done(request.initiator, request.request_id, mark) \
                if reserving else None
            if done is not None:
                log.info("%s: reservation command %d of %s was applied before; answered again",
                         disk.ino, request.request_id, request.initiator)
                return ScsiResponse(Status(done.status), done.sense)
            target = disk.target(state.reservations)
            if _runs_inline(request):
                response = target.execute(request.initiator, request.cdb, request.data_out,
                                          data_in_limit)
            else:
                response = await trio.to_thread.run_sync(
                    target.execute, request.initiator, request.cdb, request.data_out,
                    data_in_limit)
            if target.state == state.reservations:
                return response
            new_state = DiskState(target.state, state.done)
            if reserving:
                new_state = new_state.with_done(DoneCommand(
                    request.initiator, request.request_id, mark, response.status,
                    response.sense))
            try:
                await self.store.set_disk_state(disk.ino, raw, diskstate.encode(new_state))
            except NamespaceError as exc:
                if exc.errno == errno.EAGAIN:
                    continue  # another node changed the state first: decide again on its value
                raise
            return response
        return ScsiResponse(Status.BUSY)


def _runs_inline(request: TunnelRequest) -> bool:
    features = request_features(request.cdb, request.data_length_bytes)
    if features.op_class is OpClass.READ:
        return request.data_length_bytes <= INLINE_READ_MAX_BYTES
    return features.op_class in _NO_IO
