"""The cluster file protocol's messages: typed records, tagged for msgspec (msgpack).

A client talks to nodes over the node's listen address (the transport's protocol channel).
Paths are the cluster's own, absolute, `/`-separated; they are resolved in the cluster
namespace only (see `clusterfs.protocol.paths`).

Client -> every node:
  Hello            which version the node speaks, and who the members are (and where)
  SessionRequest   (the balancer's) a session for `client_id`; it reaches every node and
                   exactly one answers (lb rules): SessionAccept or SessionBusy
Client -> the node holding its session:
  Call             one file operation (`op`, below) in session `session_id`
  CloseSession     the client is done; the node closes the session's handles
Node -> client:
  HelloReply, SessionAccept, SessionBusy (the balancer's), Result (one per Call),
  ProtocolFault (a message the node could not read), and, pushed:
  MembersChanged   the membership changed (or this node went offline): re-route if the
                   node holding the session is gone or offline

Every operation answers a `Result` with `errno` 0 and a typed value, or an errno and a
message. Version: `PROTOCOL_VERSION`; a node answers a Hello with its own, and a client
refuses to go on with a node that speaks another.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgspec

from clusterfs.pieces import Buffer
from lb.messages import SessionAccept, SessionBusy, SessionRequest

PROTOCOL_VERSION = 1
MAX_IO_BYTES = 4 << 20  # largest read or write in one call
MAX_READDIR_ENTRIES = 4096


# -- operations ------------------------------------------------------------------------------

class Stat(msgspec.Struct, frozen=True, tag="stat"):
    path: str


class Lookup(msgspec.Struct, frozen=True, tag="lookup"):
    """`name` in directory `dir_path`: its attributes (ENOENT if there is none)."""

    dir_path: str
    name: str


class Readdir(msgspec.Struct, frozen=True, tag="readdir"):
    """Entries after `cookie` (0: from the start); `Entries.next_cookie` resumes."""

    path: str
    cookie: int = 0
    limit: int = 1024


class Mkdir(msgspec.Struct, frozen=True, tag="mkdir"):
    path: str
    mode: int = 0o755


class Open(msgspec.Struct, frozen=True, tag="open"):
    """Open (with os.O_CREAT: create) a regular file; answers a `Handle`."""

    path: str
    flags: int
    mode: int = 0o644


class Reopen(msgspec.Struct, frozen=True, tag="reopen"):
    """Open the regular file `ino` again (a client moving its open files to another node
    after a failover: by inode, so a file renamed or unlinked meanwhile is still found)."""

    ino: int
    flags: int


class Read(msgspec.Struct, frozen=True, tag="read"):
    handle: int
    offset: int
    size: int


class Write(msgspec.Struct, frozen=True, tag="write"):
    handle: int
    offset: int
    data: bytes


class Truncate(msgspec.Struct, frozen=True, tag="truncate"):
    path: str
    size: int


class Fsync(msgspec.Struct, frozen=True, tag="fsync"):
    handle: int
    datasync: bool = False


class Close(msgspec.Struct, frozen=True, tag="close"):
    handle: int


class Unlink(msgspec.Struct, frozen=True, tag="unlink"):
    path: str


class Rmdir(msgspec.Struct, frozen=True, tag="rmdir"):
    path: str


class Rename(msgspec.Struct, frozen=True, tag="rename"):
    old: str
    new: str
    flags: int = 0


class Symlink(msgspec.Struct, frozen=True, tag="symlink"):
    path: str
    target: str


class Readlink(msgspec.Struct, frozen=True, tag="readlink"):
    path: str


class GetXattr(msgspec.Struct, frozen=True, tag="getxattr"):
    path: str
    name: bytes


class SetXattr(msgspec.Struct, frozen=True, tag="setxattr"):
    path: str
    name: bytes
    value: bytes


class ListXattr(msgspec.Struct, frozen=True, tag="listxattr"):
    path: str


class RemoveXattr(msgspec.Struct, frozen=True, tag="removexattr"):
    path: str
    name: bytes


class Tunnel(msgspec.Struct, frozen=True, tag="tunnel"):
    """An opaque request on an open handle, for a tunnel service on the node (vhdshare)."""

    handle: int
    payload: memoryview  # decoded as a view of the message: not copied


class Ping(msgspec.Struct, frozen=True, tag="ping"):
    """Keeps an idle session alive."""


Op = (Stat | Lookup | Readdir | Mkdir | Open | Reopen | Read | Write | Truncate | Fsync | Close
      | Unlink | Rmdir | Rename | Symlink | Readlink | GetXattr | SetXattr | ListXattr
      | RemoveXattr | Tunnel | Ping)


# -- values of a Result -----------------------------------------------------------------------

class Attrs(msgspec.Struct, frozen=True, tag="attrs"):
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int


class DirEntry(msgspec.Struct, frozen=True):
    name: str
    ino: int
    mode: int
    cookie: int


class Entries(msgspec.Struct, frozen=True, tag="entries"):
    entries: list[DirEntry]
    next_cookie: int  # 0: the listing is complete


class Handle(msgspec.Struct, frozen=True, tag="handle"):
    handle: int
    attrs: Attrs


class Data(msgspec.Struct, frozen=True, tag="data"):
    data: memoryview  # decoded as a view of the message: not copied


class Count(msgspec.Struct, frozen=True, tag="count"):
    count: int


class Text(msgspec.Struct, frozen=True, tag="text"):
    text: str


class Names(msgspec.Struct, frozen=True, tag="names"):
    names: list[bytes]


Value = Attrs | Entries | Handle | Data | Count | Text | Names | None


# -- the envelope -------------------------------------------------------------------------------

class Hello(msgspec.Struct, frozen=True, tag="hello"):
    version: int = PROTOCOL_VERSION


class Member(msgspec.Struct, frozen=True):
    name: str
    address: str


class HelloReply(msgspec.Struct, frozen=True, tag="hello-reply"):
    version: int
    node: str
    epoch: int
    members: list[Member]
    serving: bool


class Call(msgspec.Struct, frozen=True, tag="call"):
    session_id: str
    call_id: int
    op: Op


class CloseSession(msgspec.Struct, frozen=True, tag="close-session"):
    session_id: str


class Result(msgspec.Struct, frozen=True, tag="result"):
    call_id: int
    errno: int = 0
    message: str = ""
    value: Value = None


class MembersChanged(msgspec.Struct, frozen=True, tag="members-changed"):
    """Pushed by `node`: the members now (empty while `node` is offline)."""

    node: str
    epoch: int
    members: list[Member]
    serving: bool


class ProtocolFault(msgspec.Struct, frozen=True, tag="fault"):
    """The node could not read a message; `call_id` is 0 when it could not tell which."""

    message: str
    call_id: int = 0


ClientMessage = Hello | SessionRequest | Call | CloseSession
NodeMessage = HelloReply | SessionAccept | SessionBusy | Result | MembersChanged | ProtocolFault

_encoder = msgspec.msgpack.Encoder()
_client_decoder = msgspec.msgpack.Decoder(ClientMessage)
_node_decoder = msgspec.msgpack.Decoder(NodeMessage)


class MessageError(Exception):
    """Bytes that are not a message of this protocol."""


def encode(message: ClientMessage | NodeMessage) -> bytes:
    return _encoder.encode(message)


@dataclass(frozen=True, slots=True)
class DataPieces:
    """A `Data` value whose bytes are these pieces (not a wire type: a node's tunnel
    service answers so, and the reply is sent without joining them)."""

    pieces: list[Buffer]


# msgpack's bin formats (the spec's bin 8, 16 and 32): a type byte, then the length.
_BIN8, _BIN16, _BIN32 = struct.Struct(">BB"), struct.Struct(">BH"), struct.Struct(">BI")
_EMPTY_BIN = _BIN8.pack(0xC4, 0)


def encode_pieces(message: ClientMessage | NodeMessage, bulk: list[Buffer]) -> list[Buffer]:
    """`encode(message)` in pieces, where the bytes field that ends the encoding (a
    Tunnel's payload or a Data's data, the last field of the last field: msgspec encodes
    fields in order) is left empty in `message` and holds the concatenation of `bulk`.
    The bulk is spliced in as it is, not copied; the receiver sees one ordinary message."""
    head = _encoder.encode(message)
    if not head.endswith(_EMPTY_BIN):
        raise ValueError(f"a {type(message).__name__} that does not end with an empty "
                         "bytes field")
    size = sum(len(piece) for piece in bulk)
    if size < 1 << 8:
        length = _BIN8.pack(0xC4, size)
    elif size < 1 << 16:
        length = _BIN16.pack(0xC5, size)
    else:
        length = _BIN32.pack(0xC6, size)
    return [head[:-len(_EMPTY_BIN)] + length, *bulk]


# What decoding hostile bytes can raise: msgspec's errors, and a few builtin ones (a string
# that is not UTF-8, an array as a map key).
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError)


def decode_client(payload: Buffer) -> ClientMessage:
    try:
        return _client_decoder.decode(payload)
    except _DECODE_ERRORS as exc:
        raise MessageError(str(exc)) from None


def decode_node(payload: Buffer) -> NodeMessage:
    try:
        return _node_decoder.decode(payload)
    except _DECODE_ERRORS as exc:
        raise MessageError(str(exc)) from None


def call_id_of(payload: Buffer) -> int:
    """The call id of a Call that failed to decode as a whole (0 if it has none)."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except _DECODE_ERRORS:
        return 0
    call_id = raw.get("call_id") if isinstance(raw, dict) else None
    return call_id if isinstance(call_id, int) and 0 < call_id < 1 << 63 else 0
