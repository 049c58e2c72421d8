"""`clusterfs status`: the control messages, the rendering, and asking real transports."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterfs import status
from clusterfs.credentials import Credentials
from clusterfs.status import (
    ControlError,
    LeaveReply,
    LeaveRequest,
    NodeStatus,
    StatusError,
    StatusRequest,
    decode_request,
    encode,
    render_json,
    render_table,
)
from clusterfs.txn.transport import Transport, new_keypair

CLUSTER = Credentials(*new_keypair())

MEMBERS = ("a", "b", "c")
ADDRESSES = {"a": "127.0.0.1:7001", "b": "127.0.0.1:7002", "c": "127.0.0.1:7003"}


def node(name: str, digest: str = "d" * 64, applied_seq: int = 40, state: str = "online",
         reason: str = "", epoch: int = 3) -> NodeStatus:
    return NodeStatus(name, ADDRESSES.get(name, ""), 1000 + len(name), state, reason, epoch,
                      "a", MEMBERS, ADDRESSES, applied_seq, digest, f"/mnt/{name}")


# -- messages -------------------------------------------------------------------------------

@pytest.mark.parametrize("request_", [StatusRequest(), LeaveRequest()])
def test_requests_round_trip(request_: status.Request) -> None:
    assert decode_request(encode(request_)) == request_


@pytest.mark.parametrize("reply", [
    node("a"), node("b", state="unreachable", reason="no answer", digest=""),
    LeaveReply(4242), ControlError("bad control request"),
])
def test_replies_round_trip(reply: status.Reply) -> None:
    assert status._reply_decoder.decode(encode(reply)) == reply


@pytest.mark.parametrize("payload", [
    b"", b"\xc1", b"\xff" * 10, b"status", msgspec.msgpack.encode({"type": "nope"}),
    msgspec.msgpack.encode({}), msgspec.msgpack.encode([1, 2, 3]),
    encode(LeaveReply(1)),  # a reply is not a request
    encode(StatusRequest())[:-1],
])
def test_decode_request_of_garbage_is_a_control_error(payload: bytes) -> None:
    result = decode_request(payload)
    assert isinstance(result, ControlError)
    assert result.message.startswith("bad control request: ")
    assert status._reply_decoder.decode(encode(result)) == result  # it can be sent back


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_decode_request_never_raises(payload: bytes) -> None:
    result = decode_request(payload)
    assert isinstance(result, StatusRequest | LeaveRequest | ControlError)


# -- rendering ------------------------------------------------------------------------------

def test_table_of_an_equal_cluster() -> None:
    table = render_table([node("a"), node("b"), node("c")])
    lines = table.splitlines()
    assert lines[0] == "cluster epoch 3, leader a, members a, b, c"
    assert lines[1].split() == ["NODE", "ADDRESS", "STATE", "EPOCH", "APPLIED", "SESSIONS",
                                "DIGEST"]
    assert lines[2].split() == ["a", "127.0.0.1:7001", "online", "3", "40", "0", "d" * 16]
    assert lines[-1] == "replica digests: equal on every online node"
    assert "DIFFER" not in table


def test_json_of_an_equal_cluster() -> None:
    data = json.loads(render_json([node("a"), node("b"), node("c")]))
    assert data["digests_equal"] is True
    assert [n["name"] for n in data["nodes"]] == ["a", "b", "c"]
    assert data["nodes"][0] == {
        "type": "node-status", "name": "a", "address": "127.0.0.1:7001", "pid": 1001,
        "state": "online", "reason": "", "epoch": 3, "leader": "a", "members": ["a", "b", "c"],
        "addresses": ADDRESSES, "applied_seq": 40, "digest": "d" * 64, "mountpoint": "/mnt/a",
        "sessions": 0,
    }


@pytest.mark.parametrize("nodes", [
    [node("a"), node("b", digest="e" * 64), node("c")],  # same sequence, other content
    [node("a"), node("b", applied_seq=41), node("c")],  # one is ahead
])
def test_differing_replicas_are_reported(nodes: list[NodeStatus]) -> None:
    assert render_table(nodes).splitlines()[-1] == (
        "replica digests: DIFFER (the cluster may still be busy)")
    assert json.loads(render_json(nodes))["digests_equal"] is False


def test_only_online_nodes_count_for_the_digests() -> None:
    nodes = [node("a"), node("b", state="offline", reason="removed: missed a prepare",
                              digest="0" * 64, applied_seq=7), node("c")]
    assert "equal on every online node" in render_table(nodes)
    assert json.loads(render_json(nodes))["digests_equal"] is True


def test_an_unreachable_node_is_shown_with_its_reason() -> None:
    gone = status._unreachable("c", "127.0.0.1:7003", "no answer from 127.0.0.1:7003 within 5 s")
    nodes = [node("a"), node("b"), gone]
    lines = render_table(nodes).splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("c "))
    assert lines[row].split() == ["c", "127.0.0.1:7003", "unreachable", "0", "0", "0", "-"]
    assert lines[row + 1].strip() == "no answer from 127.0.0.1:7003 within 5 s"
    assert lines[0] == "cluster epoch 3, leader a, members a, b, c"  # from the newest epoch
    data = json.loads(render_json(nodes))
    assert data["nodes"][2]["state"] == "unreachable"
    assert data["nodes"][2]["reason"] == "no answer from 127.0.0.1:7003 within 5 s"
    assert data["digests_equal"] is True


def test_a_table_of_a_lone_unreachable_node() -> None:
    table = render_table([status._unreachable("a", "127.0.0.1:1", "connection refused")])
    assert table.splitlines()[0] == "cluster epoch 0, leader -, members -"
    assert "connection refused" in table


# -- mount points ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["TMP", "/", "/proc", "TMP/missing"])
def test_node_of_mount_of_a_non_clusterfs_path(tmp_path: Path, path: str) -> None:
    target = Path(path.replace("TMP", str(tmp_path)))
    with pytest.raises(StatusError, match="not a clusterfs mount point") as info:
        status.node_of_mount(target)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("listen", "blockdir"), [
    ("127.0.0.1:5000", "/srv/blocks"),
    ("[::1]:7000", "/srv/blocks"),
    ("node-a.example:1", "/srv/with:colon/and,comma and space/é"),
    ("127.0.0.1:5000", "/"),
])
def test_mount_source_round_trips(listen: str, blockdir: str) -> None:
    source = status.mount_source("n1", listen, Path(blockdir))
    assert status.parse_mount_source(source) == status.MountSource("n1", listen,
                                                                    Path(blockdir))


@pytest.mark.parametrize("source", ["", "clusterfs:", "clusterfs:n1@127.0.0.1:5000",
                                    "clusterfs:@127.0.0.1:5000:/x", "clusterfs:n1:/x",
                                    "other:n1@127.0.0.1:5000:/x", "/dev/sda1"])
def test_other_mount_sources_are_not_clusterfs_ones(source: str) -> None:
    assert status.parse_mount_source(source) is None


# -- asking real nodes ------------------------------------------------------------------------

def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def serve(nursery: trio.Nursery, name: str, address: str,
                answer: status.Reply | bytes) -> None:
    """A transport whose control handler answers every request with `answer`."""
    transport = Transport(name, address, lambda _: None, CLUSTER)

    def handle(payload: bytes) -> bytes:
        request = decode_request(payload)
        if isinstance(request, ControlError):
            return encode(request)
        return answer if isinstance(answer, bytes) else encode(answer)

    transport.on_control(handle)
    await nursery.start(transport.run)


async def test_cluster_status_asks_every_member(nursery: trio.Nursery) -> None:
    addresses = {"a": free_address(), "b": free_address()}  # c has no address: unreachable

    def status_of(name: str, digest: str) -> NodeStatus:
        return NodeStatus(name, addresses[name], 1, "online", "", 5, "a", MEMBERS, addresses,
                          9, digest, "")

    await serve(nursery, "a", addresses["a"], status_of("a", "1" * 64))
    await serve(nursery, "b", addresses["b"], status_of("b", "2" * 64))
    with trio.fail_after(10):
        nodes = await status.cluster_status(addresses["b"], CLUSTER)
    assert [n.name for n in nodes] == ["a", "b", "c"]
    assert [n.digest for n in nodes[:2]] == ["1" * 64, "2" * 64]  # each from its own node
    assert nodes[2].state == "unreachable" and "is not HOST:PORT" in nodes[2].reason
    assert "DIFFER" in render_table(nodes)


async def test_ask_turns_a_control_error_into_a_status_error(nursery: trio.Nursery) -> None:
    address = free_address()
    await serve(nursery, "a", address, ControlError("not now"))
    with pytest.raises(StatusError, match=re.escape(f"{address}: not now")):
        await status.ask(address, StatusRequest(), CLUSTER, timeout_s=5)


async def test_ask_of_something_that_is_not_a_clusterfs_node(nursery: trio.Nursery) -> None:
    address = free_address()
    await serve(nursery, "a", address, b"hello, I am something else")
    with pytest.raises(StatusError, match="not a clusterfs node"):
        await status.ask(address, StatusRequest(), CLUSTER, timeout_s=5)


async def test_ask_with_nobody_listening() -> None:
    with pytest.raises(StatusError, match="no answer from"):
        await status.ask(free_address(), StatusRequest(), CLUSTER, timeout_s=0.2)


async def test_leave_request_gets_a_leave_reply(nursery: trio.Nursery) -> None:
    address = free_address()
    await serve(nursery, "a", address, LeaveReply(31337))
    assert await status.ask(address, LeaveRequest(), CLUSTER, timeout_s=5) == LeaveReply(31337)
