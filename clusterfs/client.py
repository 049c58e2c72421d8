"""The file protocol's client library: a session in the cluster that survives its node.

    async with Client(["10.0.0.1:7000"], credentials, client_id="host-a") as client:
        await client.mkdir("/vm")
        handle = await client.open("/vm/disk", os.O_RDWR | os.O_CREAT)
        await client.write(handle, 0, b"data")

A client knows the cluster by one or more node addresses; a Hello to each tells it every
member and its address. It opens its session by sending a session request to every member:
the cluster's balancer (lb) makes exactly one node answer, the one that already holds this
client's id if any. Calls then go to that node.

When the node is lost — it is removed or goes offline (the nodes push `MembersChanged`),
it answers ENOTCONN (it does not know the session: it restarted), or a call gets no answer
within `call_timeout_s` — the client opens its session again (lb routes it to a live node),
opens its open files again there (by inode number, so a file renamed or unlinked meanwhile
is still found; without O_CREAT/O_EXCL/O_TRUNC) and retries the call that was in flight.
Reads and writes are positional, so a retried one does the same again; a retried namespace
change that had been applied before the node was lost answers as a second attempt would
(EEXIST, ENOENT).

`BlockingClient` offers the same calls to code without trio (it runs one in a thread).
Errors of calls are `OSError`s with the node's errno; `ClientError` says the cluster could
not be reached or refused the credentials.
"""

from __future__ import annotations

import collections
import errno
import functools
import itertools
import logging
import os
import threading
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import trio

from clusterfs.credentials import Credentials
from clusterfs.pieces import Buffer, size_bytes
from clusterfs.protocol import messages as m
from clusterfs.txn.transport import (
    CLIENT_IDENTITY_PREFIX,
    CLIENT_KEY_IDENTITY_PREFIX,
    MAX_PAYLOAD_BYTES,
    ClientTransport,
    TransportError,
    endpoint,
)
from lb.messages import SessionAccept, SessionBusy, SessionRequest

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 5.0
FSYNC_TIMEOUT_S = 120.0  # flushing much written data takes long; a dead node is pushed
OPEN_ATTEMPT_S = 1.0  # wait this long for an answer to one session request
ROUTE_TIMEOUT_S = 60.0  # give up finding a node after this long
PING_INTERVAL_S = 15.0  # well inside the node's SESSION_IDLE_S
_REOPEN_MASK = ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)

T = TypeVar("T")


class ClientError(Exception):
    """The cluster cannot be reached, or it refused this client; one line."""


class _Lost(Exception):
    """The session's node is gone: route again and retry."""


@dataclass(slots=True)
class _OpenFile:
    ino: int
    flags: int
    server_handle: int
    session_id: str  # the session `server_handle` belongs to


@dataclass(slots=True)
class _Session:
    node: str
    address: str
    session_id: str


