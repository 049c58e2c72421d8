"""Peers that speak garbage, and strangers.

Garbage: raw bytes on a node's port, a ZMTP greeting that announces a frame far over the size
limit, and — from a peer that holds the cluster's credentials, as a buggy member would —
well-formed ZeroMQ messages whose contents are garbage, on every channel, under names that
are not members'. Strangers: processes without the cluster's credentials (no CURVE at all,
another cluster's key pair, or their own key pair with the cluster's public key) that send
a join request, a prepare and a status request, under a member's name too. Every node stays
up (the shared-cluster fixture fails the test on a death or an ERROR line), strangers get no
reply, the namespace and the membership do not change, and the file system goes on working.

A peer with the credentials can still send in a member's name (nodes name themselves inside
their messages): holding the credentials is being a member, as holding the block directory
is. Claiming a member's name as ZeroMQ identity takes nothing from the member: nodes connect
without a chosen identity."""

from __future__ import annotations

import os
import random
import socket
import time

import msgspec
import pytest
import zmq

from clusterfs import status
from clusterfs.credentials import Credentials, credentials_path, load_credentials
from clusterfs.membership import messages as membership_messages
from clusterfs.txn import messages
from clusterfs.txn.transport import curve_client, new_keypair
from tests.cluster.conftest import Cluster

pytestmark = pytest.mark.mount

CHANNELS = (b"t", b"m", b"c", b"l", b"p", b"x")


def _raw_garbage(address: str, rng: random.Random) -> None:
    host, port = address.rsplit(":", 1)
    for size in (1, 10, 64, 4096, 1 << 20):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            try:
                sock.sendall(rng.randbytes(size))
                sock.settimeout(0.2)
                sock.recv(4096)
            except OSError:
                pass  # the node may close the connection: that is what it should do


def _payloads(rng: random.Random) -> list[bytes]:
    prepare = messages.Prepare(10**9, messages.Batch(10**9, 1, ()))
    return [
        b"",
        b"\x01",
        rng.randbytes(100),
        bytes([99]) + rng.randbytes(50),  # an unknown protocol version
        messages.encode(prepare)[:-3],  # truncated
        messages.encode(prepare),  # well formed, from a fenced-off future epoch
        bytes([messages.PROTOCOL_VERSION]) + msgspec.msgpack.encode({"type": "Vote"}),
        bytes([messages.PROTOCOL_VERSION]) + msgspec.msgpack.encode(["Decide", -1, "x", 3]),
        bytes([messages.PROTOCOL_VERSION]) + msgspec.msgpack.encode(["SnapshotReady", 1,
                                                                       "../../etc", 5, ""]),
        bytes([messages.PROTOCOL_VERSION]) + rng.randbytes(3000),
    ]


def _zmq_garbage(address: str, identity: bytes, rng: random.Random,
                 credentials: Credentials) -> None:
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, identity)
    curve_client(dealer, credentials)
    try:
        dealer.connect(f"tcp://{address}")
        for channel in CHANNELS:
            for payload in _payloads(rng):  # nodes name themselves in their messages
                dealer.send_multipart([channel, payload] if channel in (b"c", b"p")
                                      else [channel, identity, payload])
        dealer.send_multipart([b"t"])  # too few frames
        dealer.send_multipart([b"t", b"a", b"b", b"c"])  # too many
        time.sleep(0.5)  # let the node read everything before the socket goes away
    finally:
        dealer.close()
        context.term()


def _announce_huge_frame(address: str) -> bool:
    """Speak ZMTP 3.0 (NULL mechanism) by hand and announce a 16 GiB frame without sending
    it; True if the node closes the connection instead of waiting to allocate it (at the
    mechanism already: the node speaks only CURVE)."""
    host, port = address.rsplit(":", 1)
    greeting = (b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00")
                + b"\x00" + bytes(31))
    props = b"".join(bytes([len(k)]) + k + len(v).to_bytes(4, "big") + v
                     for k, v in ((b"Socket-Type", b"DEALER"), (b"Identity", b"huge")))
    ready = b"\x05READY" + props
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        try:
            sock.sendall(greeting + b"\x04" + bytes([len(ready)]) + ready)
            sock.sendall(b"\x02" + (16 << 30).to_bytes(8, "big") + b"x" * 100)
        except (ConnectionResetError, BrokenPipeError):
            return True  # hung up during the greeting already
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if sock.recv(4096) == b"":
                    return True
            except ConnectionResetError:
                return True
            except TimeoutError:
                return False
    return False


