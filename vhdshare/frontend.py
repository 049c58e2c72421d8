"""What a front end (NBD, iSCSI) needs from the disk behind it: one call that runs a SCSI command.

The front ends are protocol drivers; they never touch an image. They hand every command, as a
CDB with its data, to a `ScsiBackend` for one disk and pass the answer back to the VM's
initiator. `vhdshare attach` gives them `TunnelBackend`-style backends over `RemoteDisk` (the
node's target answers, with the cluster-wide reservations); tests may give them a local
`vhdshare.target.Target`.
"""

from __future__ import annotations

from typing import Protocol

from clusterfs.pieces import Buffer


class ScsiAnswer(Protocol):
    """The target's answer: SAM status, sense bytes (may be empty), data-in bytes (perhaps
    a view of the message that carried them)."""

    @property
    def status(self) -> int: ...

    @property
    def sense(self) -> bytes: ...

    @property
    def data_in(self) -> Buffer: ...


class ScsiBackend(Protocol):
    """One disk (LUN 0) as a SCSI logical unit."""

    async def execute(self, initiator: str, cdb: bytes, data_out: bytes,
                      data_in_bytes: int) -> ScsiAnswer:
        """Run `cdb` for `initiator` (the reservation identity). `data_out` is the command's
        whole data-out buffer; `data_in_bytes` the initiator's data-in allocation. Raises
        `BackendError` when the disk cannot be reached; every SCSI outcome is an answer."""
        ...


class BackendError(Exception):
    """The disk cannot be reached now; the message is one line."""
