"""The iSCSI front end's trio driver: sockets in, core events, `ScsiBackend` calls out.

Each accepted connection is one session of one initiator.  One task reads the initiator's
bytes and feeds the sans-IO core; every `ScsiCommand` runs in its own task (initiators
pipeline up to the CmdSN window, and answers may go back in any order), at most
`MAX_RUNNING` at a time per connection: the reader stops reading while that many run,
which is the back pressure on an initiator that sends faster than the disk answers.
Whatever the core has to send goes out under one lock, after each round of events and
after each answer.

The backend is called with the initiator's iSCSI name, unchanged: it is the reservation
identity.  `BackendError` becomes CHECK CONDITION, NOT READY (04h/00h) with one log line;
the connection survives.  Only LUN 0 exists: INQUIRY of another LUN answers peripheral
qualifier 3 (no device), REQUEST SENSE answers LOGICAL UNIT NOT SUPPORTED, REPORT LUNS
goes to the backend, anything else is CHECK CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT
SUPPORTED (25h/00h).  Task management: ABORT TASK answers FUNCTION COMPLETE once the task
is gone (a running command is waited for and its answer dropped) or TASK DOES NOT EXIST;
ABORT TASK SET, LOGICAL UNIT RESET and TARGET WARM RESET abort this session's commands
the same way; other functions are FUNCTION NOT SUPPORTED.  A protocol error or an
initiator that hangs up ends that connection only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from clusterfs.pieces import Buffer
from vhdshare.frontend import BackendError, ScsiBackend
from vhdshare.iscsi import IscsiTargetConnection, State
from vhdshare.iscsi_wire import (
    ConnectionClosed,
    Event,
    IscsiProtocolError,
    LoginComplete,
    LoginRejected,
    NeedData,
    ScsiCommand,
    TaskManagement,
    TmfFunction,
    TmfResponse,
)
from vhdshare.scsi import (
    INTERNAL_TARGET_FAILURE,
    LOGICAL_UNIT_NOT_SUPPORTED,
    Asc,
    Opcode,
    SenseKey,
    Status,
    sense,
)
from vhdshare.scsi_inquiry import standard_inquiry

log = logging.getLogger(__name__)

MAX_RUNNING = 64  # commands executing at once per connection (the CmdSN window is 32)
RECEIVE_BYTES = 1 << 20
DEFAULT_PORTAL_GROUP_TAG = 1
LOGICAL_UNIT_NOT_READY: Asc = (0x04, 0x00)  # cause not reportable
NO_DEVICE = 0x7F  # peripheral qualifier 3, device type 1Fh: no logical unit here
_FINISHED = frozenset({State.LOGGED_OUT, State.LOGIN_FAILED, State.CLOSED, State.ERROR})
_RESETS = frozenset({TmfFunction.ABORT_TASK_SET, TmfFunction.LOGICAL_UNIT_RESET,
                     TmfFunction.TARGET_WARM_RESET})

Answer = tuple[int, bytes, Buffer]  # status, sense, data-in


async def serve_iscsi(listeners: Sequence[trio.abc.Listener[Any]],
                      targets: Mapping[str, ScsiBackend], *, portal: str | None = None,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve each target (iSCSI name → its disk, LUN 0) on the listeners until cancelled.

    `portal` ("HOST:PORT,TAG") is what SendTargets answers; by default, the address the
    initiator connected to, with portal group tag 1."""
    if not targets:
        raise ValueError("no iSCSI target to serve")

    async def handle(stream: trio.abc.Stream) -> None:
        connection = IscsiConnection(stream, targets, portal or portal_of(stream))
        try:
            await connection.run()
        except Exception:  # a bug must not take the other sessions down
            log.exception("iSCSI %s: connection failed", connection.peer)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(trio.serve_listeners, handle, [listener])
        task_status.started()


def portal_of(stream: trio.abc.Stream, tag: int = DEFAULT_PORTAL_GROUP_TAG) -> str:
    """"HOST:PORT,TAG" of the local end of a TCP stream (what the initiator reached)."""
    if not isinstance(stream, trio.SocketStream):
        return f"127.0.0.1:3260,{tag}"
    host, port = stream.socket.getsockname()[:2]
    return f"[{host}]:{port},{tag}" if ":" in host else f"{host}:{port},{tag}"


def _peer(stream: trio.abc.Stream) -> str:
    if not isinstance(stream, trio.SocketStream):
        return "peer"
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "peer"
    return f"{host}:{port}"