class Client:
    def __init__(self, cluster: list[str], credentials: Credentials,
                 client_id: str | None = None, *, call_timeout_s: float = CALL_TIMEOUT_S,
                 route_timeout_s: float = ROUTE_TIMEOUT_S) -> None:
        if not cluster:
            raise ClientError("no cluster address given")
        for address in cluster:
            try:
                endpoint(address)
            except TransportError as exc:
                raise ClientError(str(exc)) from None
        self.client_id = client_id or f"client-{uuid.uuid4().hex}"
        self.call_timeout_s = call_timeout_s
        self.route_timeout_s = route_timeout_s
        self.session: _Session | None = None
        self.reroutes = 0  # how often the session was opened again after a loss
        self.session_retries = 0  # session requests sent again (no answer in time, or busy)
        # why sessions were lost: "pushed" (membership), "refused" (ENOTCONN), "timeout"
        self.losses: collections.Counter[str] = collections.Counter()
        self._sessions_opened = 0
        self._pending_request: bytes | None = None  # a session request waiting for answers
        self._files_elsewhere = False  # some open file belongs to a lost session
        self._seeds = list(cluster)
        self._addresses: dict[str, str] = {}  # member name -> address
        self._epoch = 0
        prefix = CLIENT_KEY_IDENTITY_PREFIX if credentials.is_client_key \
            else CLIENT_IDENTITY_PREFIX
        self._transport = ClientTransport(f"{prefix}{uuid.uuid4().hex}", credentials,
                                          self._on_message, self._on_refused)
        self._refused: dict[str, str] = {}
        self._call_ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[m.Result | None]] = {}
        # request id -> (address that answered, answer)
        self._session_answers: dict[str, trio.MemorySendChannel[tuple[str, m.NodeMessage]]] = {}
        self._files: dict[int, _OpenFile] = {}
        self._handle_ids = itertools.count(1)
        self._route_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None

    @property
    def local_link(self) -> bool:
        """Whether the session's node is reached over the local link (no CURVE: it runs on
        this host; `clusterfs.txn.local_link`)."""
        session = self.session
        return session is not None and self._transport.local_links.get(session.address, False)

    # -- lifetime ---------------------------------------------------------------------------
    async def __aenter__(self) -> Client:
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        try:
            await self._nursery.start(self._transport.run)
            for address in self._seeds:
                self._transport.send(address, m.encode(m.Hello()))
            await self._route()
            self._nursery.start_soon(self._keep_alive)
        except BaseException:
            await self._close_nursery()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        session = self.session
        if session is not None:  # queued: the sockets linger a moment to send it
            self._transport.send(session.address, m.encode(m.CloseSession(session.session_id)))
        await self._close_nursery()
        return None

    async def _close_nursery(self) -> None:
        """Stop the background tasks. An exception of the caller's block is not handed to the
        nursery: it would come out wrapped in an exception group."""
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        await self._nursery_manager.__aexit__(None, None, None)

    async def _keep_alive(self) -> None:
        """Ping the session (it expires when idle) and say Hello to every member (they push
        membership changes to clients that did)."""
        while True:
            await trio.sleep(PING_INTERVAL_S)
            self._hello_all()
            session = self.session
            if session is not None:
                call = m.Call(session.session_id, next(self._call_ids), m.Ping())
                self._transport.send(session.address, m.encode(call))

    def _hello_all(self) -> None:
        hello = m.encode(m.Hello())
        for address in set(self._addresses.values()) | set(self._seeds):
            self._transport.send(address, hello)

    # -- messages from nodes ------------------------------------------------------------------
    def _on_message(self, address: str, payload: Buffer) -> None:
        try:
            message = m.decode_node(payload)
        except m.MessageError as exc:
            log.warning("unreadable message from %s: %s", address, exc)
            return
        match message:
            case m.Result(call_id):
                waiter = self._waiting.pop(call_id, None)
                if waiter is not None:
                    waiter.send_nowait(message)
            case m.HelloReply(version, node, epoch, members, serving):
                if version != m.PROTOCOL_VERSION:
                    self._refused[address] = f"it speaks protocol version {version}"
                    return
                self._learn(node, address, epoch, members, serving)
            case m.MembersChanged(node, epoch, members, serving):
                self._learn(node, address, epoch, members, serving)
            case SessionAccept(request_id) | SessionBusy(request_id):
                answers = self._session_answers.get(request_id)
                if answers is not None:
                    answers.send_nowait((address, message))
            case m.ProtocolFault(text, call_id):
                log.warning("%s could not read a message: %s", address, text)
                waiter = self._waiting.pop(call_id, None)
                if waiter is not None:
                    waiter.send_nowait(m.Result(call_id, errno.EPROTO, text))

    def _on_refused(self, address: str, reason: str) -> None:
        self._refused[address] = reason

    def _learn(self, node: str, address: str, epoch: int, members: list[m.Member],
               serving: bool) -> None:
        known = set(self._addresses.values()) | set(self._seeds)
        if epoch >= self._epoch and members:
            self._epoch = epoch
            self._addresses = {member.name: member.address for member in members}
        self._addresses.setdefault(node, address)
        if self._pending_request is not None:  # a member the request has not reached yet
            for new in set(self._addresses.values()) - known:
                self._transport.send(new, self._pending_request)
        session = self.session
        if session is None:
            return
        gone = epoch >= self._epoch and members and session.node not in self._addresses
        if gone or (node == session.node and not serving):
            log.info("node %s is %s: routing the session again", session.node,
                     "gone" if gone else "offline")
            self._lose(session, "pushed")

    def _lose(self, session: _Session, why: str) -> None:
        """Stop waiting on `session`'s node: every call in flight there is retried."""
        if self.session is session:
            self.losses[why] += 1
            self.session = None
            self._files_elsewhere = bool(self._files)
        for call_id, waiter in list(self._waiting.items()):
            del self._waiting[call_id]
            waiter.send_nowait(None)

    # -- routing ----------------------------------------------------------------------------
    async def _route(self) -> _Session:
        """The session, opened (again) if there is none."""
        if self.session is not None:
            return self.session
        async with self._route_lock:
            if self.session is not None:
                return self.session
            with trio.move_on_after(self.route_timeout_s):
                while True:
                    if self._all_refused():
                        break
                    session = await self._request_session()
                    if session is None:
                        self.session_retries += 1
                    else:
                        self.session = session
                        if self._sessions_opened:
                            self.reroutes += 1
                            log.info("session %s on node %s%s", session.session_id,
                                     session.node, " (local link)" if self.local_link else "")
                        self._sessions_opened += 1
                        return session
            raise ClientError(self._unreachable())

    async def _request_session(self) -> _Session | None:
        request_id = uuid.uuid4().hex
        send, receive = trio.open_memory_channel[tuple[str, m.NodeMessage]](64)
        self._session_answers[request_id] = send
        request = m.encode(SessionRequest(request_id, self.client_id, ""))
        # The seeds too: the members are not known before the first HelloReply, and `_learn`
        # sends the request on to any member it learns of meanwhile.
        self._pending_request = request
        try:
            for address in set(self._addresses.values()) | set(self._seeds):
                self._transport.send(address, request)
            with trio.move_on_after(OPEN_ATTEMPT_S):
                address, answer = await receive.receive()
                if isinstance(answer, SessionBusy):
                    await trio.sleep(answer.retry_after_s)
                    return None
                assert isinstance(answer, SessionAccept)
                return _Session(answer.node, address, answer.session_id)
            self._hello_all()  # no answer: maybe the members changed
            return None
        finally:
            self._pending_request = None
            del self._session_answers[request_id]

    def _all_refused(self) -> bool:
        addresses = set(self._addresses.values()) | set(self._seeds)
        return addresses <= set(self._refused)

    def _unreachable(self) -> str:
        addresses = sorted(set(self._addresses.values()) | set(self._seeds))
        refused = [f"{address}: {self._refused[address]}" for address in addresses
                   if address in self._refused]
        if refused:
            return "the cluster refused this client: " + "; ".join(refused)
        return (f"no node of the cluster answered within {self.route_timeout_s:g} s "
                f"(tried {', '.join(addresses)})")

    # -- calls ------------------------------------------------------------------------------
    async def _call(self, make_op: Callable[[], m.Op], path: str | None = None,
                    bulk: list[Buffer] | None = None) -> m.Value:
        """Run an operation in the session, re-routing and retrying while its node is lost.
        `make_op` builds it for the current session (handles differ per session); `path`
        names the file in an error; `bulk`: the op's last field, sent uncopied (see
        `m.encode_pieces`)."""
        while True:
            session = await self._route()
            try:
                op = await self._reopened(session, make_op)
                return await self._call_once(session, op, path, bulk)
            except _Lost as lost:
                self._lose(session, str(lost))

    async def _call_once(self, session: _Session, op: m.Op, path: str | None = None,
                         bulk: list[Buffer] | None = None) -> m.Value:
        call_id = next(self._call_ids)
        call = m.Call(session.session_id, call_id, op)
        message = m.encode(call) if bulk is None else m.encode_pieces(call, bulk)
        message_bytes = size_bytes(message)
        if message_bytes > MAX_PAYLOAD_BYTES:  # the transport would drop it: no answer ever
            raise OSError(errno.EMSGSIZE, f"a call of {message_bytes} bytes is more than the "
                          f"{MAX_PAYLOAD_BYTES} a message may carry", path)
        send, receive = trio.open_memory_channel[m.Result | None](1)
        self._waiting[call_id] = send
        self._transport.send(session.address, message)
        # A flush, or a disk command that flushes, may take long; a dead node is pushed.
        timeout_s = max(self.call_timeout_s, FSYNC_TIMEOUT_S) \
            if isinstance(op, (m.Fsync, m.Tunnel)) else self.call_timeout_s
        with trio.move_on_after(timeout_s):
            result = await receive.receive()
            if result is None:
                raise _Lost("pushed")  # already lost: `_lose` woke this call
            if result.errno == errno.ENOTCONN:
                log.info("%s", result.message)
                raise _Lost("refused")
            if result.errno:
                raise OSError(result.errno, result.message or os.strerror(result.errno), path)
            return result.value
        self._waiting.pop(call_id, None)
        log.info("no answer from %s within %g s", session.node, timeout_s)
        raise _Lost("timeout")

    async def _reopened(self, session: _Session, make_op: Callable[[], m.Op]) -> m.Op:
        """Open again, in this session, the files that were open in a lost one."""
        if not self._files_elsewhere:
            return make_op()
        for open_file in list(self._files.values()):
            if open_file.session_id != session.session_id:
                flags = open_file.flags & _REOPEN_MASK
                value = await self._call_once(session, m.Reopen(open_file.ino, flags))
                assert isinstance(value, m.Handle)
                open_file.server_handle = value.handle
                open_file.session_id = session.session_id
        self._files_elsewhere = False
        return make_op()

    def _file(self, handle: int) -> _OpenFile:
        try:
            return self._files[handle]
        except KeyError:
            raise OSError(errno.EBADF, "not an open handle of this client") from None

    # -- the operations -------------------------------------------------------------------------
    async def stat(self, path: str) -> m.Attrs:
        return _expect(await self._call(lambda: m.Stat(path), path), m.Attrs)

    async def lookup(self, dir_path: str, name: str) -> m.Attrs:
        value = await self._call(lambda: m.Lookup(dir_path, name), f"{dir_path}/{name}")
        return _expect(value, m.Attrs)

    async def listdir(self, path: str) -> list[m.DirEntry]:
        entries: list[m.DirEntry] = []
        cookie = 0
        while True:
            page = _expect(await self._call(functools.partial(m.Readdir, path, cookie), path),
                           m.Entries)
            entries += page.entries
            if not page.next_cookie:
                return entries
            cookie = page.next_cookie

    async def mkdir(self, path: str, mode: int = 0o755) -> m.Attrs:
        return _expect(await self._call(lambda: m.Mkdir(path, mode), path), m.Attrs)

    async def open(self, path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
        """Open (os.O_CREAT: create) a file; returns this client's handle for it."""
        session_ids: list[str] = []

        def make_op() -> m.Op:
            assert self.session is not None
            session_ids.append(self.session.session_id)
            return m.Open(path, flags, mode)

        value = _expect(await self._call(make_op, path), m.Handle)
        handle = next(self._handle_ids)
        self._files[handle] = _OpenFile(value.attrs.ino, flags, value.handle, session_ids[-1])
        return handle

    async def read(self, handle: int, offset: int, size: int) -> bytes:
        return bytes(_expect(await self._call(
            lambda: m.Read(self._file(handle).server_handle, offset, size)), m.Data).data)

    async def write(self, handle: int, offset: int, data: bytes) -> int:
        return _expect(await self._call(
            lambda: m.Write(self._file(handle).server_handle, offset, data)), m.Count).count

    async def fsync(self, handle: int, datasync: bool = False) -> None:
        await self._call(lambda: m.Fsync(self._file(handle).server_handle, datasync))

    async def close(self, handle: int) -> None:
        open_file = self._file(handle)
        try:
            if self.session is not None and open_file.session_id == self.session.session_id:
                await self._call_once(self.session, m.Close(open_file.server_handle))
        except _Lost:
            pass  # the node is gone, and the handle with it
        finally:
            del self._files[handle]

    async def truncate(self, path: str, size: int) -> m.Attrs:
        return _expect(await self._call(lambda: m.Truncate(path, size), path), m.Attrs)

    async def unlink(self, path: str) -> None:
        await self._call(lambda: m.Unlink(path), path)

    async def rmdir(self, path: str) -> None:
        await self._call(lambda: m.Rmdir(path), path)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        await self._call(lambda: m.Rename(old, new, flags), old)

    async def symlink(self, path: str, target: str) -> m.Attrs:
        return _expect(await self._call(lambda: m.Symlink(path, target), path), m.Attrs)

    async def readlink(self, path: str) -> str:
        return _expect(await self._call(lambda: m.Readlink(path), path), m.Text).text

    async def getxattr(self, path: str, name: bytes) -> bytes:
        return bytes(_expect(await self._call(lambda: m.GetXattr(path, name), path),
                             m.Data).data)

    async def setxattr(self, path: str, name: bytes, value: bytes) -> None:
        await self._call(lambda: m.SetXattr(path, name, value), path)

    async def listxattr(self, path: str) -> list[bytes]:
        return _expect(await self._call(lambda: m.ListXattr(path), path), m.Names).names

    async def removexattr(self, path: str, name: bytes) -> None:
        await self._call(lambda: m.RemoveXattr(path, name), path)

    async def tunnel(self, handle: int, payload: list[Buffer]) -> memoryview:
        """Send `payload` (in pieces, which are not copied) to the node's tunnel service
        on `handle`; its answer, a view of the message that carried it."""
        return _expect(await self._call(
            lambda: m.Tunnel(self._file(handle).server_handle, memoryview(b"")),
            bulk=payload), m.Data).data


def _expect(value: m.Value, kind: type[T]) -> T:
    if not isinstance(value, kind):
        raise OSError(errno.EPROTO, f"expected {kind.__name__}, got {type(value).__name__}")
    return value


class BlockingClient:
    """`Client` for code without trio: the same calls, blocking; runs trio in a thread.

        with BlockingClient(["127.0.0.1:7000"], credentials) as client:
            print(client.stat("/"))
    """

    def __init__(self, cluster: list[str], credentials: Credentials,
                 client_id: str | None = None, **options: Any) -> None:
        self._client = Client(cluster, credentials, client_id, **options)
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True,
                                        name="clusterfs-client")
        self._stop: trio.Event | None = None

    def __enter__(self) -> BlockingClient:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._token is not None and self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        try:
            async with self._client:
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # handed to the caller of __enter__
            if self._ready.is_set():
                raise
            self._error = exc
            self._ready.set()

    def _run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    @property
    def session(self) -> _Session | None:
        return self._client.session

    def stat(self, path: str) -> m.Attrs:
        return self._run(self._client.stat, path)

    def listdir(self, path: str) -> list[m.DirEntry]:
        return self._run(self._client.listdir, path)

    def mkdir(self, path: str, mode: int = 0o755) -> m.Attrs:
        return self._run(self._client.mkdir, path, mode)

    def open(self, path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
        return self._run(self._client.open, path, flags, mode)

    def read(self, handle: int, offset: int, size: int) -> bytes:
        return self._run(self._client.read, handle, offset, size)

    def write(self, handle: int, offset: int, data: bytes) -> int:
        return self._run(self._client.write, handle, offset, data)

    def fsync(self, handle: int, datasync: bool = False) -> None:
        self._run(self._client.fsync, handle, datasync)

    def close(self, handle: int) -> None:
        self._run(self._client.close, handle)

    def truncate(self, path: str, size: int) -> m.Attrs:
        return self._run(self._client.truncate, path, size)

    def unlink(self, path: str) -> None:
        self._run(self._client.unlink, path)

    def rmdir(self, path: str) -> None:
        self._run(self._client.rmdir, path)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        self._run(self._client.rename, old, new, flags)

    def symlink(self, path: str, target: str) -> m.Attrs:
        return self._run(self._client.symlink, path, target)

    def readlink(self, path: str) -> str:
        return self._run(self._client.readlink, path)

    def getxattr(self, path: str, name: bytes) -> bytes:
        return self._run(self._client.getxattr, path, name)

    def setxattr(self, path: str, name: bytes, value: bytes) -> None:
        self._run(self._client.setxattr, path, name, value)

    def listxattr(self, path: str) -> list[bytes]:
        return self._run(self._client.listxattr, path)

    def removexattr(self, path: str, name: bytes) -> None:
        self._run(self._client.removexattr, path, name)
