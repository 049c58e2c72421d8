"""The node's side of the file protocol: sessions routed by lb, calls run by `FileOps`.

Every session request reaches every node (the client sends it to all); this node's
`lb.balancer.Balancer` decides whether it answers, and the node that accepts keeps the
session: the client's calls go to it alone. Calls of one session run one at a time, in
the order they arrived: one that never waits (a read, a stat) is answered at once when
nothing of the session is queued; the others queue, and one task per session runs them.
TUNNEL calls are the exception: each is a disk command, and a VM's disk driver keeps many
in flight and expects no order among them (SCSI's simple task attribute), so up to
`MAX_CONCURRENT_TUNNELS` of a session run side by side when nothing is queued before them.
A session that hears nothing from its client for `SESSION_IDLE_S` is closed (its handles
too); clients ping while idle.

Clients are told when membership changes (`MembersChanged`, pushed to every client that
holds a session here or said Hello recently), so one whose node is gone or offline routes
its session anew at once instead of waiting for a timeout. An offline node accepts no
session and answers calls with ENOTCONN, which also makes the client re-route.

Errors are errnos in the `Result`; a message that cannot be read gets a `ProtocolFault`,
and nothing a client sends can stop the node (one error boundary: `_call`).
"""

from __future__ import annotations

import collections
import errno
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from clusterfs.namespace import NamespaceError
from clusterfs.pieces import Buffer, Payload
from clusterfs.protocol import messages as m
from clusterfs.protocol.ops import IMMEDIATE_OPS, FileOps
from lb import messages as lbm
from lb.balancer import Action, Balancer, BalancerConfig, Reply, Send
from lb.view import View

log = logging.getLogger(__name__)

SESSION_IDLE_S = 60.0  # clients ping every `client.PING_INTERVAL_S` while idle
MAX_CONCURRENT_TUNNELS = 32  # per session; more wait in the session's queue
WATCH_S = 60.0  # a client that said Hello this recently is told of membership changes
MAX_WATCHERS = 65_536
HOUSEKEEPING_INTERVAL_S = 5.0

SendTo = Callable[[str, bytes], None]  # (node name, payload)
SendClient = Callable[[str, Payload], None]  # (client identity, payload)


@dataclass(slots=True)
class Session:
    session_id: str
    client: str  # the client's transport identity: where its results go
    last_heard_s: float
    handles: set[int] = field(default_factory=set)
    # Calls that may wait run one after another from this queue, in one task at a time
    # (tasks started together run in no set order: one per call could reorder them).
    queue: collections.deque[m.Call] = field(default_factory=collections.deque)
    draining: bool = False
    tunnels_running: int = 0


