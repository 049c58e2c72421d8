"""A shared disk in the cluster as the front ends' `ScsiBackend`: one tunnel session per initiator.

Every initiator that sends commands (the attachment's `--initiator` for NBD, each iSCSI
initiator by its name) gets its own `RemoteDisk`: its own file-protocol session, routed by
lb from a session id that names the initiator and the disk, so each VM's commands reach the
node's target under the VM's own reservation identity and fail over on their own. Sessions
are opened on first use, each kept by a task of the backend's nursery (a trio context
manager must end in the task that entered it), and closed when the nursery ends.
"""

from __future__ import annotations

import logging

import trio

from clusterfs.credentials import Credentials
from vhdshare.frontend import BackendError, ScsiAnswer
from vhdshare.host import DiskError, RemoteDisk

log = logging.getLogger(__name__)


class ClusterBackend:
    def __init__(self, nursery: trio.Nursery, cluster: list[str], credentials: Credentials,
                 path: str, route_timeout_s: float) -> None:
        self.path = path
        self._nursery = nursery
        self._cluster = cluster
        self._credentials = credentials
        self._route_timeout_s = route_timeout_s
        self._disks: dict[str, RemoteDisk] = {}
        self._attaching: dict[str, trio.Lock] = {}

    async def execute(self, initiator: str, cdb: bytes, data_out: bytes,
                      data_in_bytes: int) -> ScsiAnswer:
        disk = self._disks.get(initiator) or await self.attach(initiator)
        try:
            return await disk.execute(cdb, data_out, data_in_bytes)
        except DiskError as exc:
            raise BackendError(str(exc)) from None

    async def attach(self, initiator: str) -> RemoteDisk:
        """`initiator`'s session with the disk open, opened now if it is not yet."""
        async with self._attaching.setdefault(initiator, trio.Lock()):
            disk = self._disks.get(initiator)
            if disk is None:
                try:
                    disk = await self._nursery.start(self._keep, initiator)
                except DiskError as exc:
                    raise BackendError(str(exc)) from None
            return disk

    def node_of(self, initiator: str) -> str | None:
        disk = self._disks.get(initiator)
        return None if disk is None else disk.node

    async def _keep(self, initiator: str,
                    task_status: trio.TaskStatus[RemoteDisk] = trio.TASK_STATUS_IGNORED) -> None:
        async with RemoteDisk.attach(self._cluster, self._credentials, self.path, initiator,
                                     session_id=f"vhdshare:{initiator}:{self.path}",
                                     route_timeout_s=self._route_timeout_s) as disk:
            self._disks[initiator] = disk
            log.info("%s attached for %s through node %s%s", self.path, initiator, disk.node,
                     " (local link)" if disk.client.local_link else "")
            try:
                task_status.started(disk)
                await trio.sleep_forever()
            finally:
                del self._disks[initiator]
