"""`FileOps`, the protocol's operations, against a temporary replica and block directory
with the local committer: the TUNNEL call hands the session's open file and the payload to
the node's tunnel service and returns its reply; sessions cannot use each other's handles;
and the `ProtocolServer` answers a session's calls in order, its TUNNEL calls side by side."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from clusterfs.filesystem import FileSystem
from clusterfs.namespace import NamespaceError
from clusterfs.pieces import Buffer, joined
from clusterfs.protocol import messages as m
from clusterfs.protocol.ops import FileOps
from clusterfs.protocol.server import ProtocolServer
from lb.messages import SessionAccept, SessionRequest
from tests.ops.conftest import Rig


@pytest.fixture
def fs(rig: Rig) -> FileSystem:
    return rig.fs


async def test_tunnel_hands_the_open_file_and_payload_to_the_service(fs: FileSystem) -> None:
    seen: list[tuple[int, bytes]] = []

    async def service(ino: int, fd: int, payload: memoryview) -> list[Buffer]:
        seen.append((ino, payload))
        return [b"reply:", os.pread(fd, 100, 0)]  # the service works on the file itself

    ops = FileOps(fs, service)
    handles: set[int] = set()
    opened = await ops.run(m.Open("/disk", os.O_RDWR | os.O_CREAT), handles)
    assert isinstance(opened, m.Handle)
    await ops.run(m.Write(opened.handle, 0, b"sector data"), handles)
    reply = await ops.run(m.Tunnel(opened.handle, memoryview(b"\x00request")), handles)
    assert reply == m.DataPieces([b"reply:", b"sector data"])  # joined only by the socket
    assert seen == [(opened.attrs.ino, b"\x00request")]

    other_session: set[int] = set()
    with pytest.raises(NamespaceError) as caught:
        await ops.run(m.Tunnel(opened.handle, b"x"), other_session)
    assert caught.value.errno == errno.EBADF
    await ops.run(m.Close(opened.handle), handles)
    assert handles == set()


async def test_without_a_tunnel_service_tunnel_is_not_supported(fs: FileSystem) -> None:
    ops = FileOps(fs)
    handles: set[int] = set()
    opened = await ops.run(m.Open("/f", os.O_RDWR | os.O_CREAT), handles)
    assert isinstance(opened, m.Handle)
    with pytest.raises(NamespaceError) as caught:
        await ops.run(m.Tunnel(opened.handle, b"x"), handles)
    assert caught.value.errno == errno.EOPNOTSUPP
    ops.close_all(handles)


async def test_readdir_pages_resume_after_their_cookie(fs: FileSystem) -> None:
    ops = FileOps(fs)
    await ops.run(m.Mkdir("/d"), set())
    for i in range(25):
        await ops.run(m.Mkdir(f"/d/e{i:02d}"), set())
    names: list[str] = []
    cookie = 0
    while True:
        page = await ops.run(m.Readdir("/d", cookie, limit=10), set())
        assert isinstance(page, m.Entries) and len(page.entries) <= 10
        names += [entry.name for entry in page.entries]
        if not page.next_cookie:
            break
        cookie = page.next_cookie
    assert names == [f"e{i:02d}" for i in range(25)]


async def test_a_read_after_a_write_of_the_same_session_sees_the_write(fs: FileSystem) -> None:
    """Reads are answered at once when nothing of the session is pending, never ahead of
    an earlier call that is still running (a write that must drop a setgid bit, an open)."""
    sent: list[m.NodeMessage] = []
    server = ProtocolServer("n1", FileOps(fs), lambda _client, payload: sent.append(
        m.decode_node(joined(payload))), lambda _to, _payload: None, incarnation=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        server.on_view(1, [m.Member("n1", "127.0.0.1:1")])
        server.on_client("cli-a", m.encode(SessionRequest("r1", "host-a", "")))
        accept = next(message for message in sent if isinstance(message, SessionAccept))
        session_id = accept.session_id

        def call(call_id: int, op: m.Op) -> None:
            server.on_client("cli-a", m.encode(m.Call(session_id, call_id, op)))

        call(1, m.Open("/f", os.O_RDWR | os.O_CREAT))  # waits for its commit
        await _answered(sent, 1)
        handle = _value(sent, 1)
        assert isinstance(handle, m.Handle)
        call(2, m.Write(handle.handle, 0, b"written first"))  # a task (it may commit)
        call(3, m.Read(handle.handle, 0, 100))  # arrives while the write is pending
        await _answered(sent, 3)
        assert [r.call_id for r in sent if isinstance(r, m.Result)] == [1, 2, 3]
        assert _value(sent, 3) == m.Data(b"written first")
        call(4, m.Read(handle.handle, 0, 7))  # nothing pending: answered at once
        assert _value(sent, 4) == m.Data(b"written")
        nursery.cancel_scope.cancel()
    server.close_all()


async def test_tunnel_calls_of_a_session_run_side_by_side(fs: FileSystem) -> None:
    """Disk commands of one session do not wait for each other: the second is answered
    while the first still runs (a VM keeps many in flight, in no set order)."""
    release_first = trio.Event()

    async def service(ino: int, fd: int, payload: memoryview) -> list[Buffer]:
        if payload == b"first":
            await release_first.wait()
        return [b"echo:", payload]

    sent: list[m.NodeMessage] = []
    server = ProtocolServer("n1", FileOps(fs, service), lambda _client, payload: sent.append(
        m.decode_node(joined(payload))), lambda _to, _payload: None, incarnation=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        server.on_view(1, [m.Member("n1", "127.0.0.1:1")])
        server.on_client("cli-a", m.encode(SessionRequest("r1", "host-a", "")))
        accept = next(message for message in sent if isinstance(message, SessionAccept))

        def call(call_id: int, op: m.Op) -> None:
            server.on_client("cli-a", m.encode(m.Call(accept.session_id, call_id, op)))

        call(1, m.Open("/disk", os.O_RDWR | os.O_CREAT))
        await _answered(sent, 1)
        handle = _value(sent, 1)
        assert isinstance(handle, m.Handle)
        call(2, m.Tunnel(handle.handle, b"first"))
        call(3, m.Tunnel(handle.handle, b"second"))
        await _answered(sent, 3)
        assert not any(isinstance(r, m.Result) and r.call_id == 2 for r in sent)
        release_first.set()
        await _answered(sent, 2)
        assert (_value(sent, 2), _value(sent, 3)) == (m.Data(memoryview(b"echo:first")),
                                                      m.Data(memoryview(b"echo:second")))
        nursery.cancel_scope.cancel()
    server.close_all()


async def _answered(sent: list[m.NodeMessage], call_id: int) -> None:
    with trio.fail_after(10):
        while not any(isinstance(r, m.Result) and r.call_id == call_id for r in sent):
            await trio.sleep(0.01)


def _value(sent: list[m.NodeMessage], call_id: int) -> m.Value:
    result = next(r for r in sent if isinstance(r, m.Result) and r.call_id == call_id)
    assert result.errno == 0, result
    return result.value


async def test_reopen_finds_a_file_by_inode_after_a_rename_and_an_unlink(
        fs: FileSystem) -> None:
    ops = FileOps(fs)
    first: set[int] = set()
    opened = await ops.run(m.Open("/f", os.O_RDWR | os.O_CREAT), first)
    assert isinstance(opened, m.Handle)
    await ops.run(m.Write(opened.handle, 0, b"kept"), first)
    await ops.run(m.Rename("/f", "/g"), first)
    moved: set[int] = set()
    again = await ops.run(m.Reopen(opened.attrs.ino, os.O_RDWR | os.O_TRUNC), moved)
    assert isinstance(again, m.Handle) and again.attrs.ino == opened.attrs.ino
    assert await ops.run(m.Read(again.handle, 0, 10), moved) == m.Data(b"kept")  # no O_TRUNC
    await ops.run(m.Unlink("/g"), first)
    later: set[int] = set()  # unlinked but still open: its data is still there
    last = await ops.run(m.Reopen(opened.attrs.ino, os.O_RDONLY), later)
    assert isinstance(last, m.Handle)
    assert await ops.run(m.Read(last.handle, 0, 10), later) == m.Data(b"kept")
    for handles in (first, moved, later):
        ops.close_all(handles)
    with pytest.raises(NamespaceError) as caught:
        await ops.run(m.Reopen(987654, os.O_RDONLY), set())
    assert caught.value.errno == errno.ENOENT
