"""`clusterfs status` and `clusterfs leave`: control requests to a running node.

The command line sends a typed request on the control channel of a node's listen address
and gets a typed reply. For status it asks the node it was pointed at, learns the members
and their addresses from it, then asks every member for its own figures (state, epoch,
leader, applied sequence, replica digest), so each line comes from the node it describes.
A mount point is turned into its node's address and block directory through
/proc/self/mountinfo: the mount's source is `clusterfs:NAME@HOST:PORT:BLOCKDIR` (like NFS's
`server:/export`), and the block directory holds the cluster's credentials, which every
request needs (`clusterfs.credentials`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import trio

from clusterfs.credentials import Credentials
from clusterfs.txn import transport

REQUEST_TIMEOUT_S = 5.0
SOURCE_PREFIX = "clusterfs:"


class StatusRequest(msgspec.Struct, frozen=True, tag="status"):
    pass


class LeaveRequest(msgspec.Struct, frozen=True, tag="leave"):
    pass


Request = StatusRequest | LeaveRequest


class NodeStatus(msgspec.Struct, frozen=True, tag="node-status"):
    name: str
    address: str
    pid: int
    state: str  # online, offline, joining, unreachable
    reason: str
    epoch: int
    leader: str
    members: tuple[str, ...]
    addresses: dict[str, str]
    applied_seq: int
    digest: str
    mountpoint: str
    sessions: int = 0  # file protocol sessions held by the node


class LeaveReply(msgspec.Struct, frozen=True, tag="leave-reply"):
    pid: int


class ControlError(msgspec.Struct, frozen=True, tag="error"):
    message: str


Reply = NodeStatus | LeaveReply | ControlError

_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


class StatusError(Exception):
    """One line for the operator."""


# -- the node's side ---------------------------------------------------------------------

def decode_request(payload: bytes) -> Request | ControlError:
    try:
        return _request_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return ControlError(f"bad control request: {exc}")


def encode(message: Request | Reply) -> bytes:
    return msgspec.msgpack.encode(message)


# -- the command line's side ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MountSource:
    name: str
    address: str  # HOST:PORT
    blockdir: Path


def mount_source(name: str, listen: str, blockdir: Path) -> str:
    return f"{SOURCE_PREFIX}{name}@{listen}:{os.path.abspath(blockdir)}"


def parse_mount_source(source: str) -> MountSource | None:
    if not source.startswith(SOURCE_PREFIX):
        return None
    head, sep, path = source[len(SOURCE_PREFIX):].partition(":/")  # HOST may be [v6]
    name, at, address = head.rpartition("@")
    if not sep or not at or not name or not address:
        return None
    return MountSource(name, address, Path("/" + path))


def node_of_mount(mountpoint: Path) -> MountSource:
    """The node serving `mountpoint`, from the mount's source."""
    target = os.path.realpath(mountpoint)
    for point, fs_type, source in _mounts():
        if point == target and fs_type.startswith("fuse"):
            found = parse_mount_source(source)
            if found is not None:
                return found
    raise StatusError(f"{mountpoint}: not a clusterfs mount point")


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """Whether something is mounted on `mountpoint`, also a FUSE mount whose process died
    (where os.path.ismount meets ENOTCONN and says False)."""
    target = os.path.realpath(mountpoint)
    return any(point == target for point, _, _ in _mounts())


def _mounts() -> Iterator[tuple[str, str, str]]:
    """(mount point, file system type, source) of every mount this process sees."""
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for raw in mountinfo:
            fields = [_unescape(os.fsdecode(field)) for field in raw.split()]
            separator = fields.index("-")
            yield fields[4], fields[separator + 1], fields[separator + 2]


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


async def ask(address: str, request: Request, credentials: Credentials,
              timeout_s: float = REQUEST_TIMEOUT_S) -> Reply:
    try:
        raw = await transport.request(address, encode(request), timeout_s, credentials)
        reply = _reply_decoder.decode(raw)
    except transport.TransportError as exc:
        raise StatusError(str(exc)) from None
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise StatusError(f"{address}: not a clusterfs node") from None
    if isinstance(reply, ControlError):
        raise StatusError(f"{address}: {reply.message}")
    return reply


async def cluster_status(address: str, credentials: Credentials) -> list[NodeStatus]:
    """Every member's own status, the node at `address` first if it is not a member."""
    first = await ask(address, StatusRequest(), credentials)
    if not isinstance(first, NodeStatus):
        raise StatusError(f"{address}: unexpected reply")
    names = sorted(set(first.members) | {first.name})
    found: dict[str, NodeStatus] = {first.name: first}

    async def one(name: str) -> None:
        member_address = first.addresses.get(name, "")
        try:
            reply = await ask(member_address, StatusRequest(), credentials)
        except StatusError as exc:
            reply = _unreachable(name, member_address, str(exc))
        if isinstance(reply, NodeStatus):
            found[name] = reply

    async with trio.open_nursery() as nursery:
        for name in names:
            if name != first.name:
                nursery.start_soon(one, name)
    return [found[name] for name in names if name in found]


def _unreachable(name: str, address: str, reason: str) -> NodeStatus:
    return NodeStatus(name, address, 0, "unreachable", reason, 0, "", (), {}, 0, "", "")


def render_json(nodes: list[NodeStatus]) -> str:
    return json.dumps({"nodes": [msgspec.to_builtins(n) for n in nodes],
                       "digests_equal": digests_equal(nodes)}, indent=2)


def digests_equal(nodes: list[NodeStatus]) -> bool:
    online = [n for n in nodes if n.state == "online"]
    return len({(n.applied_seq, n.digest) for n in online}) <= 1


def render_table(nodes: list[NodeStatus]) -> str:
    newest = max(nodes, key=lambda n: n.epoch)
    lines = [f"cluster epoch {newest.epoch}, leader {newest.leader or '-'}, "
             f"members {', '.join(newest.members) or '-'}",
             f"{'NODE':<12} {'ADDRESS':<22} {'STATE':<11} {'EPOCH':>5} {'APPLIED':>9} "
             f"{'SESSIONS':>8}  DIGEST"]
    for n in nodes:
        lines.append(f"{n.name:<12} {n.address:<22} {n.state:<11} {n.epoch:>5} "
                     f"{n.applied_seq:>9} {n.sessions:>8}  {n.digest[:16] or '-'}")
        if n.reason:
            lines.append(f"{'':<12} {n.reason}")
    equal = digests_equal(nodes)
    lines.append("replica digests: " + ("equal on every online node" if equal else
                                         "DIFFER (the cluster may still be busy)"))
    return "\n".join(lines)
