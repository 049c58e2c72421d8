"""The local link (`clusterfs.txn.local_link`): a client on a node's host reaches it over a
unix socket without CURVE, and only with the cluster's secret, over real zmq sockets.

The socket directory is a private directory of the test's (LOCAL_LINK_DIR patched), not
/run/clusterfs. A node binds its local link only as root, so most tests need root."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import zmq

from clusterfs.credentials import Credentials
from clusterfs.txn import local_link
from clusterfs.txn.transport import (
    CHANNEL_CONTROL,
    CHANNEL_PROTOCOL,
    CHANNEL_TXN,
    USER_LOCAL,
    ClientTransport,
    Transport,
    new_keypair,
    zap_reply,
)
from tests.unit.test_transport import free_address, wait_for_warning

WAIT_S = 5.0
QUIET_S = 0.5  # long enough for a message that got through to arrive
CLUSTER = Credentials(*new_keypair())
OTHER_CLUSTER = Credentials(*new_keypair())
CLIENT_KEY = Credentials(*new_keypair(), server_key=CLUSTER.public_key)
needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="a node binds its local link as root only")


@pytest.fixture(autouse=True)
def link_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "run"
    monkeypatch.setattr(local_link, "LOCAL_LINK_DIR", directory)
    return directory


def _zap_plain(username: bytes, password: bytes) -> list[bytes]:
    return [b"1.0", b"id-9", b"", b"localhost:0:0:1", b"peer", b"PLAIN", username, password]


def test_zap_admits_the_local_link_password_where_the_node_has_a_local_link() -> None:
    good = _zap_plain(local_link.PLAIN_USERNAME, local_link.password(CLUSTER))
    reply, refusal = zap_reply(good, CLUSTER.public_key, local_password=local_link.password(
        CLUSTER))
    assert (reply[2], reply[4], refusal) == (b"200", USER_LOCAL, "")
    for request in (_zap_plain(local_link.PLAIN_USERNAME, local_link.password(OTHER_CLUSTER)),
                    _zap_plain(b"admin", local_link.password(CLUSTER)),
                    _zap_plain(local_link.PLAIN_USERNAME, b"")):
        reply, refusal = zap_reply(request, CLUSTER.public_key,
                                   local_password=local_link.password(CLUSTER))
        assert (reply[2], reply[4]) == (b"400", b"")
        assert refusal == "not the cluster's local link password"
    reply, refusal = zap_reply(good, CLUSTER.public_key)  # a node without a local link
    assert (reply[2], refusal) == (b"400", "mechanism b'PLAIN', not CURVE")


def test_the_password_and_the_path_are_the_clusters_own() -> None:
    assert local_link.password(CLUSTER) != local_link.password(OTHER_CLUSTER)
    assert CLUSTER.secret_key not in local_link.password(CLUSTER)
    path = local_link.link_path(CLUSTER.cluster_key, "127.0.0.1:7000")
    assert path == local_link.link_path(CLIENT_KEY.cluster_key, "127.0.0.1:7000")
    assert path != local_link.link_path(OTHER_CLUSTER.cluster_key, "127.0.0.1:7000")
    assert path != local_link.link_path(CLUSTER.cluster_key, "127.0.0.1:7001")
    assert len(str(path)) < 100 or path.parent != Path("/run/clusterfs")  # sun_path limit


@needs_root
def test_a_client_uses_only_a_socket_in_a_private_directory(link_dir: Path) -> None:
    address = "127.0.0.1:7000"
    assert local_link.client_path(CLUSTER, address) is None  # no directory
    assert local_link.server_path(CLUSTER, address) is not None  # makes it, mode 0700
    assert stat.S_IMODE(link_dir.stat().st_mode) == 0o700
    assert local_link.client_path(CLUSTER, address) is None  # no socket yet
    listener: zmq.Socket[bytes]
    with zmq.Context.instance().socket(zmq.ROUTER) as listener:
        listener.bind(f"ipc://{local_link.link_path(CLUSTER.cluster_key, address)}")
        assert local_link.client_path(CLUSTER, address) == local_link.link_path(
            CLUSTER.cluster_key, address)
        assert local_link.client_path(CLIENT_KEY, address) is None
        assert local_link.server_path(CLIENT_KEY, address) is None
        link_dir.chmod(0o755)  # others could have put a socket there: not trusted
        assert local_link.client_path(CLUSTER, address) is None
        assert local_link.server_path(CLUSTER, address) is None


class Replies:
    """What a ClientTransport receives: (address, payload)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.refused: list[str] = []
        self.changed = trio.Event()

    def on_message(self, address: str, payload: bytes) -> None:
        self.received.append((address, payload))
        self.changed.set()
        self.changed = trio.Event()

    def on_refused(self, address: str, reason: str) -> None:
        self.refused.append(reason)

    async def wait_for(self, count: int) -> list[tuple[str, bytes]]:
        with trio.fail_after(WAIT_S):
            while len(self.received) < count:
                await self.changed.wait()
        return self.received


