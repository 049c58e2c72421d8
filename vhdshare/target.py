"""The SCSI target: executes one CDB for one initiator against a BlockImage.

Theory of operation (sans-IO apart from the image calls it is handed):

    cdb ─► unit attention owed? ─► decode ─► reservation conflict? ─► execute ─► ScsiResponse

`execute` is the one conversion boundary of the SCSI layer: the decoder, the
reservation rules and the command handlers raise `CheckCondition` or
`ReservationConflict`; image failures (`ImageError`, `OSError`) become MEDIUM
ERROR; nothing escapes for any bytes an initiator can send.  The persistent
reservation state is a value (`ReservationState`): the target reads
`self.state`, and whenever a command changes it (PR OUT, or a unit attention
being reported) it stores the new value and calls `on_state_change(new)`, so
the cluster layer can replicate it; `state` can also be set from outside.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from clusterfs.pieces import Buffer
from vhdshare.blockimage import ImageError
from vhdshare.reservations import ReservationState, apply_pr_out, conflicts, pop_unit_attention
from vhdshare.scsi import (
    INVALID_COMMAND_OPERATION_CODE,
    INVALID_FIELD_IN_CDB,
    LBA_OUT_OF_RANGE,
    NO_ADDITIONAL_SENSE,
    PARAMETER_LIST_LENGTH_ERROR,
    UNRECOVERED_READ_ERROR,
    WRITE_ERROR,
    Asc,
    CheckCondition,
    Opcode,
    ReservationConflict,
    ScsiResponse,
    SenseData,
    SenseKey,
    Status,
    illegal_request,
    invalid_field,
    invalid_parameter,
    sense,
)
from vhdshare.scsi_cdb import (
    Command,
    GetLbaStatus,
    Inquiry,
    ModeSense,
    PersistentReserveIn,
    PersistentReserveOut,
    Read,
    ReadCapacity10,
    ReadCapacity16,
    ReportLuns,
    RequestSense,
    SynchronizeCache,
    TestUnitReady,
    Unmap,
    Write,
    WriteSame16,
    decode_cdb,
)
from vhdshare.scsi_inquiry import (
    LBA_STATUS_DESCRIPTOR,
    LBA_STATUS_HEADER,
    DiskInfo,
    lba_status,
    mode_sense,
    read_capacity10,
    read_capacity16,
    report_luns,
    standard_inquiry,
    vpd_page,
)
from vhdshare.scsi_pr import parse_pr_out, pr_in_data

if TYPE_CHECKING:
    from vhdshare.blockimage import BlockImage

log = logging.getLogger(__name__)

UNMAP_HEADER = struct.Struct(">HH4s")  # UNMAP data length, block descriptor data length, -
assert UNMAP_HEADER.size == 8
UNMAP_DESCRIPTOR = struct.Struct(">QI4s")  # LBA, number of logical blocks, -
assert UNMAP_DESCRIPTOR.size == 16

DEFAULT_MAX_TRANSFER_BYTES = 32 << 20  # what qemu and libnbd send at most; libiscsi's tests too
DEFAULT_MAX_UNMAP_BLOCKS = 1 << 20  # 512 MiB of 512-byte blocks per UNMAP (libiscsi: <= 1 Mi)
DEFAULT_MAX_WRITE_SAME_BLOCKS = 1 << 22  # 2 GiB per WRITE SAME
DEFAULT_UNMAP_GRANULARITY_BLOCKS = 4096  # the 2 MiB block of a dynamic VHD
MAX_UNMAP_DESCRIPTORS = 256
# How far one GET LBA STATUS looks (8 GiB of 512-byte blocks): an answer may cover less
# than the rest of the medium, and the initiator asks again from where it ends.
LBA_STATUS_SPAN_BLOCKS = 1 << 24
WRITE_CHUNK_BYTES = 1 << 20
# Commands that neither report nor clear a pending unit attention (SAM-5 5.14).
UNIT_ATTENTION_EXEMPT = frozenset({Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE})

P = ParamSpec("P")
R = TypeVar("R")
StateHook = Callable[[ReservationState], None]


class Target:
    """One logical unit (LUN 0) backed by one image; see the module docstring."""

    def __init__(
        self,
        image: BlockImage,
        disk_id: str,
        *,
        state: ReservationState | None = None,
        on_state_change: StateHook | None = None,
        thin_provisioning: bool = True,
        unmap_reads_zero: bool = True,
        max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES,
    ) -> None:
        self.image = image
        self.state = state if state is not None else ReservationState()
        self.on_state_change = on_state_change
        self.unmap_reads_zero = unmap_reads_zero
        block_size = image.sector_size
        self.info = DiskInfo(
            disk_id=disk_id,
            block_count=image.size_bytes // block_size,
            block_size=block_size,
            thin_provisioning=thin_provisioning,
            max_transfer_blocks=max_transfer_bytes // block_size,
            max_unmap_blocks=DEFAULT_MAX_UNMAP_BLOCKS,
            max_write_same_blocks=DEFAULT_MAX_WRITE_SAME_BLOCKS,
            unmap_granularity_blocks=DEFAULT_UNMAP_GRANULARITY_BLOCKS,
        )

    # -- the boundary ------------------------------------------------------------------

    def execute(
        self,
        initiator: str,
        cdb: bytes,
        data_out: Buffer = b"",
        data_in_limit_bytes: int | None = None,
    ) -> ScsiResponse:
        """Run one command; data-in is cut to `data_in_limit_bytes` (the host's buffer).
        A WRITE's data-out is written from where it is; the other commands' is copied."""
        try:
            response = self._execute(initiator, bytes(cdb), data_out)
        except CheckCondition as error:
            response = ScsiResponse.check_condition(error.sense_data)
        except ReservationConflict:
            response = ScsiResponse.reservation_conflict()
        if data_in_limit_bytes is not None and len(response.data_in) > data_in_limit_bytes:
            response = ScsiResponse(
                response.status,
                response.sense,
                response.data_in[: max(0, data_in_limit_bytes)],
                response.aborted_initiators,
            )
        return response

    def _execute(self, initiator: str, cdb: bytes, data_out: Buffer) -> ScsiResponse:
        if cdb and cdb[0] not in UNIT_ATTENTION_EXEMPT:
            self._report_unit_attention(initiator)
        command = decode_cdb(cdb)
        if conflicts(self.state, initiator, command.access):
            raise ReservationConflict()
        return self._dispatch(command, initiator, data_out)

    def _set_state(self, new_state: ReservationState) -> None:
        if new_state == self.state:
            return
        self.state = new_state
        if self.on_state_change is not None:
            self.on_state_change(new_state)

    def _take_unit_attention(self, initiator: str) -> SenseData | None:
        new_state, ua = pop_unit_attention(self.state, initiator)
        if ua is None:
            return None
        self._set_state(new_state)
        return sense(SenseKey.UNIT_ATTENTION, (ua.asc, ua.ascq))

    def _report_unit_attention(self, initiator: str) -> None:
        sense_data = self._take_unit_attention(initiator)
        if sense_data is not None:
            raise CheckCondition(sense_data)

    # -- dispatch ----------------------------------------------------------------------

    def _dispatch(self, command: Command, initiator: str, data_out: Buffer) -> ScsiResponse:
        if isinstance(command, Write):
            return self._write(command, data_out)
        data_out = bytes(data_out)  # small: parameter lists, one block of a pattern
        match command:
            case TestUnitReady():
                return ScsiResponse.good()
            case RequestSense():
                return self._request_sense(command, initiator)
            case Inquiry():
                return self._inquiry(command)
            case ModeSense():
                return _good_truncated(mode_sense(command, self.info), command.allocation_length)
            case ReadCapacity10():
                return ScsiResponse.good(read_capacity10(self.info))
            case ReadCapacity16():
                data = read_capacity16(self.info)
                return _good_truncated(data, command.allocation_length)
            case GetLbaStatus():
                return self._get_lba_status(command)
            case ReportLuns():
                return _good_truncated(report_luns(), command.allocation_length)
            case Read():
                return self._read(command)
            case SynchronizeCache():
                return self._synchronize_cache(command)
            case Unmap():
                return self._unmap(command, data_out)
            case WriteSame16():
                return self._write_same(command, data_out)
            case PersistentReserveIn():
                data = pr_in_data(command, self.state)
                return _good_truncated(data, command.allocation_length)
            case PersistentReserveOut():
                return self._persistent_reserve_out(command, initiator, data_out)

    # -- descriptive commands -------------------------------------------------------------

    def _request_sense(self, command: RequestSense, initiator: str) -> ScsiResponse:
        if command.descriptor_format:
            raise invalid_field(1, 0)
        sense_data = self._take_unit_attention(initiator)
        if sense_data is None:
            sense_data = sense(SenseKey.NO_SENSE, NO_ADDITIONAL_SENSE)
        return _good_truncated(sense_data.pack(), command.allocation_length)

    def _inquiry(self, command: Inquiry) -> ScsiResponse:
        data = vpd_page(command.page_code, self.info) if command.evpd else standard_inquiry()
        return _good_truncated(data, command.allocation_length)

    # -- medium access ---------------------------------------------------------------------

    def _check_range(self, lba: int, block_count: int) -> None:
        if lba + block_count > self.info.block_count or lba >= self.info.block_count > 0:
            raise illegal_request(LBA_OUT_OF_RANGE)

    def _get_lba_status(self, command: GetLbaStatus) -> ScsiResponse:
        if command.lba >= self.info.block_count:
            raise illegal_request(LBA_OUT_OF_RANGE)
        room = (command.allocation_length - LBA_STATUS_HEADER.size) // LBA_STATUS_DESCRIPTOR.size
        span = min(self.info.block_count - command.lba, LBA_STATUS_SPAN_BLOCKS)
        runs = _image_call(UNRECOVERED_READ_ERROR, self.image.allocated, command.lba, span)
        return _good_truncated(lba_status(runs[:max(room, 1)]), command.allocation_length)

    def _check_transfer(self, block_count: int) -> None:
        if block_count > self.info.max_transfer_blocks:
            raise illegal_request(INVALID_FIELD_IN_CDB)

    def _read(self, command: Read) -> ScsiResponse:
        self._check_range(command.lba, command.block_count)
        self._check_transfer(command.block_count)
        if command.block_count == 0:
            return ScsiResponse.good()
        data = _image_call(UNRECOVERED_READ_ERROR, self.image.read, command.lba,
                           command.block_count)
        return ScsiResponse.good(data)

    def _write(self, command: Write, data_out: Buffer) -> ScsiResponse:
        self._check_range(command.lba, command.block_count)
        self._check_transfer(command.block_count)
        if len(data_out) != command.block_count * self.info.block_size:
            raise illegal_request(INVALID_FIELD_IN_CDB)
        if command.block_count:
            _image_call(WRITE_ERROR, self.image.write, command.lba, data_out)
        if command.fua:
            _image_call(WRITE_ERROR, self.image.flush)
        return ScsiResponse.good()

    def _synchronize_cache(self, command: SynchronizeCache) -> ScsiResponse:
        self._check_range(command.lba, command.block_count)
        _image_call(WRITE_ERROR, self.image.flush)
        return ScsiResponse.good()

    def _unmap(self, command: Unmap, data_out: bytes) -> ScsiResponse:
        if not self.info.thin_provisioning:
            raise illegal_request(INVALID_COMMAND_OPERATION_CODE, field_pointer=0)
        extents = self._unmap_extents(command.parameter_list_length, data_out)
        for lba, block_count in extents:
            if block_count:
                _image_call(WRITE_ERROR, self.image.unmap, lba, block_count)
        return ScsiResponse.good()

    def _unmap_extents(self, length_bytes: int, data_out: bytes) -> list[tuple[int, int]]:
        """Parse and check an UNMAP parameter list (SBC-3 5.28.2) before touching anything."""
        if length_bytes == 0:
            return []
        if length_bytes < UNMAP_HEADER.size or len(data_out) < length_bytes:
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        _, descriptor_bytes, _ = UNMAP_HEADER.unpack_from(data_out)
        descriptor_bytes = min(descriptor_bytes, length_bytes - UNMAP_HEADER.size)
        count = descriptor_bytes // UNMAP_DESCRIPTOR.size
        if count > MAX_UNMAP_DESCRIPTORS:
            raise invalid_parameter(2)
        extents = []
        for index in range(count):
            offset = UNMAP_HEADER.size + index * UNMAP_DESCRIPTOR.size
            lba, block_count, _ = UNMAP_DESCRIPTOR.unpack_from(data_out, offset)
            if block_count:  # an empty descriptor names no block, wherever it points
                self._check_range(lba, block_count)
            extents.append((lba, block_count))
        if sum(n for _, n in extents) > self.info.max_unmap_blocks:
            raise invalid_parameter(UNMAP_HEADER.size + 8)
        return extents

    def _write_same(self, command: WriteSame16, data_out: bytes) -> ScsiResponse:
        self._check_range(command.lba, command.block_count)
        if command.block_count > self.info.max_write_same_blocks:
            raise invalid_field(10)
        block_size = self.info.block_size
        if command.no_data_out:
            pattern = bytes(block_size)
        elif len(data_out) != block_size:
            raise illegal_request(INVALID_FIELD_IN_CDB)
        else:
            pattern = data_out
        if command.unmap and self._unmap_gives_zeros() and not any(pattern):
            _image_call(WRITE_ERROR, self.image.unmap, command.lba, command.block_count)
            return ScsiResponse.good()
        self._write_pattern(command.lba, command.block_count, pattern)
        return ScsiResponse.good()

    def _unmap_gives_zeros(self) -> bool:
        return self.info.thin_provisioning and self.unmap_reads_zero

    def _write_pattern(self, lba: int, block_count: int, pattern: bytes) -> None:
        blocks_per_chunk = max(1, WRITE_CHUNK_BYTES // len(pattern))
        chunk = pattern * min(blocks_per_chunk, block_count)
        done = 0
        while done < block_count:
            n = min(blocks_per_chunk, block_count - done)
            data = chunk if n * len(pattern) == len(chunk) else pattern * n
            _image_call(WRITE_ERROR, self.image.write, lba + done, data)
            done += n

    # -- reservations ----------------------------------------------------------------------

    def _persistent_reserve_out(
        self, command: PersistentReserveOut, initiator: str, data_out: bytes
    ) -> ScsiResponse:
        request = parse_pr_out(command, data_out)
        outcome = apply_pr_out(self.state, initiator, request)
        self._set_state(outcome.state)
        return ScsiResponse(Status.GOOD, aborted_initiators=outcome.aborted_initiators)


def _good_truncated(data: bytes, allocation_length: int) -> ScsiResponse:
    return ScsiResponse.good(data[:allocation_length])


def _image_call(code: Asc, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Call the image; its failures become MEDIUM ERROR with `code`."""
    try:
        return function(*args, **kwargs)
    except (ImageError, OSError) as error:
        log.warning("image I/O failed: %s", error)
        raise CheckCondition(sense(SenseKey.MEDIUM_ERROR, code)) from error
