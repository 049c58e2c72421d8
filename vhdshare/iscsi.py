"""The iSCSI target connection state machine: `IscsiTargetConnection` and its state table, sans-IO.

Theory of operation, in the manner of h11 and `vhdshare.nbd` (bytes in, events out): the
core is fed the initiator's bytes in arbitrary chunks with `receive_data` (b"" means end
of stream), hands out typed events with `next_event`, and collects everything the target
must send, which the driver takes with `data_to_send` after each round of events.  One
TCP connection is one session (MaxConnections=1, ErrorRecoveryLevel=0, no digests).

    login:         Login Requests (security and operational stages, AuthMethod=None only)
                   → `LoginComplete`, or a failure status → `LoginRejected`
    full feature:  SCSI Command (+ immediate data, unsolicited Data-Out, R2T-solicited
                   Data-Out) → `ScsiCommand` once all its data-out is here;
                   Task Management → `TaskManagement`; Logout → `LogoutRequested`

The core answers by itself: login negotiation (RFC 7143 section 13 rules, in
`vhdshare.iscsi_keys.negotiate`), Text Requests (SendTargets), NOP-Out pings, R2Ts, the
Logout Response (once every command is answered), and Reject PDUs for PDUs it cannot
accept.  The driver answers each `ScsiCommand` exactly once, in any order, with
`send_scsi_response` (Data-In PDUs cut to the initiator's MaxRecvDataSegmentLength and
MaxBurstLength, GOOD status collapsed into the last one, residuals against the expected
transfer length), each `TaskManagement` with `send_task_management_response`, and may
`abort_task` a command (its answer is then dropped).

CmdSN window: a non-immediate command must carry ExpCmdSN (anything else is ignored, as
RFC 7143 4.2.2.1 says); MaxCmdSN grows by one when such a command is answered, so at most
`cmd_window` of them are in flight, which is the back pressure on the initiator.

Framing states and transitions are in one table, `_TRANSITIONS`.  Bytes that break the
protocol raise `IscsiProtocolError` and leave the connection broken; data-out that breaks
only its command's data flow (DataSN, buffer offset, amount) ends that command in CHECK
CONDITION (RFC 7143 11.4.7.2) instead.  A caller that misuses the answer methods gets
`IscsiProtocolError` without breaking the connection.  No other exception escapes for any
input bytes.  The wire format is in `vhdshare.iscsi_wire`, the rules a command's data-out
must follow in `vhdshare.iscsi_dataout`.
"""

from __future__ import annotations

import enum
import itertools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from clusterfs.pieces import Buffer
from vhdshare import iscsi_keys as keys
from vhdshare import iscsi_wire as wire
from vhdshare.iscsi_dataout import DataOutError, R2t, Task
from vhdshare.iscsi_wire import (
    FINAL,
    IMMEDIATE,
    NEED_DATA,
    RESERVED_TAG,
    ConnectionClosed,
    Event,
    IscsiProtocolError,
    LoginComplete,
    LoginRejected,
    LoginRequest,
    LogoutRequested,
    NeedData,
    Opcode,
    RejectReason,
    ScsiCommand,
    TaskManagement,
)
from vhdshare.scsi import (
    INVALID_COMMAND_OPERATION_CODE,
    INVALID_FIELD_IN_CDB,
    Asc,
    SenseKey,
    Status,
    sense,
)

OUR_MAX_RECV_DATA_SEGMENT_BYTES = 262144
DEFAULT_CMD_WINDOW = 32
DEFAULT_MAX_DATA_OUT_BYTES = 32 << 20  # longer writes are refused before their data comes
INITIAL_STAT_SN = 1
_U32 = struct.Struct(">I")
_tsih_counter = itertools.count()


def _fail(message: str) -> IscsiProtocolError:
    return IscsiProtocolError(message)


# --- the one state table --------------------------------------------------------------------


