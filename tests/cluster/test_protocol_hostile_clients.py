"""Clients that must get nothing (no credentials, another cluster's) and clients that speak
garbage: the node answers every unreadable message with an error and goes on serving the
others (the shared-cluster fixture fails the test if a node dies or logs an ERROR)."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import msgspec
import pytest
import trio

from clusterfs.client import Client, ClientError
from clusterfs.credentials import Credentials, create_credentials
from clusterfs.protocol import messages as m
from clusterfs.txn.transport import ClientTransport
from tests.cluster.conftest import Cluster, addresses_of

pytestmark = pytest.mark.mount


async def test_a_client_with_another_clusters_credentials_is_refused(
        shared_cluster: Cluster, tmp_path: Path) -> None:
    strangers = create_credentials(tmp_path)
    with pytest.raises(ClientError, match="refused"):
        async with Client(addresses_of(shared_cluster), strangers, "stranger",
                          route_timeout_s=3):
            pass


async def test_a_client_without_curve_gets_no_answer(shared_cluster: Cluster) -> None:
    import zmq  # the test speaks to the node as a stranger would, by hand

    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(f"tcp://{shared_cluster.nodes[0].address}")
        dealer.send_multipart([b"p", m.encode(m.Hello())])
        assert dealer.poll(1500) == 0, "a client without credentials got an answer"
    finally:
        dealer.close()
        context.term()


def _garbage(rng: random.Random) -> list[tuple[bytes, bool]]:
    """Payloads, and whether the node can tell the call they belong to."""
    call = msgspec.msgpack.encode
    return [
        (b"", False),
        (b"\xc1", False),  # never used in msgpack
        (rng.randbytes(5000), False),
        (call({"type": "call"}), False),
        (call({"type": "nonsense", "call_id": 7}), True),
        (call({"type": "call", "session_id": 5, "call_id": 8, "op": {}}), True),
        (call({"type": "call", "session_id": "x", "call_id": 9,
               "op": {"type": "read", "handle": -1, "offset": "a", "size": 2}}), True),
        (call({"type": "call", "session_id": "x", "call_id": 10,
               "op": {"type": "stat", "path": "/" * 10}}), True),  # no such session
        (call({"type": "session-request", "request_id": 1}), False),
        (call([1, 2, 3]), False),
        (call({"type": "call", "call_id": 2 ** 64 - 1}), False),
    ]


async def test_garbage_gets_errors_and_the_node_keeps_serving(
        shared_cluster: Cluster, credentials: Credentials, croot: str) -> None:
    rng = random.Random(6)
    address = shared_cluster.nodes[0].address
    answers: list[m.NodeMessage] = []

    def on_message(_address: str, payload: bytes) -> None:
        answers.append(m.decode_node(payload))

    hostile = ClientTransport(f"cli-hostile-{os.getpid()}", credentials, on_message,
                              lambda _address, reason: pytest.fail(reason))
    async with (Client(addresses_of(shared_cluster), credentials, "bystander") as bystander,
                trio.open_nursery() as nursery):
        await nursery.start(hostile.run)
        sent = _garbage(rng) * 20
        for i, (payload, _) in enumerate(sent):
            hostile.send(address, payload)
            if i % 25 == 0:  # the node serves the bystander meanwhile
                await bystander.mkdir(f"/{croot}/d{i}")
        with trio.fail_after(20):
            while len(answers) < len(sent):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert len(answers) == len(sent)
    for answer, (_payload, knows_call) in zip(answers, sent, strict=True):
        if isinstance(answer, m.Result):  # readable, but no such session
            assert answer.errno == errno.ENOTCONN, answer
        else:
            assert isinstance(answer, m.ProtocolFault), answer
            assert (answer.call_id != 0) == knows_call, (answer, _payload[:60])
    assert len(os.listdir(shared_cluster.mnt(2) / croot)) == len(range(0, len(sent), 25))
