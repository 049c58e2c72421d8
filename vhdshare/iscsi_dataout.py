"""One SCSI command in flight on an iSCSI target connection and the rules of its data-out, sans-IO.

Why a module of its own: `vhdshare.iscsi` is the connection (framing, the state table,
sequence numbers, every PDU that goes out); how a write command's data arrives concerns
that one command only and needs nothing of the connection but the negotiated
`SessionParams`, so it lives here, on `Task`, and the connection stays a small module.

Theory of operation (RFC 7143 sections 4.2.5.2, 11.7 and 11.8): a write's data comes as
immediate data in the command PDU, then as unsolicited Data-Out (Target Transfer Tag
0xffffffff) up to FirstBurstLength in all, then as solicited Data-Out, one sequence per
R2T of at most MaxBurstLength; the connection keeps one R2T outstanding per command
(MaxOutstandingR2T=1) and sends the next once the sequence is complete.  Each sequence
counts its DataSN from 0 and must arrive in order (DataPDUInOrder=Yes) at the offset where
the data so far ends.  Data-out that breaks these rules raises `DataOutError`, which the
connection turns into CHECK CONDITION for the command (RFC 7143 11.4.7.2); the connection
itself goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhdshare import iscsi_keys as keys
from vhdshare.iscsi_wire import RESERVED_TAG
from vhdshare.scsi import Asc, SenseKey

UNEXPECTED_UNSOLICITED_DATA: Asc = (0x0C, 0x0C)  # ILLEGAL REQUEST
INCORRECT_AMOUNT_OF_DATA: Asc = (0x0C, 0x0D)  # ABORTED COMMAND
DATA_PHASE_ERROR: Asc = (0x4B, 0x00)  # ABORTED COMMAND
DATA_OFFSET_ERROR: Asc = (0x4B, 0x05)  # ABORTED COMMAND


class DataOutError(Exception):
    """Data-out that breaks its command's data flow: the command ends in CHECK CONDITION
    (RFC 7143 11.4.7.2), the connection goes on."""

    def __init__(self, key: SenseKey, code: Asc) -> None:
        super().__init__(f"{key.name} {code[0]:02X}h/{code[1]:02X}h")
        self.key, self.code = key, code


@dataclass(slots=True)
class R2t:
    """The outstanding R2T of a command: the Data-Out sequence it solicits."""

    ttt: int
    offset_bytes: int
    length_bytes: int
    data_sn: int = 0


@dataclass(slots=True, eq=False)
class Task:
    """One SCSI command from its PDU to its answer."""

    itt: int
    lun: int
    cdb: bytes
    immediate: bool
    attribute: int
    read_bytes: int
    write_bytes: int
    buffer: bytearray | None = None  # data-out being assembled
    data: bytes = b""  # data-out that came whole as immediate data
    received_bytes: int = 0
    unsolicited_open: bool = False
    unsolicited_sn: int = 0
    r2t: R2t | None = None
    r2t_count: int = 0
    emitted: bool = False  # handed to the driver, which owes the answer

    def take_data(self) -> bytes:
        data = bytes(self.buffer) if self.buffer is not None else self.data
        self.buffer, self.data = None, b""
        return data

    def start_write(self, params: keys.SessionParams, final: bool, data: memoryview) -> None:
        """Take the command PDU's immediate data; `final`: no unsolicited Data-Out follows."""
        size = len(data)
        if (size and not params.immediate_data) or (not final and params.initial_r2t):
            raise DataOutError(SenseKey.ILLEGAL_REQUEST, UNEXPECTED_UNSOLICITED_DATA)
        if size > min(self.write_bytes, params.first_burst_length):
            raise DataOutError(SenseKey.ABORTED_COMMAND, INCORRECT_AMOUNT_OF_DATA)
        self.unsolicited_open = not final
        if size == self.write_bytes:
            self.data = bytes(data)
        else:
            self.buffer = bytearray(self.write_bytes)
            self.buffer[:size] = data
        self.received_bytes = size

    def take_data_out(self, params: keys.SessionParams, ttt: int, data_sn: int, offset: int,
                      data: memoryview) -> None:
        """Take one Data-Out PDU's data (its TTT is ours or RESERVED_TAG)."""
        if ttt == RESERVED_TAG and not self.unsolicited_open:
            raise DataOutError(SenseKey.ILLEGAL_REQUEST, UNEXPECTED_UNSOLICITED_DATA)
        end, expected_sn = self._sequence_end(params, ttt)
        if data_sn != expected_sn:
            raise DataOutError(SenseKey.ABORTED_COMMAND, DATA_PHASE_ERROR)
        if offset != self.received_bytes:
            raise DataOutError(SenseKey.ABORTED_COMMAND, DATA_OFFSET_ERROR)
        if offset + len(data) > end:
            raise DataOutError(SenseKey.ABORTED_COMMAND, INCORRECT_AMOUNT_OF_DATA)
        assert self.buffer is not None  # only a partial data-out is assembled
        self.buffer[offset : offset + len(data)] = data
        self.received_bytes += len(data)

    def _sequence_end(self, params: keys.SessionParams, ttt: int) -> tuple[int, int]:
        """(end offset, next DataSN) of the Data-Out sequence `ttt` belongs to."""
        if ttt == RESERVED_TAG:
            return min(self.write_bytes, params.first_burst_length), self.unsolicited_sn
        assert self.r2t is not None
        return self.r2t.offset_bytes + self.r2t.length_bytes, self.r2t.data_sn

    def data_out_done(self, ttt: int, final: bool) -> None:
        """Count a Data-Out PDU taken; with `final` its sequence is over."""
        if ttt == RESERVED_TAG:
            self.unsolicited_sn += 1
            self.unsolicited_open = not final
            return
        assert self.r2t is not None
        self.r2t.data_sn += 1
        if final:
            if self.received_bytes != self.r2t.offset_bytes + self.r2t.length_bytes:
                raise DataOutError(SenseKey.ABORTED_COMMAND, INCORRECT_AMOUNT_OF_DATA)
            self.r2t = None
