"""The VM host's end of the tunnel: a shared disk on the cluster, addressed by SCSI commands.

`RemoteDisk.attach(cluster, credentials, path, initiator)` opens the disk's file in a
file-protocol session (`clusterfs.client.Client`; lb routes it, by the session id, which
names the initiator unless told otherwise) and `execute` sends one SCSI command as a tunnel
packet with the protocol's TUNNEL call. When the node behind the session fails or leaves,
the client opens the session again on another node, opens the file again, and resends the
packet that was in flight, unchanged: the VM sees a pause, not an error, and the node's
unpacker answers a reservation command it already applied without applying it again (the
packet's request id and the initiator name it). Request ids start at a random point, so a
VM host that restarts does not reuse the ids of its previous run.

`execute` returns every answer as it came, unit attentions included (front ends pass them
to the VM). The helpers (`read`, `write`, the reservation commands) are for tools and
tests: they raise `ScsiError` for anything but GOOD, after retrying a few unit attentions,
as an operating system's disk driver does.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from clusterfs.client import ROUTE_TIMEOUT_S, Client, ClientError
from clusterfs.credentials import Credentials
from vhdshare import initiator as cdbs
from vhdshare.frontend import ScsiAnswer
from vhdshare.initiator import Keys, ReservationInfo
from vhdshare.reservations import PrInAction, PrOutAction, PrType
from vhdshare.scsi import SenseKey, Status
from vhdshare.tunnel import (
    SECTOR_SIZE,
    Direction,
    HostConnection,
    TunnelProtocolError,
    TunnelRequest,
    TunnelResponse,
)

UNIT_ATTENTION_RETRIES = 4
REQUEST_ID_START_BITS = 62


class DiskError(Exception):
    """The disk cannot be reached or used; the message is one line."""


class ScsiError(Exception):
    """A command did not end GOOD."""

    def __init__(self, what: str, response: TunnelResponse) -> None:
        self.response = response
        self.status = response.status  # a Status value, or another a target may send
        super().__init__(f"{what}: {describe(response)}")

    @property
    def sense_key(self) -> SenseKey | None:
        return sense_key(self.response)


def sense_key(response: ScsiAnswer) -> SenseKey | None:
    if response.status != Status.CHECK_CONDITION or len(response.sense) < 3:
        return None
    try:
        return SenseKey(response.sense[2] & 0x0F)
    except ValueError:
        return None


def describe(response: ScsiAnswer) -> str:
    """The answer in words: "RESERVATION CONFLICT", "CHECK CONDITION, UNIT ATTENTION 2Ah/03h"."""
    try:
        status = Status(response.status).name.replace("_", " ")
    except ValueError:
        status = f"status {response.status:#04x}"
    key = sense_key(response)
    if key is None:
        return status
    asc = f" {response.sense[12]:02X}h/{response.sense[13]:02X}h" \
        if len(response.sense) >= 14 else ""
    return f"{status}, {key.name.replace('_', ' ')}{asc}"


class RemoteDisk:
    def __init__(self, client: Client, handle: int, path: str, initiator: str) -> None:
        self.client = client
        self.path = path
        self.initiator = initiator
        self._handle = handle
        self._connection = HostConnection()
        self._request_ids = itertools.count(random.getrandbits(REQUEST_ID_START_BITS))

    @classmethod
    @asynccontextmanager
    async def attach(cls, cluster: list[str], credentials: Credentials, path: str,
                     initiator: str, session_id: str | None = None,
                     route_timeout_s: float = ROUTE_TIMEOUT_S) -> AsyncIterator[RemoteDisk]:
        """The disk at `path` in the cluster, attached for `initiator` until the block ends.
        `route_timeout_s`: how long to look for a node before giving up (DiskError)."""
        try:
            async with Client(cluster, credentials, session_id or f"vhdshare:{initiator}",
                              route_timeout_s=route_timeout_s) as client:
                try:
                    handle = await client.open(path, os.O_RDWR)
                except OSError as exc:
                    raise DiskError(f"{path}: {exc.strerror}") from None
                try:
                    yield cls(client, handle, path, initiator)
                finally:
                    with contextlib.suppress(OSError, ClientError):
                        await client.close(handle)
        except ClientError as exc:
            raise DiskError(str(exc)) from None

    @property
    def node(self) -> str | None:
        """The node serving the disk now (None while re-routing)."""
        session = self.client.session
        return None if session is None else session.node

    async def execute(self, cdb: bytes, data_out: bytes = b"", data_in_bytes: int = 0
                      ) -> TunnelResponse:
        """Run one SCSI command on the disk and return the target's answer."""
        direction = Direction.DATA_OUT if data_out else (
            Direction.DATA_IN if data_in_bytes else Direction.NONE)
        request = TunnelRequest(next(self._request_ids), self.initiator, bytes(cdb), direction,
                                len(data_out) if data_out else data_in_bytes, bytes(data_out))
        try:
            packet = self._connection.send_request(request)
        except TunnelProtocolError as exc:
            raise DiskError(f"{self.path}: cannot send that command: {exc}") from None
        try:
            reply = await self.client.tunnel(self._handle, packet)
        except OSError as exc:
            raise DiskError(f"{self.path}: {exc.strerror}") from None
        except ClientError as exc:
            raise DiskError(str(exc)) from None
        try:
            return self._connection.receive_packet(reply)
        except TunnelProtocolError as exc:
            raise DiskError(f"{self.path}: the node answered garbage: {exc}") from None

    async def checked(self, what: str, cdb: bytes, data_out: bytes = b"",
                      data_in_bytes: int = 0) -> bytes:
        """`execute`, retrying unit attentions; ScsiError unless it ends GOOD; the data-in."""
        for _ in range(UNIT_ATTENTION_RETRIES):
            response = await self.execute(cdb, data_out, data_in_bytes)
            if sense_key(response) is not SenseKey.UNIT_ATTENTION:
                break
        if response.status != Status.GOOD:
            raise ScsiError(what, response)
        return bytes(response.data_in)  # a copy, for callers that keep it

    # -- medium ----------------------------------------------------------------------------
    async def capacity(self) -> tuple[int, int]:
        """(block count, block size in bytes)."""
        data = await self.checked("READ CAPACITY", cdbs.read_capacity16(),
                                  data_in_bytes=cdbs.READ_CAPACITY16_ALLOCATION_BYTES)
        return cdbs.parse_read_capacity16(data)

    async def read(self, lba: int, block_count: int) -> bytes:
        return await self.checked("READ", cdbs.read16(lba, block_count),
                                  data_in_bytes=block_count * SECTOR_SIZE)

    async def write(self, lba: int, data: bytes, fua: bool = False) -> None:
        await self.checked("WRITE", cdbs.write16(lba, len(data) // SECTOR_SIZE, fua), data)

    async def flush(self) -> None:
        await self.checked("SYNCHRONIZE CACHE", cdbs.synchronize_cache16())

    # -- persistent reservations -------------------------------------------------------------
    async def read_keys(self) -> Keys:
        data = await self.checked("READ KEYS", cdbs.pr_in(PrInAction.READ_KEYS),
                                  data_in_bytes=cdbs.PR_IN_ALLOCATION_BYTES)
        return cdbs.parse_read_keys(data)

    async def read_reservation(self) -> ReservationInfo:
        data = await self.checked("READ RESERVATION", cdbs.pr_in(PrInAction.READ_RESERVATION),
                                  data_in_bytes=cdbs.PR_IN_ALLOCATION_BYTES)
        return cdbs.parse_read_reservation(data)

    async def register(self, key: int, old_key: int = 0, *, ignore_existing: bool = False,
                       aptpl: bool = False) -> None:
        """Register `key` (0 unregisters); `old_key` is the key registered now, if any."""
        action = PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY if ignore_existing \
            else PrOutAction.REGISTER
        await self._pr_out("REGISTER", action, None, old_key, key, aptpl)

    async def reserve(self, key: int, pr_type: PrType) -> None:
        await self._pr_out("RESERVE", PrOutAction.RESERVE, pr_type, key)

    async def release(self, key: int, pr_type: PrType) -> None:
        await self._pr_out("RELEASE", PrOutAction.RELEASE, pr_type, key)

    async def clear(self, key: int) -> None:
        await self._pr_out("CLEAR", PrOutAction.CLEAR, None, key)

    async def preempt(self, key: int, victim_key: int, pr_type: PrType, *,
                      abort: bool = False) -> None:
        action = PrOutAction.PREEMPT_AND_ABORT if abort else PrOutAction.PREEMPT
        await self._pr_out("PREEMPT", action, pr_type, key, victim_key)

    async def _pr_out(self, what: str, action: PrOutAction, pr_type: PrType | None, key: int,
                      service_action_key: int = 0, aptpl: bool = False) -> None:
        await self.checked(what, cdbs.pr_out(action, pr_type),
                           cdbs.pr_out_parameters(key, service_action_key, aptpl))
