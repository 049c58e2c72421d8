"""The node's ZeroMQ transport: the only module that imports zmq (DESIGN.md rule 8).

Each node binds one ROUTER socket on its listen address and receives everything there. It
sends to other nodes through one DEALER per destination as `[channel, own name, payload]`;
clients (the command line, file protocol clients) send `[channel, payload]` and get replies
through the ROUTER, addressed by their connection's identity.

Senders: a node's messages are taken to come from the name inside them, trusted only from a
connection made with the cluster's key pair (ZAP's User-Id). A node's DEALERs have no
identity of their own (ZeroMQ gives each connection one that no peer can choose): a ROUTER
hands a claimed identity over to the newest connection and closes the older one
(ROUTER_HANDOVER, which lets a client that reconnects take its name back), so if nodes
connected under their names, any client could cut a member off by claiming its name. A channel byte
string says which layer a payload is for: the commit protocol, membership, the balancer,
control requests from the command line (which get their reply on the ROUTER, to the asking
DEALER), or the file protocol's clients (whose results go back the same way, later: `reply`).

The ROUTER is owned by the receive task (which also sends the control replies). zmq's file
descriptor is edge-triggered: it signals a change of the socket's state, not readiness, so
the receive loop always drains the socket and reads `EVENTS` before it waits again; no other
task may wait on it. A `reply` sent on the ROUTER from another task can take the edge that
the receive task waits for, so it wakes that task to look again. The DEALERs are only ever
sent on, without blocking, from the trio thread, so no task ever waits on them: `send` uses
them directly, which saves a task switch per message (a commit round is six one-way
messages).

Every connection is authenticated and encrypted with CURVE: each node is a CURVE server and
client with the cluster's key pair (`clusterfs.credentials`), and its ZAP handler admits a
client only if it proves it holds that pair's secret key, or an authorised client key's; a
refused connection is logged at most every ten seconds per address. A stranger's messages
never reach a handler. ZAP marks a connection made with a client key (its User-Id), and
what such a connection sends reaches the file protocol's handler only. The one way in
without ZeroMQ is the local link, for a client on the node's own host (`local_link`: a
unix socket, a password only holders of the secret key know, the file protocol only),
which `run` serves beside the ROUTER (`local_stream.LinkServer`); `reply` answers a client
on whichever of the two it is connected.

Sending is best effort: the protocol cores resend what matters, so a message that cannot be
queued (high-water mark reached, unknown destination) is dropped with a debug line. Messages
to this node itself never touch zmq; the layers deliver those inline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Set
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, overload

import trio
import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from clusterfs.pieces import Buffer, Payload, joined
from clusterfs.txn import local_link, local_stream
from clusterfs.txn.local_link import LinkError
from clusterfs.txn.local_stream import LinkServer, LinkSocket

if TYPE_CHECKING:
    from clusterfs.credentials import Credentials

log = logging.getLogger(__name__)

CHANNEL_TXN = b"t"
CHANNEL_MEMBERSHIP = b"m"
CHANNEL_CONTROL = b"c"
CHANNEL_LB = b"l"  # node to node: the balancers
CHANNEL_PROTOCOL = b"p"  # client to node and back: the file protocol

SEND_HWM_MESSAGES = 10_000
RESOLVE_TTL_S = 1.0  # a restarted peer may listen elsewhere; its registry entry says where
MAX_PAYLOAD_BYTES = 64 << 20
# Larger messages are handed to libzmq without a copy (pyzmq advises it above ~64 KiB).
ZERO_COPY_MIN_BYTES = 64 << 10
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks (RFC 27/ZAP)
ZAP_VERSION = b"1.0"
REFUSAL_LOG_INTERVAL_S = 10.0
REFUSAL_ADDRESSES_KEPT = 1024  # a flood from many addresses must not grow memory

CLIENT_IDENTITY_PREFIX = "cli-"  # holders of the cluster's credentials (command line, clients)
CLIENT_KEY_IDENTITY_PREFIX = "key-"  # holders of an authorised client key
USER_CLUSTER = b"cluster"  # ZAP User-Id of a connection made with the cluster's key pair
USER_CLIENT_KEY = b"client-key"  # ... and with an authorised client key: the protocol only

Handler = Callable[[str, bytes], None]  # (sender, payload)
# (client identity, payload: a bytearray from the local link, which does not copy it)
ClientHandler = Callable[[str, Buffer], None]
ControlHandler = Callable[[bytes], bytes]
Resolver = Callable[[str], "str | None"]


class TransportError(Exception):
    """The listen address cannot be bound, or a control request got no answer."""


def new_keypair() -> tuple[bytes, bytes]:
    """A new CURVE key pair (public, secret), both in Z85."""
    return zmq.curve_keypair()


def public_key_of(secret_key: bytes) -> bytes:
    """The Z85 public key of a Z85 secret key; ValueError if it is not one."""
    try:
        return zmq.curve_public(secret_key)
    except zmq.ZMQError as exc:
        raise ValueError(str(exc)) from None


def zap_reply(request: list[bytes], public_key: bytes,
              client_keys: Set[bytes] = frozenset()) -> tuple[list[bytes], str]:
    """The reply to one ZAP request (RFC 27): a CURVE client whose key is the cluster's
    public key (`public_key`, Z85) is admitted as USER_CLUSTER, and one whose key is among
    `client_keys` (Z85) as USER_CLIENT_KEY. Also the reason for a refusal, or ''."""
    if len(request) < 6:
        request_id = request[1] if len(request) > 1 else b""
        return _zap(request_id, b"400", "malformed request"), "malformed request"
    version, request_id, _domain, _address, _identity, mechanism, *credentials = request
    client_key = z85.encode(credentials[0]) if len(credentials) == 1 and len(
        credentials[0]) == 32 else b""
    if version != ZAP_VERSION:
        reason = "unknown ZAP version"
    elif mechanism != b"CURVE":
        reason = f"mechanism {mechanism[:16]!r}, not CURVE"
    elif credentials == [z85.decode(public_key)]:
        return _zap(request_id, b"200", "OK", USER_CLUSTER), ""
    elif client_key not in client_keys:
        reason = "not the cluster's key nor an authorised client's"
    else:
        return _zap(request_id, b"200", "OK", USER_CLIENT_KEY), ""
    return _zap(request_id, b"400", reason), reason


def _zap(request_id: bytes, status: bytes, text: str, user_id: bytes = b"") -> list[bytes]:
    return [ZAP_VERSION, request_id, status, text.encode(), user_id, b""]


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

    def __init__(self, name: str, listen: str, resolve: Resolver,
                 credentials: Credentials,
                 client_keys: Callable[[], Set[bytes]] = frozenset) -> None:
        self.name = name
        self._name_frame = name.encode()
        self.listen = listen
        self._resolve = resolve
        self._credentials = credentials
        self._client_keys = client_keys  # read at each new connection: revocation works
        self._refusals_logged_s: dict[str, float] = {}  # peer address -> when last logged
        self._context: zmq.Context[Any] | None = None  # made by `run`, ended when it ends
        self._handlers: dict[bytes, Handler] = {}
        self._client_handler: ClientHandler | None = None
        self._control: ControlHandler | None = None
        self._closed = True  # until `run` has bound the ROUTER
        self._routes: dict[str, _Route] = {}  # destination -> its address
        # One DEALER per address (a joiner talks to a contact's address first, then to the
        # same node by name: both reach one socket).
        self._dealers: dict[str, zmq.Socket[bytes]] = {}
        self._router: zmq.Socket[bytes] | None = None
        self._router_wait: dict[str, trio.CancelScope] = {}  # while the receive task waits
        self._local: LinkServer | None = None  # the local link, while it listens
        self.local_link: str | None = None  # the local link's socket path, once bound

    def on(self, channel: bytes, handler: Handler) -> None:
        if channel == CHANNEL_PROTOCOL:
            raise ValueError("the file protocol's messages go to `on_clients`")
        self._handlers[channel] = handler

    def on_clients(self, handler: ClientHandler) -> None:
        """Where the file protocol's messages go (`CHANNEL_PROTOCOL`, and the local link)."""
        self._client_handler = handler

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
            dealer.send_multipart([channel, self._name_frame, payload], zmq.NOBLOCK,
                                  copy=len(payload) < ZERO_COPY_MIN_BYTES)
        except zmq.Again:
            log.debug("send queue to %s is full; message dropped", to)

    def reply(self, identity: str, channel: bytes, payload: Payload) -> None:
        """Send `payload` back to a peer that spoke to this node's listen address (a file
        protocol client) without waiting; dropped if it cannot be queued."""
        if self._local is not None and channel == CHANNEL_PROTOCOL \
                and self._local.send(identity, payload):
            return
        router = self._router
        if router is None:
            return
        payload = joined(payload)
        try:
            router.send_multipart([identity.encode(), channel, payload], zmq.NOBLOCK,
                                  copy=len(payload) < ZERO_COPY_MIN_BYTES)
        except zmq.ZMQError as exc:
            log.debug("reply to %s dropped: %s", identity, exc)
        _wake(self._router_wait, "")  # the send may have taken the receive task's edge

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listen = endpoint(self.listen)
        # Its own context, ended with `run`: the port is free again as soon as `run` ends.
        self._context = context = zmq.Context()
        zap = context.socket(zmq.REP)
        router = context.socket(zmq.ROUTER)
        try:
            zap.setsockopt(zmq.LINGER, 0)
            zap.bind(ZAP_ENDPOINT)  # before the ROUTER listens: no connection gets past it
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer takes its name back
            # A peer announcing a bigger frame is disconnected before ZeroMQ allocates it.
            router.setsockopt(zmq.MAXMSGSIZE, MAX_PAYLOAD_BYTES)
            router.setsockopt(zmq.CURVE_SERVER, 1)
            router.setsockopt(zmq.CURVE_SECRETKEY, self._credentials.secret_key)
            try:
                router.bind(listen)
            except zmq.ZMQError as exc:
                raise TransportError(f"cannot listen on {self.listen}: {exc.strerror}"
                                     ) from None
            monitor = router.get_monitor_socket(_HANDSHAKE_FAILED)
            self._closed = False
            self._router = router
            async with trio.open_nursery() as nursery:
                await self._start_local_link(nursery)  # while the port is ours (see there)
                nursery.start_soon(self._serve_zap, zap)
                nursery.start_soon(self._log_failed_handshakes, router, monitor)
                task_status.started()
                await self._receive_loop(router)
        finally:
            self._closed = True
            self._router = None
            self._local = None  # its socket is removed by now, while the port was ours
            self.local_link = None
            router.close()
            zap.close()
            for dealer in self._dealers.values():
                dealer.close()
            self._dealers.clear()
            context.term()  # returns at once: every socket has linger 0

    async def _start_local_link(self, nursery: trio.Nursery) -> None:
        """Also listen on the local link (`local_link`), if this node can. Only the holder
        of the address's port binds its path, so a socket found there is a dead node's."""
        path = local_link.server_path(self._credentials, self.listen)
        if path is None:
            log.debug("no local link: not root, or %s is not private", local_link.LOCAL_LINK_DIR)
            return
        server = LinkServer(path, local_link.password(self._credentials),
                            CLIENT_IDENTITY_PREFIX, MAX_PAYLOAD_BYTES, self._on_local_message,
                            lambda reason: self._log_refusal("the local link", reason))
        try:
            await nursery.start(server.run)
        except OSError as exc:
            log.warning("no local link at %s: %s", path, exc.strerror)
            return
        self._local = server
        self.local_link = str(path)

    def _on_local_message(self, identity: str, payload: bytearray) -> None:
        if self._client_handler is not None:  # the local link carries nothing else
            self._client_handler(identity, payload)

    async def _serve_zap(self, zap: zmq.Socket[bytes]) -> None:
        """Answer libzmq's authentication requests for the ROUTER's new connections."""
        while True:
            request = await receive_multipart(zap)
            reply, refusal = zap_reply(request, self._credentials.public_key,
                                       self._client_keys())
            zap.send_multipart(reply)
            if refusal:
                self._log_refusal(request[3].decode(errors="replace") if len(request) > 3
                                  else "?", refusal)

    async def _log_failed_handshakes(self, router: zmq.Socket[bytes],
                                     monitor: zmq.Socket[bytes]) -> None:
        """A peer without the cluster's keys fails before ZAP is asked: say so here."""
        try:
            while True:
                event = parse_monitor_message(await receive_multipart(monitor))
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:  # ZAP logs AUTH
                    self._log_refusal("a peer", "it failed the secure handshake (no "
                                      "credentials, or another cluster's)")
                elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                    # Mostly a peer that hung up mid-handshake: a client closing the
                    # connections to the nodes that did not take its session.
                    log.debug("a handshake ended early (error %s)", event["value"])
        finally:
            _stop_monitor(router, monitor)

    def _log_refusal(self, address: str, reason: str) -> None:
        now_s = trio.current_time()
        if now_s - self._refusals_logged_s.get(address, -REFUSAL_LOG_INTERVAL_S) \
                >= REFUSAL_LOG_INTERVAL_S:
            if len(self._refusals_logged_s) >= REFUSAL_ADDRESSES_KEPT:
                self._refusals_logged_s.clear()
            self._refusals_logged_s[address] = now_s
            log.warning("refused a connection from %s: %s", address or "?", reason)

    # -- receiving ------------------------------------------------------------------------
    async def _receive_loop(self, router: zmq.Socket[bytes]) -> None:
        while True:
            parts = await _receive_wakeable(router, self._router_wait, "", copy=False)
            if len(parts) not in (3, 4) or len(parts[-1]) > MAX_PAYLOAD_BYTES:
                log.warning("dropped a malformed frame set (%d frames)", len(parts))
                continue
            identity, channel, payload = parts[0].bytes, parts[1].bytes, parts[-1].bytes
            client_frames = channel in (CHANNEL_PROTOCOL, CHANNEL_CONTROL)
            if len(parts) != (3 if client_frames else 4):
                log.warning("dropped a malformed frame set (%d frames on channel %r)",
                            len(parts), channel[:8])
                continue
            if channel != CHANNEL_PROTOCOL and parts[0].get("User-Id") != USER_CLUSTER.decode():
                self._log_refusal(identity.decode(errors="replace"),
                                  f"a client key may only use the file protocol (channel "
                                  f"{channel[:8]!r})")
                continue
            if channel == CHANNEL_CONTROL:
                self._answer_control(router, identity, payload)
                continue
            handler = self._client_handler if channel == CHANNEL_PROTOCOL \
                else self._handlers.get(channel)
            if handler is None:
                log.warning("dropped a message on unknown channel %r", channel[:8])
                continue
            try:  # a node names itself in the message: see "Senders" above
                sender = (identity if client_frames else parts[2].bytes).decode()
            except UnicodeDecodeError:
                log.warning("dropped a message from an undecodable sender")
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
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        curve_client(dealer, self._credentials)
        dealer.connect(endpoint(address))
        return dealer