class State(enum.Enum):
    LOGIN = "login phase"
    FULL_FEATURE = "full feature phase"
    LOGGING_OUT = "logout requested"  # the Logout Response waits for the answers in flight
    LOGGED_OUT = "logged out"  # the Logout Response is queued: close after sending
    LOGIN_FAILED = "login failed"  # a failed Login Response is queued: close after sending
    CLOSED = "closed"
    ERROR = "error"


class Input(enum.Enum):
    LOGIN_STEP = "login request answered"
    LOGIN_DONE = "login to full feature phase"
    LOGIN_REJECTED = "login failed"
    PDU = "full feature PDU"
    LOGOUT = "logout request"
    LOGOUT_ANSWERED = "logout response queued"
    EOF = "end of stream"
    INVALID = "protocol violation"


_TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.LOGIN, Input.LOGIN_STEP): State.LOGIN,
    (State.LOGIN, Input.LOGIN_DONE): State.FULL_FEATURE,
    (State.LOGIN, Input.LOGIN_REJECTED): State.LOGIN_FAILED,
    (State.LOGIN, Input.EOF): State.CLOSED,
    (State.FULL_FEATURE, Input.PDU): State.FULL_FEATURE,
    (State.FULL_FEATURE, Input.LOGOUT): State.LOGGING_OUT,
    (State.FULL_FEATURE, Input.EOF): State.CLOSED,
    (State.LOGGING_OUT, Input.LOGOUT_ANSWERED): State.LOGGED_OUT,
    (State.LOGGING_OUT, Input.EOF): State.CLOSED,
    (State.LOGGED_OUT, Input.EOF): State.CLOSED,
    (State.LOGIN_FAILED, Input.EOF): State.CLOSED,
}  # anything else, INVALID included, leads to ERROR
_QUIET = frozenset({State.LOGGING_OUT, State.LOGGED_OUT, State.LOGIN_FAILED})


@dataclass(slots=True)
class _Login:
    stage: int | None = None  # the stage the next Login Request must be in
    isid: bytes = b""
    cid: int = 0
    declared: bool = False
    logout: tuple[int, bool] | None = None  # (ITT, immediate) of the Logout Request


