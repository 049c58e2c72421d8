"""NBD requests as SCSI commands: what the NBD front end asks of a disk, in the target's words.

NBD carries no SCSI, so every request becomes one or more commands for the disk's
`ScsiBackend`, sent for the attachment's one initiator:

    READ          → READ (16)                 WRITE        → WRITE (16), FUA as asked
    FLUSH         → SYNCHRONIZE CACHE (16)    TRIM         → UNMAP
    WRITE_ZEROES  → WRITE SAME (16) of a zero block, with UNMAP unless NBD_CMD_FLAG_NO_HOLE
    BLOCK_STATUS  → GET LBA STATUS (deallocated blocks are holes that read as zeros)

Long requests are split at the target's limits. NBD cannot report a unit attention, so
one is taken and the command sent again, as an operating system's disk driver does. Any
other outcome that is not GOOD becomes `NbdRequestError` with the NBD error code and the
answer in words (a RESERVATION CONFLICT reads as such in the client's structured error).
"""

from __future__ import annotations

from dataclasses import dataclass

from clusterfs.pieces import Buffer
from vhdshare import initiator as cdbs
from vhdshare.frontend import BackendError, ScsiAnswer, ScsiBackend
from vhdshare.host import describe, sense_key
from vhdshare.nbd_wire import STATE_HOLE, STATE_ZERO, NbdError
from vhdshare.scsi import SenseKey, Status

UNIT_ATTENTION_RETRIES = 4
# Per command; the target's own limits (Block Limits VPD) are larger.
MAX_TRANSFER_BYTES = 4 << 20
MAX_ZEROING_BLOCKS = 1 << 22
MAX_UNMAP_BLOCKS = 1 << 20
LBA_STATUS_ALLOCATION_BYTES = 8 + 16 * 512
_ERRORS = {SenseKey.ILLEGAL_REQUEST: NbdError.EINVAL, SenseKey.DATA_PROTECT: NbdError.EPERM,
           SenseKey.NOT_READY: NbdError.ESHUTDOWN}


class NbdRequestError(Exception):
    def __init__(self, code: NbdError, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class NbdDisk:
    """One attached disk as the NBD server serves it (block size and count from READ
    CAPACITY, read once by `open`)."""

    backend: ScsiBackend
    initiator: str
    block_count: int
    block_bytes: int

    @classmethod
    async def open(cls, backend: ScsiBackend, initiator: str) -> NbdDisk:
        disk = cls(backend, initiator, 0, 512)
        data = await disk._run("READ CAPACITY", cdbs.read_capacity16(),
                               data_in_bytes=cdbs.READ_CAPACITY16_ALLOCATION_BYTES)
        disk.block_count, disk.block_bytes = cdbs.parse_read_capacity16(bytes(data))
        return disk

    @property
    def size_bytes(self) -> int:
        return self.block_count * self.block_bytes

    async def read(self, offset_bytes: int, length_bytes: int) -> Buffer:
        step = MAX_TRANSFER_BYTES // self.block_bytes
        pieces = []
        for lba, count in self._spans(offset_bytes, length_bytes, step):
            pieces.append(await self._run("READ", cdbs.read16(lba, count),
                                          data_in_bytes=count * self.block_bytes))
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def write(self, offset_bytes: int, data: bytes, fua: bool) -> None:
        step = MAX_TRANSFER_BYTES // self.block_bytes
        view = memoryview(data)
        for lba, count in self._spans(offset_bytes, len(data), step):
            start = (lba * self.block_bytes) - offset_bytes
            piece = view[start : start + count * self.block_bytes]
            await self._run("WRITE", cdbs.write16(lba, count, fua),
                            data if len(piece) == len(data) else bytes(piece))

    async def flush(self) -> None:
        await self._run("SYNCHRONIZE CACHE", cdbs.synchronize_cache16())

    async def trim(self, offset_bytes: int, length_bytes: int, fua: bool) -> None:
        for lba, count in self._spans(offset_bytes, length_bytes, MAX_UNMAP_BLOCKS):
            cdb, parameters = cdbs.unmap([(lba, count)])
            await self._run("UNMAP", cdb, parameters)
        if fua:
            await self.flush()

    async def write_zeroes(self, offset_bytes: int, length_bytes: int, fua: bool,
                           no_hole: bool) -> None:
        zero_block = bytes(self.block_bytes)
        for lba, count in self._spans(offset_bytes, length_bytes, MAX_ZEROING_BLOCKS):
            await self._run("WRITE SAME", cdbs.write_same16(lba, count, unmap=not no_hole),
                            zero_block)
        if fua:
            await self.flush()

    async def block_status(self, offset_bytes: int, length_bytes: int) -> list[tuple[int, int]]:
        """(length in bytes, NBD state flags) extents from `offset_bytes` on; they may
        cover less than asked (one GET LBA STATUS answer), never nothing."""
        lba = offset_bytes // self.block_bytes
        data = await self._run("GET LBA STATUS", cdbs.get_lba_status(
            lba, LBA_STATUS_ALLOCATION_BYTES), data_in_bytes=LBA_STATUS_ALLOCATION_BYTES)
        extents = []
        for first, count, mapped in cdbs.parse_lba_status(bytes(data)):
            if first != lba or count <= 0:
                break  # a gap or a descriptor out of order: report up to there
            extents.append((count * self.block_bytes, 0 if mapped else STATE_HOLE | STATE_ZERO))
            lba += count
        if not extents:
            raise NbdRequestError(NbdError.EIO, "GET LBA STATUS answered no extent")
        return extents

    # -- commands --------------------------------------------------------------------------
    def _spans(self, offset_bytes: int, length_bytes: int, step_blocks: int
               ) -> list[tuple[int, int]]:
        first = offset_bytes // self.block_bytes
        end = (offset_bytes + length_bytes) // self.block_bytes
        return [(lba, min(step_blocks, end - lba)) for lba in range(first, end, step_blocks)]

    async def _run(self, what: str, cdb: bytes, data_out: bytes = b"",
                   data_in_bytes: int = 0) -> Buffer:
        """The command's data-in once it ends GOOD (unit attentions taken); else the error."""
        for _ in range(UNIT_ATTENTION_RETRIES):
            try:
                answer = await self.backend.execute(self.initiator, cdb, data_out, data_in_bytes)
            except BackendError as exc:
                raise NbdRequestError(NbdError.EIO, str(exc)) from None
            if sense_key(answer) is not SenseKey.UNIT_ATTENTION:
                break
        if answer.status != Status.GOOD:
            raise NbdRequestError(_nbd_error(answer), f"{what}: {describe(answer)}")
        return answer.data_in


def _nbd_error(answer: ScsiAnswer) -> NbdError:
    key = sense_key(answer)
    if key is not None:
        return _ERRORS.get(key, NbdError.EIO)
    return NbdError.EIO