def curve_client(sock: zmq.Socket[bytes], credentials: Credentials) -> None:
    """Make `sock` connect with `credentials` (the cluster's key pair, or a client key) to a
    node of their cluster (before `connect`)."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, credentials.cluster_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, credentials.public_key)
    sock.setsockopt(zmq.CURVE_SECRETKEY, credentials.secret_key)


async def receive_multipart(sock: zmq.Socket[bytes]) -> list[bytes]:
    """The next message of `sock`, waiting in trio (edge-triggered FD: drain, then check)."""
    while True:
        if cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:  # asked first: see below
            try:
                return sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                pass
            continue
        await trio.lowlevel.wait_readable(cast(int, sock.getsockopt(zmq.FD)))


@overload
async def _receive_wakeable(sock: zmq.Socket[bytes], waits: dict[str, trio.CancelScope],
                            key: str) -> list[bytes]: ...


@overload
async def _receive_wakeable(sock: zmq.Socket[bytes], waits: dict[str, trio.CancelScope],
                            key: str, copy: Literal[False]) -> list[zmq.Frame]: ...


async def _receive_wakeable(sock: zmq.Socket[bytes], waits: dict[str, trio.CancelScope],
                            key: str, copy: bool = True) -> list[bytes] | list[zmq.Frame]:
    """`receive_multipart` for a socket that other tasks also send on: while it waits, its
    cancel scope is `waits[key]`, which a sender cancels (`_wake`) to make it look again.
    With `copy=False`: frames, whose metadata (User-Id) can be read."""
    while True:
        # Asked first: a receive that finds nothing raises zmq.Again, which costs more
        # than asking (a create through three nodes, six messages, took ~0.15 ms less).
        if cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            try:
                return sock.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                pass
            continue
        with trio.CancelScope() as waits[key]:
            await trio.lowlevel.wait_readable(cast(int, sock.getsockopt(zmq.FD)))
        del waits[key]


def _stop_monitor(sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes]) -> None:
    """Stop `sock`'s monitor, then close our end. Not the other way round: libzmq's I/O
    thread blocks sending an event to a closed end, holding the lock that stopping needs."""
    with contextlib.suppress(zmq.ZMQError):
        sock.disable_monitor()
    monitor.close()


def _wake(waits: dict[str, trio.CancelScope], key: str) -> None:
    wait = waits.get(key)
    if wait is not None:
        wait.cancel()


async def request(address: str, payload: bytes, timeout_s: float,
                  credentials: Credentials) -> bytes:
    """One control request to the node listening on `address` (for the command line)."""
    context: zmq.Context[Any] = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, f"cli-{uuid.uuid4().hex}".encode())
    curve_client(dealer, credentials)
    # A refused handshake is silent on the socket itself; its monitor tells why.
    monitor = dealer.get_monitor_socket(_HANDSHAKE_FAILED)
    try:
        dealer.connect(endpoint(address))
        dealer.send_multipart([CHANNEL_CONTROL, payload])
        with trio.move_on_after(timeout_s):
            frames = await _reply_or_refusal(dealer, monitor, address)
            if len(frames) == 2 and frames[0] == CHANNEL_CONTROL:
                return frames[1]
            raise TransportError(f"{address}: unexpected reply")
        raise TransportError(f"no answer from {address} within {timeout_s:g} s")
    finally:
        _stop_monitor(dealer, monitor)
        dealer.close()


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


async def _reply_or_refusal(dealer: zmq.Socket[bytes], monitor: zmq.Socket[bytes],
                            address: str) -> list[bytes]:
    """The reply's frames, or TransportError once the handshake has failed."""
    outcome: list[list[bytes] | TransportError] = []
    async with trio.open_nursery() as nursery:
        async def reply() -> None:
            outcome.append(await receive_multipart(dealer))
            nursery.cancel_scope.cancel()

        async def refusal() -> None:
            event = parse_monitor_message(await receive_multipart(monitor))
            outcome.append(TransportError(
                f"{address} refused these credentials (not this cluster's)"
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH else
                f"{address}: the secure handshake failed (these credentials are another "
                "cluster's, or it is not a clusterfs node)"))
            nursery.cancel_scope.cancel()

        nursery.start_soon(reply)
        nursery.start_soon(refusal)
    if isinstance(outcome[0], TransportError):
        raise outcome[0]
    return outcome[0]


