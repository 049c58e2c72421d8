"""The local link (`clusterfs.txn.local_link`, `local_stream`): a client on a node's host
reaches it over a unix socket, without CURVE or ZeroMQ, and only with the cluster's secret.

The socket directory is a private directory of the test's (LOCAL_LINK_DIR patched), not
/run/clusterfs. A node binds its local link only as root, so the tests with a node need
root; the framing and the hello are checked without one."""

from __future__ import annotations

import logging
import os
import random
import socket
import stat
from pathlib import Path

import pytest
import trio
import zmq

from clusterfs.credentials import Credentials
from clusterfs.pieces import Buffer
from clusterfs.txn import local_link, local_stream, transport
from clusterfs.txn.local_link import FrameReader, LinkError
from clusterfs.txn.local_stream import LinkSocket
from clusterfs.txn.transport import (
    CHANNEL_CONTROL,
    CHANNEL_PROTOCOL,
    CHANNEL_TXN,
    ClientTransport,
    Transport,
    new_keypair,
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
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(os.fspath(local_link.link_path(CLUSTER.cluster_key, address)))
        assert local_link.client_path(CLUSTER, address) == local_link.link_path(
            CLUSTER.cluster_key, address)
        assert local_link.client_path(CLIENT_KEY, address) is None
        assert local_link.server_path(CLIENT_KEY, address) is None
        link_dir.chmod(0o755)  # others could have put a socket there: not trusted
        assert local_link.client_path(CLUSTER, address) is None
        assert local_link.server_path(CLUSTER, address) is None


def test_a_hello_is_admitted_only_with_the_password_and_a_client_identity() -> None:
    right = local_link.password(CLUSTER)
    hello = local_link.hello(CLUSTER, "cli-1234")
    assert local_link.check_hello(hello, right, "cli-") == "cli-1234"
    wrong = {
        local_link.hello(OTHER_CLUSTER, "cli-1234"): "not the cluster's local link password",
        local_link.hello(CLUSTER, "n1"): "is not a client's",  # a node's name
        local_link.hello(CLUSTER, "key-1234"): "is not a client's",  # a client key's
        local_link.hello(CLUSTER, "cli-" + "x" * 300): "is not a client's",
        hello[:-8] + b"\xff\xfe": "not UTF-8",
        hello[:8] + b"\x02" + hello[9:]: "version 2",
        b"GET / HTTP/1.1\r\n\r\n": "not a clusterfs local link hello",
        b"": "not a clusterfs local link hello",
    }
    for payload, reason in wrong.items():
        with pytest.raises(LinkError, match=reason):
            local_link.check_hello(payload, right, "cli-")


def test_the_nodes_answer_says_welcome_or_why_not() -> None:
    assert local_link.parse_answer(local_link.WELCOME) == ""
    assert local_link.parse_answer(local_link.refusal("no hello within 5 s")) \
        == "no hello within 5 s"
    assert local_link.parse_answer(b"HTTP/1.1 400") == \
        "it did not answer the local link's hello"


def _framed(payloads: list[bytes]) -> bytes:
    return b"".join(local_link.frame_header(len(p)) + p for p in payloads)


def _cut(reader: FrameReader, stream: bytes, rng: random.Random) -> list[bytes]:
    """What `reader` makes of `stream` when it arrives in pieces of random sizes."""
    out, position = [], 0
    while position < len(stream):
        buffer = reader.buffer()
        count = min(len(buffer), rng.randint(1, 70_000), len(stream) - position)
        buffer[:count] = stream[position:position + count]
        position += count
        payload = reader.received(count)
        if payload is not None:
            out.append(bytes(payload))
    return out


def test_frames_come_out_whole_however_the_stream_is_cut() -> None:
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.choice((0, 1, 3, 4, 5, 4096, 200_000))) for _ in range(60)]
    for _ in range(5):
        assert _cut(FrameReader(1 << 20), _framed(payloads), rng) == payloads


def test_a_frame_larger_than_a_message_may_be_is_refused_before_it_is_read() -> None:
    reader = FrameReader(1000)
    reader.buffer()[:4] = local_link.frame_header(1001)
    with pytest.raises(LinkError, match="1001 bytes is more than the 1000"):
        reader.received(4)


