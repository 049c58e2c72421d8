"""The local link: a client on a node's own host reaches it over a unix socket, without CURVE
and without ZeroMQ.

CURVE encrypts every byte twice on one machine (about 2 ms of CPU per MiB here), and ZeroMQ
hands every message to an I/O thread on each side (waking a thread costs 100-200 us on a
small VM, four times per call): a VM host attached to the node beside it pays both on every
disk command, for a wire no one else can see. So a node that runs as root also listens on a
unix stream socket, served by its trio loop directly (`local_stream`), at a path both sides
derive from the cluster's public key and the node's listen address:

    /run/clusterfs/<sha256(cluster key, address)>.sock   (directory mode 0700, root's)

A client holding the cluster's credentials that finds the socket connects there instead of
to HOST:PORT. Its first frame is a hello: a magic, a version, a password that is an HMAC of
the cluster's secret key (so the node admits only holders of the secret, as over CURVE) and
the client's identity; the node answers WELCOME or a one-line refusal and hangs up. The
node is genuine because only root can make a socket in that directory. After the hello,
every frame is one file protocol message, both ways: the link carries nothing else. Client
keys do not use it (their holders cannot prove the cluster's secret). A socket left by a
node killed with SIGKILL is replaced when a node starts on that address again; until then
it refuses connections, as the node's port does.

This module is the link's sans-IO part: paths, the password, the hello and the framing
(`FrameReader`: the driver receives straight into the buffer it names, one of the frame's
size, never into a growing stream buffer).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clusterfs.credentials import Credentials

LOCAL_LINK_DIR = Path("/run/clusterfs")
_PASSWORD_CONTEXT = b"clusterfs local link v1"

FRAME_HEADER = struct.Struct(">I")  # the length in bytes of the frame's payload, which follows
HELLO = struct.Struct(">8sB64s")  # magic, version, password (hex); the identity follows
HELLO_MAGIC = b"CFSLOCAL"
HELLO_VERSION = 1
MAX_IDENTITY_BYTES = 255
WELCOME = b"\x00"
REFUSED = b"\x01"  # followed by the reason, UTF-8


class LinkError(Exception):
    """The peer broke the link's rules (a frame too large, a bad hello); the message says
    how, in one line."""


def link_path(cluster_key: bytes, address: str) -> Path:
    digest = hashlib.sha256(cluster_key + b"\0" + address.encode()).hexdigest()[:32]
    return LOCAL_LINK_DIR / f"{digest}.sock"


def password(credentials: Credentials) -> bytes:
    """What a holder of the cluster's secret key says over the local link (hex, 64 bytes)."""
    return hmac.new(credentials.secret_key, _PASSWORD_CONTEXT, hashlib.sha256
                    ).hexdigest().encode()


def _private(directory: Path) -> bool:
    """Whether `directory` is ours alone: only such a directory vouches for its sockets."""
    try:
        info = directory.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() == 0 \
        and not info.st_mode & 0o077


def server_path(credentials: Credentials, address: str) -> Path | None:
    """Where a node listening on `address` binds its local link; None if it cannot (not
    root, or the directory is not private)."""
    if credentials.is_client_key or os.geteuid() != 0:
        return None
    with contextlib.suppress(OSError):
        LOCAL_LINK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private(LOCAL_LINK_DIR):
        return None
    return link_path(credentials.cluster_key, address)


def client_path(credentials: Credentials, address: str) -> Path | None:
    """The local link of the node at `address` if this client can use it, else None."""
    if credentials.is_client_key or not _private(LOCAL_LINK_DIR):
        return None
    path = link_path(credentials.cluster_key, address)
    try:
        return path if stat.S_ISSOCK(path.lstat().st_mode) else None
    except OSError:
        return None


# -- the hello ----------------------------------------------------------------------------
def hello(credentials: Credentials, identity: str) -> bytes:
    """The client's first frame."""
    return HELLO.pack(HELLO_MAGIC, HELLO_VERSION, password(credentials)) + identity.encode()


def check_hello(payload: bytes | bytearray, expected_password: bytes, identity_prefix: str
                ) -> str:
    """The identity a hello claims, if it knows `expected_password` and the identity starts
    with `identity_prefix`; LinkError saying why not otherwise."""
    if len(payload) < HELLO.size or payload[:len(HELLO_MAGIC)] != HELLO_MAGIC:
        raise LinkError("not a clusterfs local link hello")
    _magic, version, said = HELLO.unpack_from(payload)
    if version != HELLO_VERSION:
        raise LinkError(f"local link version {version}, not {HELLO_VERSION}")
    if not hmac.compare_digest(said, expected_password):
        raise LinkError("not the cluster's local link password")
    try:
        identity = bytes(payload[HELLO.size:]).decode()
    except UnicodeDecodeError:
        raise LinkError("an identity that is not UTF-8") from None
    if not identity.startswith(identity_prefix) or len(identity) > MAX_IDENTITY_BYTES:
        raise LinkError(f"identity {identity[:40]!r} is not a client's")
    return identity


def refusal(reason: str) -> bytes:
    return REFUSED + reason.encode()


def parse_answer(payload: bytes | bytearray) -> str:
    """The node's answer to a hello: '' for WELCOME, else the reason it refused."""
    if bytes(payload) == WELCOME:
        return ""
    if payload[:1] == REFUSED:
        return bytes(payload[1:]).decode(errors="replace") or "refused"
    return "it did not answer the local link's hello"


# -- frames -------------------------------------------------------------------------------
def frame_header(payload_bytes: int) -> bytes:
    return FRAME_HEADER.pack(payload_bytes)


class FrameReader:
    """Cuts a byte stream into frames without copying: the driver receives into `buffer()`
    and reports how much came with `received`, which returns each payload when complete."""

    def __init__(self, max_payload_bytes: int) -> None:
        self.max_payload_bytes = max_payload_bytes
        self._header = bytearray(FRAME_HEADER.size)
        self._payload: bytearray | None = None  # None while reading a header
        self._filled = 0

    def buffer(self) -> memoryview:
        """Where the next bytes of the stream go."""
        target = self._header if self._payload is None else self._payload
        return memoryview(target)[self._filled:]

    def received(self, count: int) -> bytearray | None:
        """`count` bytes went into `buffer()`; the payload they complete, or None."""
        self._filled += count
        if self._payload is None:
            if self._filled < FRAME_HEADER.size:
                return None
            (size,) = FRAME_HEADER.unpack(self._header)
            if size > self.max_payload_bytes:
                raise LinkError(f"a frame of {size} bytes is more than the "
                                f"{self.max_payload_bytes} a message may carry")
            self._payload, self._filled = bytearray(size), 0
            if size:
                return None
        if self._filled < len(self._payload):
            return None
        payload, self._payload, self._filled = self._payload, None, 0
        return payload