class IscsiTargetConnection:
    """The target side of one iSCSI connection (= one session)."""

    def __init__(self, target_name: str | Sequence[str], portal: str, *, target_alias: str = "",
                 tsih: int | None = None,
                 max_recv_data_segment_bytes: int = OUR_MAX_RECV_DATA_SEGMENT_BYTES,
                 cmd_window: int = DEFAULT_CMD_WINDOW,
                 max_data_out_bytes: int = DEFAULT_MAX_DATA_OUT_BYTES) -> None:
        """`target_name`: the target, or all targets of the portal; `portal`: "HOST:PORT,TAG"."""
        self.target_names = (target_name,) if isinstance(target_name, str) else tuple(target_name)
        self.portal = portal
        self.portal_group_tag = int(portal.rpartition(",")[2] or 1) if "," in portal else 1
        self.target_alias = target_alias
        self.tsih = tsih if tsih is not None else next(_tsih_counter) % 0xFFFF + 1
        self.max_recv_data_segment_bytes = max_recv_data_segment_bytes
        self.cmd_window = cmd_window
        self.max_data_out_bytes = max_data_out_bytes
        self.state = State.LOGIN
        self.params = keys.SessionParams()
        self.initiator_name = self.session_type = self.target_name = ""
        self._login = _Login()
        self._buffer = bytearray()
        self._eof = False
        self._out: list[bytes | memoryview] = []
        self._stat_sn = INITIAL_STAT_SN
        self._exp_cmd_sn = self._max_cmd_sn = 0
        self._tasks: dict[int, Task] = {}
        self._aborted: set[int] = set()  # emitted commands whose answer is to be dropped
        self._tmfs: dict[int, bool] = {}  # task management requests in flight: immediate?
        self._ttts = itertools.count(1)

    @property
    def task_tags(self) -> frozenset[int]:
        """The commands in flight: receiving data-out, or handed out and not yet answered."""
        return frozenset(self._tasks)

    def _move(self, event: Input) -> None:
        self.state = _TRANSITIONS.get((self.state, event), State.ERROR)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if self.state is State.ERROR:
            raise _fail("the connection is broken")
        if self._eof:
            self._move(Input.INVALID)
            raise _fail("data after the end of the stream")
        if not data:
            self._eof = True
            return
        self._buffer += data

    def next_event(self) -> Event | NeedData:
        while True:
            if self.state is State.ERROR:
                raise _fail("the connection is broken")
            if self.state is State.CLOSED:
                return ConnectionClosed()
            try:
                event = self._step()
            except IscsiProtocolError:
                self._move(Input.INVALID)
                raise
            if event is not None:
                return event

    # --- framing ----------------------------------------------------------------------------

    def _step(self) -> Event | NeedData | None:
        if not self._buffer and self._eof:
            self._move(Input.EOF)  # a clean end between PDUs
            return None
        if self.state in _QUIET:
            if self._buffer:
                raise _fail(f"a PDU after the {self.state.value}")
            return NEED_DATA
        if len(self._buffer) < wire.BHS_BYTES:
            return self._short("a basic header segment")
        ahs_bytes, data_bytes = wire.split_lengths(_U32.unpack_from(self._buffer, 4)[0])
        if data_bytes > self.max_recv_data_segment_bytes:
            raise _fail(f"a data segment of {data_bytes} bytes")
        start = wire.BHS_BYTES + ahs_bytes
        total = start + data_bytes + wire.padding(data_bytes)
        if len(self._buffer) < total:
            return self._short("a PDU")
        header = bytes(self._buffer[: wire.BHS_BYTES])
        ahs = bytes(self._buffer[wire.BHS_BYTES : start])
        with memoryview(self._buffer) as view:
            data = view[start : start + data_bytes]
            try:
                event = self._dispatch(header, ahs, data)
            finally:
                data.release()
        del self._buffer[:total]
        return event

    def _short(self, what: str) -> NeedData:
        if self._eof:
            raise _fail(f"the stream ends inside {what}")
        return NEED_DATA

    def _dispatch(self, header: bytes, ahs: bytes, data: memoryview) -> Event | None:
        opcode = header[0] & wire.OPCODE_MASK
        if self.state is State.LOGIN:
            if opcode != Opcode.LOGIN_REQUEST:
                raise _fail(f"opcode {opcode:#x} during login")
            return self._on_login(LoginRequest.parse(header), bytes(data))
        self._move(Input.PDU)
        handler = _HANDLERS.get(opcode)
        if handler is not None:
            return handler(self, header, ahs, data)
        known = opcode in (Opcode.LOGIN_REQUEST, Opcode.SNACK_REQUEST)
        return self._reject(RejectReason.PROTOCOL_ERROR if known
                            else RejectReason.COMMAND_NOT_SUPPORTED, header)

    # --- sequence numbers ------------------------------------------------------------------

    def _admit(self, header: bytes) -> bool:
        """Take a command's CmdSN; False: outside the window or a duplicate, to be ignored."""
        if header[0] & IMMEDIATE:
            return True
        (cmd_sn,) = _U32.unpack_from(header, 24)
        if cmd_sn != self._exp_cmd_sn or wire.serial_after(cmd_sn, self._max_cmd_sn):
            return False
        self._exp_cmd_sn = (cmd_sn + 1) & wire.SERIAL_MASK
        return True

    def _free_slot(self, immediate: bool) -> None:
        if not immediate:
            self._max_cmd_sn = (self._max_cmd_sn + 1) & wire.SERIAL_MASK

    def _sns(self, advance: bool = True) -> tuple[int, int, int]:
        """StatSN (taken if `advance`), ExpCmdSN and MaxCmdSN for a target PDU."""
        stat_sn = self._stat_sn
        if advance:
            self._stat_sn = (stat_sn + 1) & wire.SERIAL_MASK
        return stat_sn, self._exp_cmd_sn, self._max_cmd_sn

    def _queue(self, header: bytes, data: bytes | memoryview = b"") -> None:
        self._out.append(header)
        if len(data):
            self._out += (data, bytes(wire.padding(len(data))))

    def _reject(self, reason: RejectReason, header: bytes,
                immediate: bool | None = None) -> Event | None:
        """Queue a Reject (no event); `immediate` is given for a command that took a CmdSN."""
        if immediate is not None:
            self._free_slot(immediate)
        lengths = wire.pack_lengths(len(header))
        self._queue(wire.REJECT.pack(Opcode.REJECT, FINAL, reason, 0, lengths, b"", RESERVED_TAG,
                                     b"", *self._sns(), 0, b""), header)
        return None

    # --- login -------------------------------------------------------------------------------

    def _on_login(self, request: LoginRequest, data: bytes) -> Event | None:
        self._exp_cmd_sn = request.cmd_sn  # the login is immediate: this is the first CmdSN
        self._max_cmd_sn = (request.cmd_sn + self.cmd_window - 1) & wire.SERIAL_MASK
        try:
            answers = self._login_answers(request, data)
        except keys.LoginFailure as failure:
            self._login_response(request, b"", failure.status)
            self._move(Input.LOGIN_REJECTED)
            return LoginRejected(failure.status, str(failure))
        self._login_response(request, keys.encode_text(answers), wire.LoginStatus.SUCCESS)
        if not (request.transit and request.nsg == wire.Stage.FULL_FEATURE):
            self._move(Input.LOGIN_STEP)
            return None
        params = self.params
        params.first_burst_length = min(params.first_burst_length, params.max_burst_length)
        self._move(Input.LOGIN_DONE)
        return LoginComplete(self.initiator_name, self.session_type, self.target_name,
                             self._login.isid, self.tsih)

    def _login_answers(self, request: LoginRequest, data: bytes) -> list[tuple[str, str]]:
        keys.check_login_request(request, self._login.stage)
        try:
            offered = keys.decode_text(data)
        except wire.TextError as error:
            raise keys.LoginFailure(wire.LoginStatus.INITIATOR_ERROR, str(error)) from None
        first = self._login.stage is None
        if first:
            self.initiator_name, self.session_type, self.target_name = \
                keys.leading_keys(request, offered, self.target_names)
            self._login.isid, self._login.cid = request.isid, request.cid
        answers = [answer for key, value in offered
                   if (answer := keys.answer_login_key(key, value, self.params)) is not None]
        answers += self._declarations(request.csg, first)
        self._login.stage = request.nsg if request.transit else request.csg
        return answers

    def _declarations(self, csg: int, first: bool) -> list[tuple[str, str]]:
        declared = []
        if first and self.session_type == "Normal":
            declared.append(("TargetPortalGroupTag", str(self.portal_group_tag)))
            if self.target_alias:
                declared.append(("TargetAlias", self.target_alias))
        if csg == wire.Stage.OPERATIONAL and not self._login.declared:
            declared.append(("MaxRecvDataSegmentLength", str(self.max_recv_data_segment_bytes)))
            self._login.declared = True
        return declared

    def _login_response(self, request: LoginRequest, data: bytes, status: wire.LoginStatus) -> None:
        success = status is wire.LoginStatus.SUCCESS
        transit = request.transit and success
        flags = (wire.LoginFlag.TRANSIT | request.nsg if transit else 0) | \
            (request.csg << 2 if success else 0)
        tsih = self.tsih if transit and request.nsg == wire.Stage.FULL_FEATURE else 0
        self._queue(wire.LOGIN_RESPONSE.pack(
            Opcode.LOGIN_RESPONSE, flags, wire.ISCSI_VERSION, wire.ISCSI_VERSION,
            wire.pack_lengths(len(data)), request.isid, tsih, request.itt, b"", *self._sns(),
            status >> 8, status & 0xFF, b""), data)

    # --- SCSI commands and their data-out ------------------------------------------------

    def _on_scsi_command(self, header: bytes, ahs: bytes, data: memoryview) -> Event | None:
        opcode, flags, _, _, lun, itt, expected_bytes, _, _, cdb = wire.SCSI_COMMAND.unpack(header)
        if not self._admit(header):
            return None
        immediate = bool(opcode & IMMEDIATE)
        if itt == RESERVED_TAG or itt in self._tasks:
            return self._reject(RejectReason.INVALID_PDU_FIELD, header, immediate)
        reading, writing = bool(flags & wire.CommandFlag.READ), bool(flags & wire.CommandFlag.WRITE)
        if self.session_type != "Normal" or (len(data) and not writing):
            return self._reject(RejectReason.PROTOCOL_ERROR, header, immediate)
        task = Task(itt, lun, wire.full_cdb(cdb, ahs), immediate,
                    flags & wire.CommandFlag.ATTRIBUTE_MASK, expected_bytes if reading else 0,
                    expected_bytes if writing else 0)
        self._tasks[itt] = task
        if reading and writing:  # bidirectional: no command the target knows is one
            return self._refuse(task, SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE)
        if task.write_bytes > self.max_data_out_bytes:
            return self._refuse(task, SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        try:
            if writing:
                task.start_write(self.params, bool(flags & wire.CommandFlag.FINAL), data)
        except DataOutError as error:
            return self._refuse(task, error.key, error.code)
        return self._progress(task)

    def _refuse(self, task: Task, key: SenseKey, code: Asc) -> Event | None:
        """Answer a command in the core (no event); data-out still coming for it is dropped."""
        task.emitted = True
        self.send_scsi_response(task.itt, Status.CHECK_CONDITION, sense(key, code).pack())
        return None

    def _progress(self, task: Task) -> ScsiCommand | None:
        """Hand the command out once its data-out is complete, else ask for more."""
        if task.received_bytes >= task.write_bytes:
            task.emitted = True
            return ScsiCommand(task.itt, task.lun, task.cdb, task.take_data(), task.read_bytes,
                               task.attribute)
        if not task.unsolicited_open and task.r2t is None:
            self._send_r2t(task)
        return None

    def _send_r2t(self, task: Task) -> None:
        offset = task.received_bytes
        length = min(self.params.max_burst_length, task.write_bytes - offset)
        task.r2t = R2t(next(self._ttts) % RESERVED_TAG, offset, length)
        self._queue(wire.R2T.pack(Opcode.R2T, FINAL, 0, 0, task.lun, task.itt, task.r2t.ttt,
                                  *self._sns(advance=False), task.r2t_count, offset, length))
        task.r2t_count += 1

    def _on_data_out(self, header: bytes, ahs: bytes, data: memoryview) -> Event | None:
        _, flags, _, _, _, itt, ttt, _, _, _, data_sn, offset, _ = wire.DATA_OUT.unpack(header)
        task = self._tasks.get(itt)
        if task is None or task.emitted:
            return None  # for an aborted or already answered command
        if ttt != RESERVED_TAG and (task.r2t is None or ttt != task.r2t.ttt):
            return self._reject(RejectReason.INVALID_PDU_FIELD, header)
        try:
            task.take_data_out(self.params, ttt, data_sn, offset, data)
            task.data_out_done(ttt, bool(flags & FINAL))
        except DataOutError as error:
            return self._refuse(task, error.key, error.code)
        return self._progress(task)

    # --- answers to commands -------------------------------------------------------------

    def send_scsi_response(self, task_tag: int, status: int, sense: bytes = b"",
                           data_in: Buffer = b"") -> None:
        """Answer a `ScsiCommand`: Data-In and/or a SCSI Response with residuals."""
        task = self._tasks.get(task_tag)
        if task is None and task_tag in self._aborted:
            self._aborted.discard(task_tag)
            return
        if task is None or not task.emitted:
            raise _fail(f"no command with task tag {task_tag:#x} awaits an answer")
        del self._tasks[task_tag]
        self._free_slot(task.immediate)
        flags, residual_bytes = wire.residual(task.read_bytes, len(data_in))
        data = memoryview(data_in)[: task.read_bytes]
        collapse = bool(len(data)) and status == Status.GOOD and not sense
        data_in_pdus = self._send_data_in(task, data, (flags, residual_bytes, status), collapse)
        if not collapse:
            payload = wire.SENSE_LENGTH.pack(len(sense)) + sense if sense else b""
            self._queue(wire.SCSI_RESPONSE.pack(
                Opcode.SCSI_RESPONSE, FINAL | flags, wire.ScsiResponseCode.COMPLETED_AT_TARGET,
                status, wire.pack_lengths(len(payload)), b"", task.itt, 0, *self._sns(),
                data_in_pdus + task.r2t_count, 0, residual_bytes), payload)
        self._finish_logout()

    def _send_data_in(self, task: Task, data: memoryview, outcome: tuple[int, int, int],
                      collapse: bool) -> int:
        """Data-In PDUs of at most MaxRecvDataSegmentLength in sequences of MaxBurstLength;
        with `collapse` the last carries the outcome (wire.residual flags, count and status)."""
        segment_bytes = self.params.max_recv_data_segment_length
        burst_bytes = self.params.max_burst_length
        offset, count = 0, 0
        while offset < len(data):
            end = min(offset + segment_bytes, len(data), (offset // burst_bytes + 1) * burst_bytes)
            last = end == len(data)
            flags = wire.DataInFlag.FINAL if last or end % burst_bytes == 0 else 0
            status_fields = (0, 0, 0, 0)  # flags, status, wire.residual count, StatSN
            if last and collapse:
                status_fields = (wire.DataInFlag.STATUS | outcome[0], outcome[2], outcome[1],
                                 self._sns()[0])
            self._queue(wire.DATA_IN.pack(
                Opcode.DATA_IN, flags | status_fields[0], 0, status_fields[1],
                wire.pack_lengths(end - offset), task.lun, task.itt, RESERVED_TAG, status_fields[3],
                self._exp_cmd_sn, self._max_cmd_sn, count, offset, status_fields[2]),
                data[offset:end])
            offset, count = end, count + 1
        return count

    def abort_task(self, task_tag: int) -> bool:
        """Forget a command in flight (its answer, if the driver still sends one, is dropped).
        False if there is no such command."""
        task = self._tasks.pop(task_tag, None)
        if task is None:
            return False
        if task.emitted:
            self._aborted.add(task_tag)
        self._free_slot(task.immediate)
        self._finish_logout()
        return True

    # --- the PDUs the core answers itself --------------------------------------------------

    def _on_nop_out(self, header: bytes, ahs: bytes, data: memoryview) -> None:
        opcode, _, _, _, lun, itt, _, _, _, _ = wire.NOP_OUT.unpack(header)
        if itt == RESERVED_TAG or not self._admit(header):
            return  # an answer to a ping of ours (we send none), or a ping wanting no answer
        self._free_slot(bool(opcode & IMMEDIATE))
        ping = bytes(data)
        self._queue(wire.NOP_IN.pack(Opcode.NOP_IN, FINAL, 0, wire.pack_lengths(len(ping)), lun,
                                     itt, RESERVED_TAG, *self._sns(), b""), ping)

    def _on_text(self, header: bytes, ahs: bytes, data: memoryview) -> Event | None:
        opcode, flags, _, _, lun, itt, ttt, _, _, _ = wire.TEXT_REQUEST.unpack(header)
        if not self._admit(header):
            return None
        immediate = bool(opcode & IMMEDIATE)
        try:
            if flags & wire.TEXT_CONTINUE or ttt != RESERVED_TAG:
                raise wire.TextError("multi-PDU text")
            pairs = keys.decode_text(bytes(data))
        except wire.TextError:
            return self._reject(RejectReason.PROTOCOL_ERROR, header, immediate)
        answers = []
        for key, value in pairs:
            answers += keys.send_targets(value, self.target_names, self.target_name, self.portal) \
                if key == "SendTargets" else [(key, "NotUnderstood")]
        self._free_slot(immediate)
        body = keys.encode_text(answers)
        self._queue(wire.TEXT_RESPONSE.pack(Opcode.TEXT_RESPONSE, FINAL, 0,
                                            wire.pack_lengths(len(body)), lun, itt, RESERVED_TAG,
                                            *self._sns(), b""), body)
        return None

    def _on_task_management(self, header: bytes, ahs: bytes, data: memoryview) -> Event | None:
        opcode, flags, _, _, lun, itt, referenced, _, _, referenced_cmd_sn, _, _ = \
            wire.TASK_MANAGEMENT_REQUEST.unpack(header)
        if not self._admit(header):
            return None
        immediate = bool(opcode & IMMEDIATE)
        if itt == RESERVED_TAG or itt in self._tmfs or self.session_type != "Normal":
            return self._reject(RejectReason.PROTOCOL_ERROR, header, immediate)
        self._tmfs[itt] = immediate
        return TaskManagement(itt, flags & 0x7F, referenced, lun, referenced_cmd_sn)

    def send_task_management_response(self, task_tag: int, response: int) -> None:
        if task_tag not in self._tmfs or response not in wire.TmfResponse._value2member_map_:
            raise _fail(f"no task management request {task_tag:#x} awaits answer {response}")
        self._free_slot(self._tmfs.pop(task_tag))
        self._queue(wire.TASK_MANAGEMENT_RESPONSE.pack(
            Opcode.TASK_MANAGEMENT_RESPONSE, FINAL, response, 0, 0, b"", task_tag, b"",
            *self._sns(), b""))
        self._finish_logout()

    def _on_logout(self, header: bytes, ahs: bytes, data: memoryview) -> Event | None:
        opcode, flags, _, _, _, itt, cid, _, _, _, _ = wire.LOGOUT_REQUEST.unpack(header)
        if not self._admit(header):
            return None
        immediate, reason = bool(opcode & IMMEDIATE), flags & 0x7F
        if reason == wire.LogoutReason.REMOVE_FOR_RECOVERY or (
                reason == wire.LogoutReason.CLOSE_CONNECTION and cid != self._login.cid):
            self._free_slot(immediate)
            self._logout_response(itt, wire.LogoutResponse.RECOVERY_NOT_SUPPORTED if reason
                                  == wire.LogoutReason.REMOVE_FOR_RECOVERY else
                                  wire.LogoutResponse.CID_NOT_FOUND)
            return None
        if reason not in (wire.LogoutReason.CLOSE_SESSION, wire.LogoutReason.CLOSE_CONNECTION):
            return self._reject(RejectReason.PROTOCOL_ERROR, header, immediate)
        for tag in [tag for tag, task in self._tasks.items() if not task.emitted]:
            del self._tasks[tag]  # still waiting for data-out: it never comes now
        self._login.logout = (itt, immediate)
        self._move(Input.LOGOUT)
        self._finish_logout()
        return LogoutRequested(reason)

    def _finish_logout(self) -> None:
        logout = self._login.logout
        if self.state is not State.LOGGING_OUT or self._tasks or self._tmfs or logout is None:
            return
        self._free_slot(logout[1])
        self._logout_response(logout[0], wire.LogoutResponse.SUCCESS)
        self._move(Input.LOGOUT_ANSWERED)

    def _logout_response(self, itt: int, response: wire.LogoutResponse) -> None:
        self._queue(wire.LOGOUT_RESPONSE.pack(Opcode.LOGOUT_RESPONSE, FINAL, response, 0, 0, b"",
                                              itt, b"", *self._sns(), b"", 0, 0, b""))


_Handler = Callable[[IscsiTargetConnection, bytes, bytes, memoryview], Event | None]
_HANDLERS: dict[int, _Handler] = {
    Opcode.SCSI_COMMAND: IscsiTargetConnection._on_scsi_command,
    Opcode.DATA_OUT: IscsiTargetConnection._on_data_out,
    Opcode.NOP_OUT: IscsiTargetConnection._on_nop_out,
    Opcode.TASK_MANAGEMENT_REQUEST: IscsiTargetConnection._on_task_management,
    Opcode.TEXT_REQUEST: IscsiTargetConnection._on_text,
    Opcode.LOGOUT_REQUEST: IscsiTargetConnection._on_logout,
}