async def test_what_the_socket_cannot_take_is_queued_and_sent_in_order() -> None:
    """... also a message given in pieces (sent uncopied), which arrives as one frame."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender, receiver = LinkSocket(left, 8 << 20), LinkSocket(right, 8 << 20)
    payloads = [bytes([i]) * size for i, size in enumerate((3 << 20, 10, 5 << 20, 0, 4096) * 4)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.flush)
        for index, payload in enumerate(payloads):  # 32 MiB: more than the socket holds
            third = len(payload) // 3
            assert sender.send(payload if index % 2 else
                               [payload[:third], b"", memoryview(payload)[third:]])
        got = []
        with trio.fail_after(WAIT_S):
            while len(got) < len(payloads):
                frame = await receiver.receive()
                assert frame is not None
                got.append(frame)
        assert got == payloads
        assert all(isinstance(frame, bytearray) for frame in got)  # each the caller's own
        sender.close()
        assert not sender.send(b"after the close")
        with trio.fail_after(WAIT_S):
            assert await receiver.receive() is None  # the peer hung up
        nursery.cancel_scope.cancel()
    receiver.close()


class Replies:
    """What a ClientTransport receives: (address, payload)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.refused: list[str] = []
        self.changed = trio.Event()

    def on_message(self, address: str, payload: Buffer) -> None:
        self.received.append((address, bytes(payload)))
        self.changed.set()
        self.changed = trio.Event()

    def on_refused(self, address: str, reason: str) -> None:
        self.refused.append(reason)

    async def wait_for(self, count: int) -> list[tuple[str, bytes]]:
        with trio.fail_after(WAIT_S):
            while len(self.received) < count:
                await self.changed.wait()
        return self.received


async def start_echo_node(nursery: trio.Nursery, received: list[tuple[bytes, bytes]],
                          listen: str | None = None) -> Transport:
    """A node that answers every file protocol message with b"echo:" + the message."""
    node = Transport("a", listen or free_address(), lambda name: None, CLUSTER)

    def echo(client: str, payload: bytes) -> None:
        received.append((CHANNEL_PROTOCOL, payload))
        node.reply(client, CHANNEL_PROTOCOL, b"echo:" + payload)

    node.on_clients(echo)
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
        client.send(node.listen, b"x" * (8 << 20))  # more than the socket buffers hold
        client.send(node.listen, b"second")
        assert await replies.wait_for(2) == [(node.listen, b"echo:" + b"x" * (8 << 20)),
                                             (node.listen, b"echo:second")]
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
    assert [channel for channel, _ in received] == [CHANNEL_PROTOCOL] * 2


