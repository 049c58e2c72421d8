"""The node's ZeroMQ transport: the only module that imports zmq (DESIGN.md rule 8).

Each node binds one ROUTER socket on its listen address and receives everything there as
`[sender identity, channel, payload]`. It sends through one DEALER per destination, whose
identity is the node's name, so a receiver always knows which node spoke. A channel byte
string says which layer a payload is for: the commit protocol, membership, or control
requests from the command line (which get their reply on the ROUTER, to the asking DEALER).

The ROUTER is owned by the receive task (which also sends the control replies). zmq's file
descriptor is edge-triggered: it signals a change of the socket's state, not readiness, so
the receive loop always drains the socket and reads `EVENTS` before it waits again; no other
task may wait on it. The DEALERs are only ever sent on, without blocking, from the trio
thread, so no task ever waits on them: `send` uses them directly, which saves a task switch
per message (a commit round is six one-way messages).

Sending is best effort: the protocol cores resend what matters, so a message that cannot be
queued (high-water mark reached, unknown destination) is dropped with a debug line. Messages
to this node itself never touch zmq; the layers deliver those inline.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import trio
import zmq

log = logging.getLogger(__name__)

CHANNEL_TXN = b"t"
CHANNEL_MEMBERSHIP = b"m"
CHANNEL_CONTROL = b"c"

SEND_HWM_MESSAGES = 10_000
RESOLVE_TTL_S = 1.0  # a restarted peer may listen elsewhere; its registry entry says where
MAX_PAYLOAD_BYTES = 64 << 20

Handler = Callable[[str, bytes], None]
ControlHandler = Callable[[bytes], bytes]
Resolver = Callable[[str], "str | None"]


class TransportError(Exception):
    """The listen address cannot be bound, or a control request got no answer."""


def endpoint(address: str) -> str:
    """`HOST:PORT` as a zmq TCP endpoint (IPv6 hosts in brackets)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TransportError(f"{address!r} is not HOST:PORT")
    return f"tcp://{host}:{port}"


@dataclass(slots=True)
class _Route:
    address: str
    resolved_at_s: float


class Transport:
    """Node-to-node messages over ZeroMQ; `run` binds and serves until cancelled."""

    def __init__(self, name: str, listen: str, resolve: Resolver) -> None:
        self.name = name
        self.listen = listen
        self._resolve = resolve
        self._context: zmq.Context[Any] | None = None  # made by `run`, ended when it ends
        self._handlers: dict[bytes, Handler] = {}
        self._control: ControlHandler | None = None
        self._closed = True  # until `run` has bound the ROUTER
        self._routes: dict[str, _Route] = {}  # destination -> its address
        # One DEALER per address: two connections with one identity to the same ROUTER
        # would keep taking the identity from each other (a joiner talks to a contact's
        # address first, then to the same node by name).
        self._dealers: dict[str, zmq.Socket[bytes]] = {}

    def on(self, channel: bytes, handler: Handler) -> None:
        self._handlers[channel] = handler

    def on_control(self, handler: ControlHandler) -> None:
        self._control = handler

    def send(self, to: str, channel: bytes, payload: bytes) -> None:
        """Send `payload` to node `to` (a node name or, while joining, a HOST:PORT) without
        waiting; dropped if it cannot be queued (the protocol cores resend)."""
        if self._closed:
            return
        dealer = self._dealer_for(to)
        if dealer is None:
            log.debug("no address known for %s; message dropped", to)
            return
        try:
            dealer.send_multipart([channel, payload], zmq.NOBLOCK)
        except zmq.Again:
            log.debug("send queue to %s is full; message dropped", to)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listen = endpoint(self.listen)
        # Its own context, ended with `run`: the port is free again as soon as `run` ends.
        self._context = context = zmq.Context()
        router = context.socket(zmq.ROUTER)
        try:
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer takes its name back
            # A peer announcing a bigger frame is disconnected before ZeroMQ allocates it.
            router.setsockopt(zmq.MAXMSGSIZE, MAX_PAYLOAD_BYTES)
            try:
                router.bind(listen)
            except zmq.ZMQError as exc:
                raise TransportError(f"cannot listen on {self.listen}: {exc.strerror}"
                                     ) from None
            self._closed = False
            task_status.started()
            await self._receive_loop(router)
        finally:
            self._closed = True
            router.close()
            for dealer in self._dealers.values():
                dealer.close()
            self._dealers.clear()
            context.term()  # returns at once: every socket has linger 0

    # -- receiving ------------------------------------------------------------------------
    async def _receive_loop(self, router: zmq.Socket[bytes]) -> None:
        while True:
            frames = await receive_multipart(router)
            if len(frames) != 3 or len(frames[2]) > MAX_PAYLOAD_BYTES:
                log.warning("dropped a malformed frame set (%d frames)", len(frames))
                continue
            identity, channel, payload = frames
            if channel == CHANNEL_CONTROL:
                self._answer_control(router, identity, payload)
                continue
            handler = self._handlers.get(channel)
            if handler is None:
                log.warning("dropped a message on unknown channel %r", channel[:8])
                continue
            try:
                sender = identity.decode()
            except UnicodeDecodeError:
                log.warning("dropped a message from an undecodable identity")
                continue
            handler(sender, payload)

    def _answer_control(self, router: zmq.Socket[bytes], identity: bytes,
                        payload: bytes) -> None:
        if self._control is None:
            return
        reply = self._control(payload)
        try:
            router.send_multipart([identity, CHANNEL_CONTROL, reply], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("control reply dropped: %s", exc)

    # -- sending --------------------------------------------------------------------------
    def _dealer_for(self, to: str) -> zmq.Socket[bytes] | None:
        address = self._address(to)
        if address is None:
            return None
        dealer = self._dealers.get(address)
        if dealer is None:
            dealer = self._dealers[address] = self._dealer(address)
        return dealer

    def _address(self, to: str) -> str | None:
        if ":" in to:
            return to
        now_s = trio.current_time()
        route = self._routes.get(to)
        if route is None or now_s - route.resolved_at_s >= RESOLVE_TTL_S:
            address = self._resolve(to) or (route.address if route else None)
            if address is None:
                return None
            route = self._routes[to] = _Route(address, now_s)
        return route.address

    def _dealer(self, address: str) -> zmq.Socket[bytes]:
        assert self._context is not None
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, SEND_HWM_MESSAGES)
        dealer.setsockopt(zmq.IDENTITY, self.name.encode())
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        dealer.connect(endpoint(address))
        return dealer


async def receive_multipart(sock: zmq.Socket[bytes]) -> list[bytes]:
    """The next message of `sock`, waiting in trio (edge-triggered FD: drain, then check)."""
    while True:
        try:
            return sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            pass
        if cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            continue
        await trio.lowlevel.wait_readable(cast(int, sock.getsockopt(zmq.FD)))


async def request(address: str, payload: bytes, timeout_s: float) -> bytes:
    """One control request to the node listening on `address` (for the command line)."""
    context: zmq.Context[Any] = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, f"cli-{uuid.uuid4().hex}".encode())
    try:
        dealer.connect(endpoint(address))
        dealer.send_multipart([CHANNEL_CONTROL, payload])
        with trio.move_on_after(timeout_s):
            frames = await receive_multipart(dealer)
            if len(frames) == 2 and frames[0] == CHANNEL_CONTROL:
                return frames[1]
            raise TransportError(f"{address}: unexpected reply")
        raise TransportError(f"no answer from {address} within {timeout_s:g} s")
    finally:
        dealer.close()