def test_garbage_from_a_peer_changes_nothing_and_crashes_nothing(
        shared_cluster: Cluster, croot: str) -> None:
    c = shared_cluster
    (c.mnt(0) / croot / "before").write_bytes(b"before")
    quiet = c.wait_quiet_digests()
    digest, applied_seq = quiet["nodes"][0]["digest"], quiet["nodes"][0]["applied_seq"]
    rng = random.Random(20261127)
    credentials = load_credentials(credentials_path(c.blockdir))
    for node in c.nodes:
        _raw_garbage(node.address, rng)
        _zmq_garbage(node.address, b"stranger", rng, credentials)
        _zmq_garbage(node.address, rng.randbytes(16), rng, credentials)
        assert _announce_huge_frame(node.address), f"{node.name} kept the connection"
    after = c.wait_quiet_digests()
    assert {(n["digest"], n["applied_seq"]) for n in after["nodes"]} == {(digest, applied_seq)}
    assert not (c.blockdir / "etc").exists()
    for i in range(len(c)):  # and every node still commits and serves
        (c.mnt(i) / croot / f"after-n{i + 1}").write_bytes(b"after")
    for i in range(len(c)):
        assert sorted(os.listdir(c.mnt(i) / croot)) == [
            "after-n1", "after-n2", "after-n3", "before"]


def _strangers(calls: list[tuple[str, bytes, str]], cluster_key: bytes) -> list[list[bytes]]:
    """For each (address, identity, kind): send a join request, a prepare and a status
    request as a process without the cluster's credentials; whatever comes back within a
    second (all at once, each on its own socket)."""
    context = zmq.Context()
    dealers = []
    join = membership_messages.JoinRequest("intruder", "127.0.0.1:9", 0)
    prepare = messages.Prepare(1, messages.Batch(1, 1, ()))
    try:
        for address, identity, kind in calls:
            dealer = context.socket(zmq.DEALER)
            dealers.append(dealer)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.IDENTITY, identity)
            if kind != "no CURVE":
                curve_client(dealer, Credentials(*new_keypair()))
                if kind == "own keys, the cluster's public key":
                    dealer.setsockopt(zmq.CURVE_SERVERKEY, cluster_key)
            dealer.connect(f"tcp://{address}")
            dealer.send_multipart([b"m", membership_messages.encode(join)])
            dealer.send_multipart([b"t", messages.encode(prepare)])
            dealer.send_multipart([b"c", status.encode(status.StatusRequest())])
        time.sleep(1.0)
        return [[dealer.recv()] if dealer.poll(0) else [] for dealer in dealers]
    finally:
        for dealer in dealers:
            dealer.close()
        context.term()


def test_a_process_without_the_credentials_gets_nothing_and_changes_nothing(
        shared_cluster: Cluster, croot: str) -> None:
    c = shared_cluster
    before = c.wait_quiet_digests()
    state = {(n["name"], n["epoch"], tuple(n["members"]), n["digest"], n["applied_seq"])
             for n in before["nodes"]}
    cluster_key = load_credentials(credentials_path(c.blockdir)).public_key
    kinds = ("no CURVE", "another cluster's keys", "own keys, the cluster's public key")
    calls = [(node.address, identity, kind) for node in c.nodes for kind in kinds
             for identity in (b"intruder", b"n1", b"n2")]  # also under members' names
    for call, answers in zip(calls, _strangers(calls, cluster_key), strict=True):
        assert answers == [], f"{call[0]} answered a stranger ({call[2]})"
    assert any("refused a connection" in node.log_text() for node in c.nodes)
    after = c.wait_quiet_digests()
    assert {(n["name"], n["epoch"], tuple(n["members"]), n["digest"], n["applied_seq"])
            for n in after["nodes"]} == state
    for i in range(len(c)):  # the members still talk to each other under their names
        (c.mnt(i) / croot / f"after-n{i + 1}").write_bytes(b"after")
    for i in range(len(c)):
        assert sorted(os.listdir(c.mnt(i) / croot)) == ["after-n1", "after-n2", "after-n3"]