async def _stranger_says(path: str, data: bytes) -> bytes:
    """Everything the node sends a stranger that connects to `path` and sends `data`, up to
    the node's hang-up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(data)
        sock.setblocking(False)
        answer = b""
        with trio.fail_after(WAIT_S):
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    return answer
                if not chunk:
                    return answer
                answer += chunk


def _frame(payload: bytes) -> bytes:
    return local_link.frame_header(len(payload)) + payload


@needs_root
async def test_the_local_link_admits_only_the_password_and_only_the_protocol(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(local_stream, "HELLO_TIMEOUT_S", 0.3)
    monkeypatch.setattr(transport, "REFUSAL_LOG_INTERVAL_S", 0.0)  # every refusal logged
    received: list[tuple[bytes, bytes]] = []
    node = await start_echo_node(nursery, received)
    assert node.local_link is not None
    strangers = {  # what each sends -> what the node logs
        _frame(local_link.hello(OTHER_CLUSTER, "cli-x")) + _frame(b"from a stranger"):
            "not the cluster's local link password",
        _frame(local_link.hello(CLUSTER, "n2")) + _frame(b"a node's name"):
            "identity 'n2' is not a client's",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n": "a frame of 1195725856 bytes is more than",
        local_link.frame_header(100): "no hello within 0.3 s",  # and then nothing
    }
    for data, warning in strangers.items():
        answer = await _stranger_says(node.local_link, data)
        await wait_for_warning(caplog, warning)
        if answer:  # a refusal says why, in one frame
            assert answer[4:5] == local_link.REFUSED and warning.encode() in answer
    # The right password over TCP gets nothing: that listener is CURVE only.
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    with dealer:
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.PLAIN_USERNAME, b"clusterfs-local")
        dealer.setsockopt(zmq.PLAIN_PASSWORD, local_link.password(CLUSTER))
        dealer.connect(f"tcp://{node.listen}")
        dealer.send_multipart([CHANNEL_PROTOCOL, b"over tcp"])
        dealer.send_multipart([CHANNEL_CONTROL, b"over tcp"])
        await trio.sleep(QUIET_S)
        assert dealer.poll(0) == 0
    assert received == []
    # Admitted: the right hello; every frame after it is a file protocol message.
    answer = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(node.local_link)
        sock.sendall(_frame(local_link.hello(CLUSTER, "cli-friend")) + _frame(b"hello"))
        sock.setblocking(False)
        with trio.fail_after(WAIT_S):
            while len(answer) < 5 + 14:
                await trio.lowlevel.wait_readable(sock)
                answer += sock.recv(65536)
    assert answer == _frame(local_link.WELCOME) + _frame(b"echo:hello")
    assert received == [(CHANNEL_PROTOCOL, b"hello")]


async def client_of_a_stopped_node(nursery: trio.Nursery, identity: str
                                   ) -> tuple[ClientTransport, Replies, str]:
    """A client that talked to a node over its local link, and that node's address: the node
    is stopped (its socket removed)."""
    replies = Replies()
    client = ClientTransport(identity, CLUSTER, replies.on_message, replies.on_refused)
    await nursery.start(client.run)
    async with trio.open_nursery() as first:
        node = await start_echo_node(first, [])
        client.send(node.listen, b"one")
        assert await replies.wait_for(1) == [(node.listen, b"echo:one")]
        first.cancel_scope.cancel()
    assert client.local_links == {node.listen: True}
    assert not local_link.link_path(CLUSTER.cluster_key, node.listen).exists()
    return client, replies, node.listen


async def send_until_answered(client: ClientTransport, replies: Replies, address: str,
                              payload: bytes, answer: bytes) -> None:
    with trio.fail_after(WAIT_S):
        while (address, answer) not in replies.received:
            client.send(address, payload)
            await trio.sleep(0.05)


@needs_root
async def test_a_client_connects_again_to_a_node_that_restarted(nursery: trio.Nursery) -> None:
    client, replies, address = await client_of_a_stopped_node(nursery, "cli-again")
    client.send(address, b"late")  # nobody listens: no error (TCP may deliver it later)
    # A node killed with SIGKILL leaves its socket: the next node on the address replaces it.
    path = local_link.link_path(CLUSTER.cluster_key, address)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(os.fspath(path))
    again = Transport("a", address, lambda name: None, CLUSTER)
    again.on_clients(lambda who, payload: again.reply(who, CHANNEL_PROTOCOL,
                                                      b"again:" + payload))
    await nursery.start(again.run)
    assert again.local_link == str(path)
    await send_until_answered(client, replies, address, b"two", b"again:two")
    assert set(replies.received[1:]) <= {(address, b"again:two"), (address, b"again:late")}
    assert replies.refused == []
    nursery.cancel_scope.cancel()


@needs_root
async def test_a_node_refusing_the_hello_is_reported(nursery: trio.Nursery,
                                                     link_dir: Path) -> None:
    received: list[tuple[bytes, bytes]] = []
    node = await start_echo_node(nursery, received)
    # A client of another cluster whose node would listen on the same path.
    other = Credentials(OTHER_CLUSTER.public_key, OTHER_CLUSTER.secret_key)
    os.link(node.local_link or "", local_link.link_path(other.cluster_key, node.listen))
    replies = Replies()
    client = ClientTransport("cli-other", other, replies.on_message, replies.on_refused)
    await nursery.start(client.run)
    client.send(node.listen, b"anything")
    with trio.fail_after(WAIT_S):
        while not replies.refused:
            await trio.sleep(0.01)
    assert replies.refused == ["not the cluster's local link password"]
    assert received == [] and replies.received == []


@needs_root
async def test_a_node_without_a_local_link_any_more_is_reached_over_tcp(
        nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    client, replies, address = await client_of_a_stopped_node(nursery, "cli-fallback")
    # The node comes back on the same address without a local link (say, not as root).
    monkeypatch.setattr(local_link, "server_path", lambda credentials, address: None)
    again = await start_echo_node(nursery, [], address)
    assert again.local_link is None
    await send_until_answered(client, replies, address, b"two", b"echo:two")
    assert replies.refused == []