class ProtocolServer:
    def __init__(self, name: str, ops: FileOps, send_client: SendClient, send_peer: SendTo,
                 incarnation: int, config: BalancerConfig | None = None) -> None:
        self.name = name
        self.ops = ops
        self.balancer = Balancer(name, config, incarnation)
        self.sessions: dict[str, Session] = {}
        self._send_client = send_client
        self._send_peer = send_peer
        self._watchers: dict[str, float] = {}  # client identity -> when last heard
        self._epoch = 0
        self._members: list[m.Member] = []
        self._deadline_changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    @property
    def serving(self) -> bool:
        return self.balancer.active and not self.ops.fs.offline_reason

    # -- membership ---------------------------------------------------------------------
    def on_view(self, epoch: int, members: list[m.Member]) -> None:
        """A new membership view was installed on this node."""
        self._epoch, self._members = epoch, members
        view = View.of(epoch, [member.name for member in members])
        self._perform(self.balancer.install_view(view, trio.current_time()))
        self.push()

    def push(self) -> None:
        """Tell the clients of this node the members now, and whether this node serves."""
        pushed = m.encode(m.MembersChanged(self.name, self._epoch, self._members, self.serving))
        for client in self._clients():
            self._send_client(client, pushed)

    def _clients(self) -> set[str]:
        return set(self._watchers) | {session.client for session in self.sessions.values()}

    # -- messages -------------------------------------------------------------------------
    def on_client(self, client: str, payload: Buffer) -> None:
        """A message from a client; the boundary for everything it can set off here."""
        try:
            self._on_client(client, payload)
        except Exception:
            log.exception("unexpected error handling a message from %s", client)
            self._send_client(client, m.encode(m.ProtocolFault("internal error")))

    def _on_client(self, client: str, payload: Buffer) -> None:
        try:
            message = m.decode_client(payload)
        except m.MessageError as exc:
            fault = m.ProtocolFault(f"unreadable message: {exc}"[:200], m.call_id_of(payload))
            self._send_client(client, m.encode(fault))
            return
        now_s = trio.current_time()
        match message:
            case m.Hello():
                self._watch(client, now_s)
                self._send_client(client, m.encode(m.HelloReply(
                    m.PROTOCOL_VERSION, self.name, self._epoch, self._members, self.serving)))
            case lbm.SessionRequest(request_id, client_id):
                self._watch(client, now_s)
                if self.serving:  # the reply must go to the identity that asked
                    request = lbm.SessionRequest(request_id, client_id, client)
                    self._perform(self.balancer.on_request(request, now_s))
                    self._deadline_changed.set()
            case m.Call():
                self._on_call(client, message, now_s)
            case m.CloseSession(session_id):
                session = self.sessions.get(session_id)
                if session is not None and session.client == client:
                    self._close(session, now_s)

    def on_peer(self, sender: str, payload: bytes) -> None:
        try:
            message = lbm.decode(payload)
        except (ValueError, TypeError) as exc:  # msgspec's errors are ValueErrors too
            log.warning("dropped an unreadable balancer message from %s: %s", sender, exc)
            return
        if not isinstance(message, lbm.AffinityQuery | lbm.AffinityAnswer | lbm.HolderReport
                          | lbm.Settle):
            log.warning("dropped a %s from %s on the balancer channel",
                        type(message).__name__, sender)
            return
        self._perform(self.balancer.on_peer(message, trio.current_time()))
        self._deadline_changed.set()

    def _watch(self, client: str, now_s: float) -> None:
        self._watchers.pop(client, None)
        if len(self._watchers) >= MAX_WATCHERS:
            del self._watchers[next(iter(self._watchers))]  # the longest silent
        self._watchers[client] = now_s

    def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send_peer(action.to, lbm.encode(action.message))
            elif isinstance(action, Reply):
                if isinstance(action.message, lbm.SessionAccept):
                    session_id = action.message.session_id
                    self.sessions[session_id] = Session(session_id, action.client_addr,
                                                        trio.current_time())
                self._send_client(action.client_addr, m.encode(action.message))

    # -- calls ----------------------------------------------------------------------------
    def _on_call(self, client: str, call: m.Call, now_s: float) -> None:
        session = self.sessions.get(call.session_id)
        if session is None or session.client != client:
            self._result(client, m.Result(call.call_id, errno.ENOTCONN,
                                          f"no session {call.session_id[:80]} on {self.name}"))
            return
        if not self.serving:
            reason = self.ops.fs.offline_reason or "not a member"
            self._result(client, m.Result(call.call_id, errno.ENOTCONN,
                                          f"{self.name} is offline: {reason}"))
            return
        session.last_heard_s = now_s
        if isinstance(call.op, IMMEDIATE_OPS) and not session.draining:
            # Nothing of the session is queued before it: answer now, without a task.
            try:
                result = m.Result(call.call_id, value=self.ops.run_now(call.op, session.handles))
            except Exception as exc:
                result = _failed(call, exc)
            self._result(client, result)
            return
        assert self._nursery is not None
        if isinstance(call.op, m.Tunnel) and not session.draining \
                and session.tunnels_running < MAX_CONCURRENT_TUNNELS:
            session.tunnels_running += 1
            self._nursery.start_soon(self._run_tunnel, session, call)
            return
        session.queue.append(call)
        if not session.draining:
            session.draining = True
            self._nursery.start_soon(self._drain, session)

    async def _run_tunnel(self, session: Session, call: m.Call) -> None:
        try:
            await self._run_call(session, call)
        finally:
            session.tunnels_running -= 1

    async def _drain(self, session: Session) -> None:
        """Run the session's queued calls in the order they arrived."""
        try:
            while session.queue:
                await self._run_call(session, session.queue.popleft())
        finally:
            session.draining = False

    async def _run_call(self, session: Session, call: m.Call) -> None:
        if self.sessions.get(session.session_id) is not session:
            result = m.Result(call.call_id, errno.ENOTCONN, "the session was closed")
        else:
            try:
                value = await self.ops.run(call.op, session.handles)
            except Exception as exc:
                result = _failed(call, exc)
            else:
                if isinstance(value, m.DataPieces):  # sent as they are, not joined
                    self._send_client(session.client, m.encode_pieces(
                        m.Result(call.call_id, value=m.Data(memoryview(b""))), value.pieces))
                    return
                result = m.Result(call.call_id, value=value)
        self._result(session.client, result)

    def _result(self, client: str, result: m.Result) -> None:
        self._send_client(client, m.encode(result))

    def _close(self, session: Session, now_s: float) -> None:
        del self.sessions[session.session_id]
        self.ops.close_all(session.handles)
        self._perform(self.balancer.on_close(lbm.SessionClose(session.session_id), now_s))

    def close_all(self) -> None:
        """At shutdown: every session's handles."""
        for session in self.sessions.values():
            self.ops.close_all(session.handles)
        self.sessions.clear()

    # -- time -----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            housekeeping_s = trio.current_time() + HOUSEKEEPING_INTERVAL_S
            while True:
                deadline_s = min(self.balancer.next_deadline() or math.inf, housekeeping_s)
                with trio.move_on_at(deadline_s):
                    await self._deadline_changed.wait()
                self._deadline_changed = trio.Event()
                now_s = trio.current_time()
                self._perform(self.balancer.tick(now_s))
                if now_s >= housekeeping_s:
                    self._expire(now_s)
                    housekeeping_s = now_s + HOUSEKEEPING_INTERVAL_S

    def _expire(self, now_s: float) -> None:
        for session in [s for s in self.sessions.values()
                        if now_s - s.last_heard_s > SESSION_IDLE_S and not s.draining
                        and not s.tunnels_running]:
            log.info("closing idle session %s", session.session_id)
            self._close(session, now_s)
        for client in [c for c, heard_s in self._watchers.items() if now_s - heard_s > WATCH_S]:
            del self._watchers[client]


def _failed(call: m.Call, exc: Exception) -> m.Result:
    """The result of a call that raised: the error boundary of the protocol's operations."""
    match exc:
        case NamespaceError():
            return m.Result(call.call_id, exc.errno, str(exc.args[1]))
        case OSError():
            return m.Result(call.call_id, exc.errno or errno.EIO, exc.strerror or "")
    log.error("unexpected error in %s", type(call.op).__name__, exc_info=exc)
    return m.Result(call.call_id, errno.EIO, "internal error")

