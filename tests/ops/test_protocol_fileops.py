"""`FileOps`, the protocol's operations, against a temporary replica and block directory
with the local committer: the TUNNEL call hands the session's open file and the payload to
the node's tunnel service and returns its reply; sessions cannot use each other's handles."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from clusterfs.blockdir import format_blockdir
from clusterfs.committer import LocalCommitter
from clusterfs.filesystem import FileSystem
from clusterfs.namespace import NamespaceError
from clusterfs.node import open_replica
from clusterfs.protocol import messages as m
from clusterfs.protocol.ops import FileOps


@pytest.fixture
async def fs(tmp_path: Path) -> AsyncIterator[FileSystem]:
    blockdir = format_blockdir(tmp_path / "blocks")
    store = open_replica(tmp_path / "state", blockdir)
    fs = FileSystem(store, blockdir)
    committer = LocalCommitter(store, fs.on_applied)
    fs.committer = committer
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        yield fs
        fs.close_all()
        nursery.cancel_scope.cancel()
    store.close()


async def test_tunnel_hands_the_open_file_and_payload_to_the_service(fs: FileSystem) -> None:
    seen: list[tuple[int, bytes]] = []

    async def service(ino: int, fd: int, payload: bytes) -> bytes:
        seen.append((ino, payload))
        return b"reply:" + os.pread(fd, 100, 0)  # the service works on the file itself

    ops = FileOps(fs, service)
    handles: set[int] = set()
    opened = await ops.run(m.Open("/disk", os.O_RDWR | os.O_CREAT), handles)
    assert isinstance(opened, m.Handle)
    await ops.run(m.Write(opened.handle, 0, b"sector data"), handles)
    reply = await ops.run(m.Tunnel(opened.handle, b"\x00request"), handles)
    assert reply == m.Data(b"reply:sector data")
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
