"""The local link: a client on a node's own host reaches it over a unix socket, without CURVE.

CURVE encrypts every byte twice on one machine (about 2 ms of CPU per MiB here), which a
VM host attached to the node beside it pays on every disk command, for a wire no one else
can see. So a node that runs as root also listens on a unix socket, at a path both sides
derive from the cluster's public key and the node's listen address:

    /run/clusterfs/<sha256(cluster key, address)>.sock   (directory mode 0700, root's)

A client holding the cluster's credentials that finds the socket connects there instead of
to HOST:PORT, with ZeroMQ's PLAIN mechanism: the password is an HMAC of the cluster's
secret key, so the node admits only holders of the secret, as over CURVE, and the node it
reaches is genuine because only root can make a socket in that directory. Nothing else
changes: the same ROUTER, the same identities, the same sessions. Client keys do not use
it (their holders cannot prove the cluster's secret). A socket left by a node killed with
SIGKILL is replaced when a node starts on that address again; until then it refuses
connections, as the node's port does.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clusterfs.credentials import Credentials

LOCAL_LINK_DIR = Path("/run/clusterfs")
PLAIN_USERNAME = b"clusterfs-local"
_PASSWORD_CONTEXT = b"clusterfs local link v1"


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