_CLIENT_MAX_SOCKETS = 16_384
CLIENT_LINGER_MS = 200
_client_contexts: dict[int, zmq.Context[Any]] = {}  # by process id: a fork needs its own


def _client_context() -> zmq.Context[Any]:
    """One context (one I/O thread) for every client of a process: a process may run
    hundreds (a VM host's disks, a test); each uses two sockets per node."""
    context = _client_contexts.get(os.getpid())
    if context is None:
        context = _client_contexts[os.getpid()] = zmq.Context()
        context.set(zmq.MAX_SOCKETS, _CLIENT_MAX_SOCKETS)
    return context


class ClientTransport:
    """A file protocol client's side: one DEALER per node address, all with one identity,
    and CURVE with the cluster's credentials, or the local link to a node on this host
    (whether a node has one is settled at the first message to it; a broken link is opened
    again at the next message, and while it cannot be, TCP takes over); `run` serves until
    cancelled.

    Messages from node `address` go to `on_message(address, payload)`; a node that refuses
    the credentials is reported once per connection to `on_refused(address, reason)`."""

    def __init__(self, identity: str, credentials: Credentials,
                 on_message: Callable[[str, Buffer], None],
                 on_refused: Callable[[str, str], None]) -> None:
        self.identity = identity
        self._credentials = credentials
        self._on_message = on_message
        self._on_refused = on_refused
        self._context: zmq.Context[Any] | None = None
        self._nursery: trio.Nursery | None = None
        self._dealers: dict[str, zmq.Socket[bytes]] = {}
        self._link_paths: dict[str, Path] = {}  # node address -> its local link
        self._links: dict[str, LinkSocket] = {}  # ... and the connection there, while open
        self.local_links: dict[str, bool] = {}  # node address -> reached over the local link
        # A send on a DEALER can take the edge its receive task waits for: it wakes it.
        self._waits: dict[str, trio.CancelScope] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self._context = _client_context()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for dealer in self._dealers.values():  # their monitors are stopped by now
                dealer.close()
            self._dealers.clear()
            for link in self._links.values():  # what was sent is in the kernel's hands
                link.close()
            self._links.clear()

    def connect(self, address: str) -> None:
        """Start talking to the node at `address` (HOST:PORT): over its local link if it has
        one and the link opens, else over TCP; no-op if already."""
        if self._context is None or self._nursery is None:
            return
        if address not in self.local_links:
            path = local_link.client_path(self._credentials, address)
            self.local_links[address] = path is not None
            if path is not None:  # the node is on this host: no CURVE, no ZeroMQ
                self._link_paths[address] = path
        link = self._links.get(address)
        if (link is None or link.closed) and self._open_link(address) is None \
                and address not in self._dealers:
            self._connect_dealer(address, self._context, self._nursery)

    def _connect_dealer(self, address: str, context: zmq.Context[Any],
                        nursery: trio.Nursery) -> None:
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, CLIENT_LINGER_MS)  # a last CloseSession goes out
        dealer.setsockopt(zmq.SNDHWM, SEND_HWM_MESSAGES)
        dealer.setsockopt(zmq.IDENTITY, self.identity.encode())
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        dealer.setsockopt(zmq.MAXMSGSIZE, MAX_PAYLOAD_BYTES)
        curve_client(dealer, self._credentials)
        monitor = dealer.get_monitor_socket(_HANDSHAKE_FAILED)
        dealer.connect(endpoint(address))
        self._dealers[address] = dealer
        nursery.start_soon(self._receive, address, dealer)
        nursery.start_soon(self._watch_handshakes, address, dealer, monitor)

    def send(self, address: str, payload: Payload) -> None:
        """Send to the node at `address` without waiting (dropped if it cannot be queued:
        the client's calls time out and are retried)."""
        self.connect(address)
        link = self._links.get(address)
        if link is not None:
            if not link.send(payload):
                log.debug("send to %s over the local link dropped", address)
            return
        dealer = self._dealers.get(address)
        if dealer is None:
            return
        payload = joined(payload)
        try:
            dealer.send_multipart([CHANNEL_PROTOCOL, payload], zmq.NOBLOCK,
                                  copy=len(payload) < ZERO_COPY_MIN_BYTES)
        except zmq.ZMQError as exc:
            log.debug("send to %s dropped: %s", address, exc)
        _wake(self._waits, address)

    def _open_link(self, address: str) -> LinkSocket | None:
        """Connect to the local link of the node at `address` and say the hello; None if
        it has none or no node listens there now (the next message tries again)."""
        if self._nursery is None or address not in self._link_paths:
            return None
        try:
            link = local_stream.connect(self._link_paths[address], MAX_PAYLOAD_BYTES)
        except OSError as exc:
            log.debug("local link to %s: %s", address, exc.strerror)
            return None
        try:
            self._nursery.start_soon(self._receive_link, address, link)
        except RuntimeError:  # closed to new tasks: `run` is ending
            link.close()
            return None
        link.send(local_link.hello(self._credentials, self.identity))
        self._links[address] = link
        return link

    async def _receive_link(self, address: str, link: LinkSocket) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.flush)
            try:
                await self._receive_from_link(address, link)
            except LinkError as exc:
                log.warning("local link to %s broken: %s", address, exc)
            nursery.cancel_scope.cancel()
        # Not when cancelled: `run` closes the links last, after a client's final message.
        link.close()
        if self._links.get(address) is link:
            del self._links[address]

    async def _receive_from_link(self, address: str, link: LinkSocket) -> None:
        answer = await link.receive()
        refusal = "" if answer is None else local_link.parse_answer(answer)
        if refusal:
            self._on_refused(address, refusal)
        elif answer is not None:
            while (payload := await link.receive()) is not None:
                self._on_message(address, payload)

    async def _receive(self, address: str, dealer: zmq.Socket[bytes]) -> None:
        while True:
            frames = await _receive_wakeable(dealer, self._waits, address)
            if len(frames) == 2 and frames[0] == CHANNEL_PROTOCOL:
                self._on_message(address, frames[1])

    async def _watch_handshakes(self, address: str, dealer: zmq.Socket[bytes],
                                monitor: zmq.Socket[bytes]) -> None:
        try:
            while True:
                event = parse_monitor_message(await receive_multipart(monitor))
                self._on_refused(address, "it refused these credentials (not this cluster's)"
                                 if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH else
                                 "the secure handshake failed (another cluster's credentials, "
                                 "or not a clusterfs node)")
        finally:
            _stop_monitor(dealer, monitor)
