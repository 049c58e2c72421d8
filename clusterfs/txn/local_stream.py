"""The local link's trio driver (`local_link` has its rules): `LinkSocket`, one connection
seen from either end, and `LinkServer`, the node's listener.

No thread is involved. A frame goes out with one non-blocking `sendmsg` from the task that
sends it; what the socket cannot take at once is queued, in order, and written by the
connection's flushing task. Frames come in through one receiving task per connection,
straight into buffers of their size (`FrameReader`). Both socket buffers are 4 MiB, so a 1 MiB
message usually crosses in one call each way.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import trio

from clusterfs.pieces import Payload, pieces, size_bytes
from clusterfs.txn import local_link
from clusterfs.txn.local_link import FrameReader, LinkError

log = logging.getLogger(__name__)

SOCKET_BUFFER_BYTES = 4 << 20  # the kernel caps it at net.core.wmem_max / rmem_max
MAX_BACKLOG_BYTES = 256 << 20  # beyond this a peer that does not read loses messages
HELLO_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 1024
FRAMES_PER_CHECKPOINT = 16  # a peer that never pauses must not starve the other tasks
MAX_IOVECS = 512  # below IOV_MAX (1024)

OnMessage = Callable[[str, bytearray], None]


class LinkSocket:
    """One local link connection: `send` frames without waiting, `receive` them in one
    task, and `flush` (in a task of its own) writes what `send` had to queue."""

    def __init__(self, sock: socket.socket, max_payload_bytes: int) -> None:
        sock.setblocking(False)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        self._sock = sock
        self._reader = FrameReader(max_payload_bytes)
        self._backlog: collections.deque[memoryview] = collections.deque()
        self._backlog_bytes = 0
        self._backlog_added = trio.Event()
        self._frames_without_wait = 0
        self.closed = False

    def send(self, payload: Payload) -> bool:
        """Send one frame (its pieces in one gather write: they must not change until
        sent), or queue it behind the frames still waiting; False if the link is closed or
        its peer is `MAX_BACKLOG_BYTES` behind (the message is dropped)."""
        if self.closed:
            return False
        parts = [memoryview(local_link.frame_header(size_bytes(payload)))]
        parts += (memoryview(piece) for piece in pieces(payload) if piece)
        if self._backlog:
            if self._backlog_bytes > MAX_BACKLOG_BYTES:
                return False
        else:
            try:
                parts = _unsent(parts, self._sock.sendmsg(parts))
            except BlockingIOError:
                pass
            except OSError:
                self.close()
                return False
        for part in parts:
            self._backlog.append(part)
            self._backlog_bytes += len(part)
        if parts:
            self._backlog_added.set()
        return True

    async def flush(self) -> None:
        """Write the queued frames as the socket takes them, until the link closes."""
        while not self.closed:
            await self._backlog_added.wait()
            self._backlog_added = trio.Event()
            while self._backlog:
                try:
                    await trio.lowlevel.wait_writable(self._sock)
                except trio.ClosedResourceError:
                    return
                parts = [self._backlog[i] for i in range(min(len(self._backlog), MAX_IOVECS))]
                try:
                    sent = self._sock.sendmsg(parts)
                except BlockingIOError:
                    continue
                except OSError:
                    self.close()
                    return
                self._backlog_bytes -= sent
                while sent:
                    first = self._backlog[0]
                    if sent < len(first):
                        self._backlog[0] = first[sent:]
                        break
                    sent -= len(first)
                    self._backlog.popleft()

    async def receive(self) -> bytearray | None:
        """The next frame's payload, in a buffer of its own (the caller's to keep, not
        copied); None once the peer hung up or the link was closed. LinkError if the peer
        breaks the framing."""
        while True:
            try:
                count = self._sock.recv_into(self._reader.buffer())
            except BlockingIOError:
                self._frames_without_wait = 0
                try:
                    await trio.lowlevel.wait_readable(self._sock)
                except trio.ClosedResourceError:
                    return None
                continue
            except OSError:
                return None  # reset by the peer, or closed here
            if count == 0:
                return None
            payload = self._reader.received(count)
            if payload is not None:
                self._frames_without_wait += 1
                if self._frames_without_wait >= FRAMES_PER_CHECKPOINT:
                    self._frames_without_wait = 0
                    await trio.lowlevel.checkpoint()
                return payload

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._backlog.clear()
            self._backlog_added.set()  # the flushing task sees `closed` and ends
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()


def _unsent(parts: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of `parts` after the first `sent` bytes went out."""
    for index, part in enumerate(parts):
        if sent < len(part):
            return [part[sent:], *parts[index + 1:]]
        sent -= len(part)
    return []