class IscsiConnection:
    """One initiator connection: the core, the commands in flight, the socket."""

    def __init__(self, stream: trio.abc.Stream, targets: Mapping[str, ScsiBackend],
                 portal: str) -> None:
        self.stream = stream
        self.targets = targets
        self.core = IscsiTargetConnection(tuple(targets), portal)
        self.peer = _peer(stream)
        self.initiator = ""
        self.backend: ScsiBackend | None = None
        self._running: dict[int, trio.Event] = {}  # task tag → set when its call returns
        self._slots = trio.Semaphore(MAX_RUNNING)
        self._send_lock = trio.StrictFIFOLock()
        self._cancel = trio.CancelScope()

    async def run(self) -> None:
        """Serve the connection until logout, hang-up or a protocol error; then close."""
        async with self.stream:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    try:
                        await self._receive_loop(nursery)
                    except IscsiProtocolError as exc:
                        log.warning("iSCSI %s (%s): protocol error, connection closed: %s",
                                    self.peer, self.initiator or "not logged in", exc)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    nursery.cancel_scope.cancel()  # answers to a closed connection go nowhere

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        while True:
            event = self.core.next_event()
            if isinstance(event, NeedData):
                await self._flush()
                if self.core.state in _FINISHED:
                    return  # logged out, or login failed: the answer is sent, hang up
                data = await self.stream.receive_some(RECEIVE_BYTES)
                self.core.receive_data(bytes(data))
            elif isinstance(event, ConnectionClosed):
                return
            else:
                await self._handle(event, nursery)

    async def _handle(self, event: Event, nursery: trio.Nursery) -> None:
        if isinstance(event, ScsiCommand):
            if not self._slots.value:
                await self._flush()  # R2Ts and other answers must not wait for a free slot
            await self._slots.acquire()
            nursery.start_soon(self._run_command, event)
        elif isinstance(event, TaskManagement):
            nursery.start_soon(self._task_management, event)
        elif isinstance(event, LoginComplete):
            self.initiator = event.initiator_name
            self.backend = self.targets.get(event.target_name)
            log.info("iSCSI %s: %s logged in to %s", self.peer, event.initiator_name,
                     event.target_name or "discovery")
        elif isinstance(event, LoginRejected):
            log.info("iSCSI %s: login refused: %s", self.peer, event.reason)
        # LogoutRequested: the core answers it once every command is answered

    async def _flush(self) -> None:
        try:
            async with self._send_lock:
                data = self.core.data_to_send()
                if data:
                    await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._cancel.cancel()
            return
        if self.core.state in _FINISHED:
            self._cancel.cancel()  # the Logout Response went out after the last answer

    # --- commands ---------------------------------------------------------------------------

    async def _run_command(self, event: ScsiCommand) -> None:
        done = trio.Event()
        self._running[event.task_tag] = done
        try:
            status, sense_data, data_in = await self._execute(event)
            self.core.send_scsi_response(event.task_tag, status, sense_data, data_in)
        finally:
            if self._running.get(event.task_tag) is done:
                del self._running[event.task_tag]
            done.set()
            self._slots.release()
        await self._flush()

    async def _execute(self, event: ScsiCommand) -> Answer:
        if event.lun != 0:
            answer = other_lun_answer(event.cdb)
            if answer is not None:
                return answer
        assert self.backend is not None  # commands come only in a normal session
        try:
            result = await self.backend.execute(self.initiator, event.cdb, event.data_out,
                                                event.data_in_bytes)
        except BackendError as exc:
            log.warning("iSCSI %s: %s; answered NOT READY", self.initiator, exc)
            return _check_condition(SenseKey.NOT_READY, LOGICAL_UNIT_NOT_READY)
        except Exception:
            log.exception("iSCSI %s: command %s failed", self.initiator, event.cdb[:1].hex())
            return _check_condition(SenseKey.HARDWARE_ERROR, INTERNAL_TARGET_FAILURE)
        return result.status, result.sense, result.data_in

    # --- task management ----------------------------------------------------------------------

    async def _task_management(self, event: TaskManagement) -> None:
        response, running = self._abort_for(event)
        for done in running:
            await done.wait()  # a task is aborted once its call has returned
        self.core.send_task_management_response(event.task_tag, response)
        await self._flush()

    def _abort_for(self, event: TaskManagement) -> tuple[TmfResponse, list[trio.Event]]:
        """Abort what the function asks for: (response, calls still running to wait for)."""
        if event.function == TmfFunction.ABORT_TASK:
            tag = event.referenced_task_tag
            if not self.core.abort_task(tag):
                return TmfResponse.TASK_DOES_NOT_EXIST, []
            running = self._running.get(tag)
            return TmfResponse.FUNCTION_COMPLETE, [running] if running is not None else []
        if event.function in _RESETS:
            if event.lun != 0 and event.function != TmfFunction.TARGET_WARM_RESET:
                return TmfResponse.LUN_DOES_NOT_EXIST, []
            for tag in self.core.task_tags:
                self.core.abort_task(tag)
            return TmfResponse.FUNCTION_COMPLETE, list(self._running.values())
        return TmfResponse.FUNCTION_NOT_SUPPORTED, []


def other_lun_answer(cdb: bytes) -> Answer | None:
    """The answer to a command for a LUN other than 0, or None to let the backend answer."""
    opcode = cdb[0] if cdb else -1
    if opcode == Opcode.REPORT_LUNS:
        return None
    if opcode == Opcode.INQUIRY and len(cdb) >= 5 and not cdb[1] & 1:
        data = bytes([NO_DEVICE]) + standard_inquiry()[1:]
        return Status.GOOD, b"", data[: int.from_bytes(cdb[3:5], "big")]
    if opcode == Opcode.REQUEST_SENSE and len(cdb) >= 5:
        data = sense(SenseKey.ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED).pack()
        return Status.GOOD, b"", data[: cdb[4]]
    return _check_condition(SenseKey.ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED)


def _check_condition(key: SenseKey, code: Asc) -> Answer:
    return Status.CHECK_CONDITION, sense(key, code).pack(), b""
