"""Client keys: a key the cluster authorised opens sessions with the file protocol, and can
do nothing else (no status, no commit or membership message reaches a handler); a revoked
key and a key never authorised are refused."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import zmq

from clusterfs import status
from clusterfs.client import Client, ClientError
from clusterfs.credentials import load_credentials, parse_credentials
from clusterfs.membership import messages as membership_messages
from clusterfs.txn.transport import curve_client, new_keypair
from tests.cluster.conftest import Cluster, addresses_of
from tests.util import run_cli

pytestmark = pytest.mark.mount


def _make_key(cluster: Cluster, name: str, path: Path) -> None:
    made = run_cli("client-key", str(cluster.blockdir), name, str(path))
    assert made.returncode == 0, made.stderr
    assert os.stat(path).st_mode & 0o777 == 0o600


async def test_an_authorised_key_serves_the_file_protocol_only(
        shared_cluster: Cluster, croot: str, tmp_path: Path) -> None:
    key_file = tmp_path / "host.key"
    _make_key(shared_cluster, f"host-{os.getpid()}", key_file)
    key = load_credentials(key_file)
    assert key.is_client_key
    async with Client(addresses_of(shared_cluster), key, "keyed-host") as client:
        await client.mkdir(f"/{croot}/by-key")
    assert (shared_cluster.mnt(1) / croot / "by-key").is_dir()

    # Other channels: a status request gets no answer, a membership message changes nothing.
    epoch_before = shared_cluster.status(0)["nodes"][0]["epoch"]
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, b"key-sneaky")
    curve_client(dealer, key)
    try:
        dealer.connect(f"tcp://{shared_cluster.nodes[0].address}")
        dealer.send_multipart([b"c", status.encode(status.StatusRequest())])
        dealer.send_multipart([b"m", membership_messages.encode(
            membership_messages.Leave("n2"))])  # would take n2 out of the cluster
        assert dealer.poll(1500) == 0, "a client key got an answer on the control channel"
    finally:
        dealer.close()
        context.term()
    time.sleep(0.5)
    assert shared_cluster.status(0)["nodes"][0]["epoch"] == epoch_before
    assert "a client key may only use the file protocol" in shared_cluster.nodes[0].log_text()


async def test_a_key_posing_as_a_member_gets_nothing(
        shared_cluster: Cluster, tmp_path: Path) -> None:
    key_file = tmp_path / "host.key"
    _make_key(shared_cluster, f"posing-{os.getpid()}", key_file)
    key = load_credentials(key_file)
    epoch_before = shared_cluster.status(0)["nodes"][0]["epoch"]
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, b"n2")  # a member's name: still only a client
    curve_client(dealer, key)
    try:
        dealer.connect(f"tcp://{shared_cluster.nodes[0].address}")
        dealer.send_multipart([b"c", status.encode(status.StatusRequest())])
        assert dealer.poll(1500) == 0
        # Held for longer than the failure detector waits: n2 stays a member (it would be
        # cut off from n1 if the squatter could take its connection over).
        time.sleep(4)
        assert shared_cluster.status(0)["nodes"][0]["epoch"] == epoch_before
    finally:
        dealer.close()
        context.term()


async def test_revoked_and_unknown_keys_are_refused(
        shared_cluster: Cluster, tmp_path: Path) -> None:
    name = f"revoked-{os.getpid()}"
    key_file = tmp_path / "host.key"
    _make_key(shared_cluster, name, key_file)
    revoked = run_cli("client-key", str(shared_cluster.blockdir), name, "--revoke")
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(ClientError, match="refused"):
        async with Client(addresses_of(shared_cluster), load_credentials(key_file), "revoked",
                          route_timeout_s=5):
            pass
    public, secret = new_keypair()
    cluster_public = load_credentials(shared_cluster.blockdir / "cluster/credentials").public_key
    unknown = parse_credentials(b"public = %s\nsecret = %s\nserver = %s\n" % (
        public, secret, cluster_public), "test")
    with pytest.raises(ClientError, match="refused"):
        async with Client(addresses_of(shared_cluster), unknown, "unknown", route_timeout_s=5):
            pass


def test_client_key_errors_are_one_line(shared_cluster: Cluster, tmp_path: Path) -> None:
    existing = tmp_path / "exists"
    existing.write_text("x")
    for args, message in (
            (("bad/name", str(tmp_path / "k")), "invalid client name"),
            (("ok", str(existing)), "exists; not overwriting"),
            (("never-made", "--revoke"), "no client key 'never-made'")):
        proc = run_cli("client-key", str(shared_cluster.blockdir), *args)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