async def start_echo_node(nursery: trio.Nursery, received: list[tuple[bytes, bytes]]
                          ) -> Transport:
    """A node that answers every file protocol message with b"echo:" + the message."""
    node = Transport("a", free_address(), lambda name: None, CLUSTER)

    def echo(client: str, payload: bytes) -> None:
        received.append((CHANNEL_PROTOCOL, payload))
        node.reply(client, CHANNEL_PROTOCOL, b"echo:" + payload)

    node.on(CHANNEL_PROTOCOL, echo)
    node.on(CHANNEL_TXN, lambda sender, payload: received.append((CHANNEL_TXN, payload)))
    node.on_control(lambda payload: b"control answer")
    await nursery.start(node.run)
    return node


@needs_root
async def test_a_client_on_the_nodes_host_talks_over_the_local_link(link_dir: Path) -> None:
    received: list[tuple[bytes, bytes]] = []
    async with trio.open_nursery() as nursery:
        node = await start_echo_node(nursery, received)
        assert node.local_link is not None
        assert stat.S_ISSOCK(os.lstat(node.local_link).st_mode)
        assert Path(node.local_link).parent == link_dir
        replies = Replies()
        client = ClientTransport("cli-local", CLUSTER, replies.on_message, replies.on_refused)
        await nursery.start(client.run)
        client.send(node.listen, b"x" * (1 << 20))  # large: sent without a copy
        assert await replies.wait_for(1) == [(node.listen, b"echo:" + b"x" * (1 << 20))]
        assert client.local_links == {node.listen: True}
        # A client key cannot prove the cluster's secret: it keeps to CURVE over TCP.
        keyed = ClientTransport("key-remote", CLIENT_KEY, replies.on_message,
                                replies.on_refused)
        await nursery.start(keyed.run)
        keyed.connect(node.listen)
        assert keyed.local_links == {node.listen: False}
        nursery.cancel_scope.cancel()
    assert not os.path.exists(node.local_link or "")  # removed when the node stops
    assert replies.refused == []


@contextmanager
def stranger(endpoint: str, mechanism: str, password: bytes = b"") -> Iterator[zmq.Socket[bytes]]:
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, b"cli-stranger")
    if mechanism == "PLAIN":
        dealer.setsockopt(zmq.PLAIN_USERNAME, local_link.PLAIN_USERNAME)
        dealer.setsockopt(zmq.PLAIN_PASSWORD, password)
    try:
        dealer.connect(endpoint)
        yield dealer
    finally:
        dealer.close()


@needs_root
async def test_the_local_link_admits_only_the_password_and_only_the_protocol(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    received: list[tuple[bytes, bytes]] = []
    node = await start_echo_node(nursery, received)
    link = f"ipc://{node.local_link}"
    right = local_link.password(CLUSTER)
    # Refused: another cluster's password; no mechanism at all; the right password over
    # TCP, which stays CURVE only although the ROUTER took PLAIN for the local link.
    for endpoint, mechanism, password in ((link, "PLAIN", local_link.password(OTHER_CLUSTER)),
                                          (link, "NULL", b""),
                                          (f"tcp://{node.listen}", "PLAIN", right)):
        with stranger(endpoint, mechanism, password) as dealer:
            dealer.send_multipart([CHANNEL_PROTOCOL, b"from a stranger"])
            dealer.send_multipart([CHANNEL_CONTROL, b"from a stranger"])
            await trio.sleep(QUIET_S)
            assert dealer.poll(0) == 0, (endpoint, mechanism)
    await wait_for_warning(caplog, "not the cluster's local link password")
    assert received == []
    # Admitted: the right password over the local link, for the file protocol only.
    with stranger(link, "PLAIN", right) as dealer:
        dealer.send_multipart([CHANNEL_TXN, b"a", b"not for a client"])
        dealer.send_multipart([CHANNEL_CONTROL, b"not for a client"])
        dealer.send_multipart([CHANNEL_PROTOCOL, b"hello"])
        with trio.fail_after(WAIT_S):
            while not dealer.poll(0):
                await trio.sleep(0.01)
        assert dealer.recv_multipart() == [CHANNEL_PROTOCOL, b"echo:hello"]
        await trio.sleep(QUIET_S)
        assert dealer.poll(0) == 0  # no control answer
    assert received == [(CHANNEL_PROTOCOL, b"hello")]
    await wait_for_warning(caplog, "the local link may only use the file protocol")
