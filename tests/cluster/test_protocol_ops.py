"""Every call of the file protocol against the shared 3-node cluster (real node processes),
checked through the FUSE mounts of the nodes, and its errors as errnos."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from clusterfs.client import BlockingClient, Client
from clusterfs.credentials import Credentials
from clusterfs.protocol import messages as m
from tests.cluster.conftest import Cluster, addresses_of

pytestmark = pytest.mark.mount


async def test_namespace_calls_are_seen_through_every_mount(
        shared_cluster: Cluster, credentials: Credentials, croot: str) -> None:
    async with Client(addresses_of(shared_cluster), credentials, "ops-namespace") as client:
        top = f"/{croot}"
        made = await client.mkdir(f"{top}/d", 0o750)
        assert made.mode & 0o7777 == 0o750
        await client.symlink(f"{top}/link", "d/target")
        await client.setxattr(f"{top}/d", b"user.colour", b"blue")
        handle = await client.open(f"{top}/d/f", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        await client.close(handle)
        await client.rename(f"{top}/d/f", f"{top}/d/g")
        for mount in shared_cluster.mounts:
            here = mount / croot
            assert sorted(os.listdir(here / "d")) == ["g"]
            assert os.readlink(here / "link") == "d/target"
            assert os.getxattr(here / "d", "user.colour") == b"blue"
            assert os.stat(here / "d/g").st_mode & 0o7777 == 0o600
            assert os.stat(here / "d").st_ino == made.ino  # one inode number everywhere
        assert await client.readlink(f"{top}/link") == "d/target"
        assert await client.getxattr(f"{top}/d", b"user.colour") == b"blue"
        assert b"user.colour" in await client.listxattr(f"{top}/d")
        await client.removexattr(f"{top}/d", b"user.colour")
        assert await client.listxattr(f"{top}/d") == []
        assert [entry.name for entry in await client.listdir(f"{top}/d")] == ["g"]
        assert (await client.lookup(f"{top}/d", "g")).ino == os.stat(
            shared_cluster.mnt(2) / croot / "d/g").st_ino
        await client.unlink(f"{top}/d/g")
        await client.unlink(f"{top}/link")
        await client.rmdir(f"{top}/d")
        for mount in shared_cluster.mounts:
            assert os.listdir(mount / croot) == []


async def test_data_written_through_the_protocol_is_read_through_a_mount_and_back(
        shared_cluster: Cluster, credentials: Credentials, croot: str) -> None:
    payload = os.urandom(3 << 20) + b"tail"
    async with Client(addresses_of(shared_cluster), credentials, "ops-data") as client:
        handle = await client.open(f"/{croot}/data", os.O_RDWR | os.O_CREAT)
        assert await client.write(handle, 0, payload) == len(payload)
        await client.fsync(handle)
        await client.close(handle)
        for mount in shared_cluster.mounts:
            assert (mount / croot / "data").read_bytes() == payload
        (shared_cluster.mnt(1) / croot / "data").write_bytes(b"rewritten on n2")
        handle = await client.open(f"/{croot}/data", os.O_RDONLY)
        assert await client.read(handle, 0, 100) == b"rewritten on n2"
        await client.close(handle)
        attrs = await client.truncate(f"/{croot}/data", 4)
        assert attrs.size == 4
        assert (shared_cluster.mnt(2) / croot / "data").read_bytes() == b"rewr"
        handle = await client.open(f"/{croot}/data", os.O_RDWR | os.O_TRUNC)
        assert (await client.stat(f"/{croot}/data")).size == 0
        await client.close(handle)


async def test_a_file_unlinked_while_a_session_holds_it_open_keeps_its_data(
        shared_cluster: Cluster, credentials: Credentials, croot: str) -> None:
    async with Client(addresses_of(shared_cluster), credentials, "ops-unlinked") as client:
        handle = await client.open(f"/{croot}/doomed", os.O_RDWR | os.O_CREAT)
        await client.write(handle, 0, b"still here")
        for mount in shared_cluster.mounts:  # whichever node holds the session
            (mount / croot / "doomed").unlink(missing_ok=True)
        assert await client.read(handle, 0, 100) == b"still here"
        with pytest.raises(FileNotFoundError):
            await client.stat(f"/{croot}/doomed")
        await client.close(handle)


@pytest.mark.parametrize(("op", "code"), [
    (m.Stat("/no/such/file"), errno.ENOENT),
    (m.Stat("relative/path"), errno.EINVAL),
    (m.Stat("/nul\0inside"), errno.EINVAL),
    (m.Stat("/" + "x" * 256), errno.ENAMETOOLONG),
    (m.Mkdir("/"), errno.EBUSY),
    (m.Rmdir("/.."), errno.EINVAL),
    (m.Read(12345, 0, 10), errno.EBADF),
    (m.Write(12345, 0, b"x"), errno.EBADF),
    (m.Tunnel(12345, b"x"), errno.EBADF),
    (m.Readlink("/"), errno.EINVAL),
])
async def test_bad_calls_get_errnos(shared_cluster: Cluster, credentials: Credentials,
                                    op: m.Op, code: int) -> None:
    async with Client(addresses_of(shared_cluster), credentials, "ops-errors") as client:
        with pytest.raises(OSError) as caught:
            await client._call(lambda: op)
        assert caught.value.errno == code, caught.value


async def test_a_call_too_large_for_a_message_is_refused_at_once(
        shared_cluster: Cluster, credentials: Credentials, croot: str) -> None:
    """More than a message may carry would be dropped by the transport, unanswered: the
    client refuses it before sending (it used to wait and retry forever)."""
    async with Client(addresses_of(shared_cluster), credentials, "ops-huge") as client:
        handle = await client.open(f"/{croot}/huge", os.O_RDWR | os.O_CREAT)
        with trio.fail_after(10), pytest.raises(OSError) as caught:
            await client.write(handle, 0, bytes(65 << 20))
        assert caught.value.errno == errno.EMSGSIZE
        with pytest.raises(OSError) as caught:  # within a message, over the call's limit
            await client.write(handle, 0, bytes(8 << 20))
        assert caught.value.errno == errno.EMSGSIZE
        assert await client.write(handle, 0, b"fine") == 4
        await client.close(handle)


async def test_errnos_of_the_namespace_are_those_of_a_local_file_system(
        shared_cluster: Cluster, credentials: Credentials, croot: str) -> None:
    top = f"/{croot}"
    async with Client(addresses_of(shared_cluster), credentials, "ops-errnos") as client:
        await client.mkdir(f"{top}/d")
        handle = await client.open(f"{top}/d/f", os.O_WRONLY | os.O_CREAT)
        await client.close(handle)
        cases = [
            (client.mkdir(f"{top}/d"), errno.EEXIST),
            (client.open(f"{top}/d/f", os.O_WRONLY | os.O_CREAT | os.O_EXCL), errno.EEXIST),
            (client.rmdir(f"{top}/d"), errno.ENOTEMPTY),
            (client.stat(f"{top}/d/f/below"), errno.ENOTDIR),
            (client.unlink(f"{top}/d"), errno.EISDIR),
            (client.open(f"{top}/d", os.O_RDONLY), errno.EISDIR),
            (client.rename(f"{top}/d", f"{top}/d/inside"), errno.EINVAL),
            (client.getxattr(f"{top}/d", b"user.none"), errno.ENODATA),
            (client.open(f"{top}/missing", os.O_RDONLY), errno.ENOENT),
        ]
        for call, code in cases:
            with pytest.raises(OSError) as caught:
                await call
            assert caught.value.errno == code, caught.value


async def test_paths_cannot_leave_the_cluster_namespace(
        shared_cluster: Cluster, credentials: Credentials, croot: str) -> None:
    async with Client(addresses_of(shared_cluster), credentials, "ops-escape") as client:
        root = await client.stat("/")
        assert (await client.stat("/../../..")).ino == root.ino
        assert (await client.stat(f"/{croot}/../..")).ino == root.ino
        await client.mkdir(f"/../../{croot}/made")  # ".." of the root is the root
        assert (shared_cluster.mnt(0) / croot / "made").is_dir()
        await client.symlink(f"/{croot}/out", "/etc")
        with pytest.raises(OSError) as caught:  # links are not followed
            await client.stat(f"/{croot}/out/passwd")
        assert caught.value.errno == errno.ENOTDIR
        # Nothing the client named was made outside the block directory or the namespace.
        assert not os.path.exists("/made")
        blockdir_names = set(os.listdir(shared_cluster.blockdir))
        assert "made" not in blockdir_names and croot not in blockdir_names


def test_the_blocking_client_does_the_same(
        shared_cluster: Cluster, credentials: Credentials, croot: str) -> None:
    with BlockingClient(addresses_of(shared_cluster), credentials, "ops-blocking") as client:
        handle = client.open(f"/{croot}/b", os.O_RDWR | os.O_CREAT)
        client.write(handle, 0, b"blocking")
        client.close(handle)
        assert [entry.name for entry in client.listdir(f"/{croot}")] == ["b"]
        with pytest.raises(FileNotFoundError):
            client.stat(f"/{croot}/nothing")
        assert client.session is not None
        sessions = {entry["name"]: entry["sessions"]
                    for entry in shared_cluster.status(0)["nodes"]}
        assert sessions[client.session.node] >= 1, sessions
    assert (shared_cluster.mnt(2) / croot / "b").read_bytes() == b"blocking"