def connect(path: Path, max_payload_bytes: int) -> LinkSocket:
    """A connection to the local link at `path` (OSError if no node listens there); the
    caller sends the hello first and runs `flush` and the receiving in tasks."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect(os.fspath(path))  # a unix connect does not wait; EAGAIN if swamped
    except OSError:
        sock.close()
        raise
    return LinkSocket(sock, max_payload_bytes)


class LinkServer:
    """The node's end: listens at `path` (replacing a socket a dead node left there),
    admits clients that say the right hello, and hands every frame they send to
    `on_message(identity, payload)`; `send` answers one by identity. A newer connection
    with the same identity replaces the older, which is closed (a client that reconnects
    takes its name back, as over ZeroMQ). Refusals go to `on_refusal(reason)`."""

    def __init__(self, path: Path, password: bytes, identity_prefix: str,
                 max_payload_bytes: int, on_message: OnMessage,
                 on_refusal: Callable[[str], None]) -> None:
        self.path = path
        self._password = password
        self._identity_prefix = identity_prefix
        self._max_payload_bytes = max_payload_bytes
        self._on_message = on_message
        self._on_refusal = on_refusal
        self._links: dict[str, LinkSocket] = {}
        self._connections = 0

    def send(self, identity: str, payload: Payload) -> bool:
        """Send to the client `identity` if it is connected here; False if it is not."""
        link = self._links.get(identity)
        return link is not None and link.send(payload)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Bind (OSError if it cannot), serve until cancelled, then remove the socket."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a dead node's: this node holds the address's port
            listener.bind(os.fspath(self.path))
            listener.listen(128)
            listener.setblocking(False)
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    await trio.lowlevel.wait_readable(listener)
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        continue
                    except OSError as exc:  # out of descriptors: try again in a moment
                        log.warning("local link: cannot accept a connection: %s", exc.strerror)
                        await trio.sleep(0.1)
                        continue
                    if self._connections >= MAX_CONNECTIONS:
                        sock.close()
                        self._on_refusal(f"more than {MAX_CONNECTIONS} connections")
                        continue
                    nursery.start_soon(self._serve, LinkSocket(sock, self._max_payload_bytes))
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            for link in self._links.values():
                link.close()
            self._links.clear()

    async def _serve(self, link: LinkSocket) -> None:
        self._connections += 1
        identity = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.flush)
                try:  # here, not around the nursery: that would see an exception group
                    identity = await self._admit(link)
                    if identity is not None:
                        while (payload := await link.receive()) is not None:
                            self._on_message(identity, payload)
                except LinkError as exc:
                    self._on_refusal(f"it broke the local link's framing: {exc}")
                nursery.cancel_scope.cancel()
        finally:
            if identity is not None and self._links.get(identity) is link:
                del self._links[identity]
            link.close()
            self._connections -= 1

    async def _admit(self, link: LinkSocket) -> str | None:
        """The identity of a client whose hello is right, now reachable by `send`."""
        with trio.move_on_after(HELLO_TIMEOUT_S):
            hello = await link.receive()
            if hello is None:
                return None
            try:
                identity = local_link.check_hello(hello, self._password, self._identity_prefix)
            except LinkError as exc:
                link.send(local_link.refusal(str(exc)))  # small: the socket takes it at once
                self._on_refusal(str(exc))
                return None
            older = self._links.get(identity)
            if older is not None:
                older.close()
            self._links[identity] = link
            link.send(local_link.WELCOME)
            return identity
        self._on_refusal(f"no hello within {HELLO_TIMEOUT_S:g} s")
        return None
