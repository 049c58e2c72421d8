"""The NBD front end's trio driver: sockets in, `NbdServerConnection` events, `NbdDisk` calls.

One task reads the client's bytes and feeds the sans-IO core; every request it yields runs
in its own task (NBD clients pipeline, and answers may go back in any order), at most
`MAX_IN_FLIGHT` at a time, which is the back pressure on a client that sends faster than
the disk answers; one task sends what the core has to send. A protocol error or a client
that hangs up ends that connection only. Exports are named by the disk's cluster path, and
the first disk is also the default export (""). Names are the disks' cluster paths without
the leading "/", so an NBD URI reads naturally: nbd+unix:///vms/disk.vhd?socket=...
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from vhdshare.nbd import NbdServerConnection
from vhdshare.nbd_disk import NbdDisk, NbdRequestError
from vhdshare.nbd_wire import (
    BlockStatusRequest,
    ConnectionClosed,
    Disconnect,
    Export,
    FlushRequest,
    NbdProtocolError,
    NeedData,
    OptionGo,
    ReadRequest,
    Request,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 32
RECEIVE_BYTES = 1 << 20
SEND_BUFFER_BYTES = 4 << 20
PREFERRED_BLOCK_BYTES = 4096
MAX_REQUEST_BYTES = 32 << 20  # what qemu and libnbd use as their own limit


def exports_for(disks: Mapping[str, NbdDisk]) -> dict[str, Export]:
    exports = {export_name(name): Export(disk.size_bytes, multi_conn=True, description=name,
                            min_block_bytes=disk.block_bytes,
                            preferred_block_bytes=max(PREFERRED_BLOCK_BYTES, disk.block_bytes),
                            max_block_bytes=MAX_REQUEST_BYTES)
               for name, disk in disks.items()}
    if disks:
        exports[""] = exports[export_name(next(iter(disks)))]
    return exports


def export_name(path: str) -> str:
    return path.lstrip("/")


async def serve_nbd(listeners: Sequence[trio.abc.Listener[Any]], disks: Mapping[str, NbdDisk],
                    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    exports = exports_for(disks)
    by_export = {export_name(path): disk for path, disk in disks.items()}
    by_export[""] = next(iter(disks.values()))

    async def handle(stream: trio.abc.Stream) -> None:
        if isinstance(stream, trio.SocketStream):
            # A unix socket's default buffer (208 KiB) takes a 1 MiB read reply in five
            # rounds of waking the client; the kernel caps this at net.core.wmem_max.
            with contextlib.suppress(OSError):
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        await NbdConnection(stream, exports, by_export).run()

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(trio.serve_listeners, handle, [listener])
        task_status.started()


class NbdConnection:
    def __init__(self, stream: trio.abc.Stream, exports: Mapping[str, Export],
                 disks: Mapping[str, NbdDisk]) -> None:
        self.stream = stream
        self.core = NbdServerConnection(exports)
        self.disks = disks
        self.disk: NbdDisk | None = None
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._wake = trio.Event()
        self._receiving = True

    async def run(self) -> None:
        """Serve the connection until the client leaves or breaks the protocol."""
        async with self.stream, trio.open_nursery() as nursery:
            nursery.start_soon(self._send_loop, nursery)
            try:
                await self._receive_loop(nursery)
            except NbdProtocolError as exc:
                log.warning("NBD client dropped: %s", exc)
                nursery.cancel_scope.cancel()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                nursery.cancel_scope.cancel()
            finally:
                self._receiving = False
                self._wake.set()

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        while True:
            event = self.core.next_event()
            self._wake.set()  # negotiation replies and refusals the core wrote itself
            if isinstance(event, NeedData):
                data = await self.stream.receive_some(RECEIVE_BYTES)
                self.core.receive_data(bytes(data))
            elif isinstance(event, OptionGo):
                self.disk = self.disks[event.export_name]
            elif isinstance(event, Disconnect):
                return  # the nursery waits for the requests in flight, then the send loop
            elif isinstance(event, ConnectionClosed):
                nursery.cancel_scope.cancel()
                return
            else:
                await self._slots.acquire()
                nursery.start_soon(self._answer, event)

    async def _send_loop(self, nursery: trio.Nursery) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            chunks = self.core.chunks_to_send()
            if chunks:
                try:
                    for chunk in chunks:
                        await self.stream.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    nursery.cancel_scope.cancel()
                    return
            elif not self._receiving and not self.core.outstanding:
                return

    async def _answer(self, request: Request) -> None:
        assert self.disk is not None  # requests come only after OptionGo
        try:
            await self._execute(self.disk, request)
        except NbdRequestError as exc:
            log.info("NBD request failed: %s", exc)
            self.core.send_error(request.handle, exc.code, str(exc))
        finally:
            self._slots.release()
            self._wake.set()

    async def _execute(self, disk: NbdDisk, request: Request) -> None:
        core = self.core
        match request:
            case ReadRequest(handle, offset, length):
                core.send_read_reply(handle, await disk.read(offset, length))
            case WriteRequest(handle, offset, data, fua):
                await disk.write(offset, data, fua)
                core.send_ok(handle)
            case FlushRequest(handle):
                await disk.flush()
                core.send_ok(handle)
            case TrimRequest(handle, offset, length, fua):
                await disk.trim(offset, length, fua)
                core.send_ok(handle)
            case WriteZeroesRequest(handle, offset, length, fua, no_hole):
                await disk.write_zeroes(offset, length, fua, no_hole)
                core.send_ok(handle)
            case BlockStatusRequest(handle, offset, length):
                core.send_block_status(handle, await disk.block_status(offset, length))
