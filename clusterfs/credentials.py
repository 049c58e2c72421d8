"""The cluster's credentials: one CURVE key pair, made by `clusterfs format`.

The pair lives in the common block directory (`BLOCKDIR/cluster/credentials`, mode 0600),
which every node has and which holds every file's data anyway: whoever can read it is
already inside the cluster. Every node uses the pair as its server key and as its client
key, and a node admits a connection only from a peer that proves it holds the secret key
(the transport's ZAP handler). So a process without the file cannot join, cannot send a
prepare or a control request, and cannot read anything on the wire (CURVE encrypts it).

The command line finds the file through the mount point (the block directory is part of the
mount's source, see `status.mount_source`) or is given it with `--credentials`.

File format, one key per line in Z85 (ZeroMQ's text form of a 32-byte key):

    # clusterfs cluster credentials: keep secret
    public = <40 characters>
    secret = <40 characters>
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from clusterfs.txn.transport import new_keypair, public_key_of

CREDENTIALS_FILE = "cluster/credentials"
CREDENTIALS_MODE = 0o600
_Z85_KEY = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


class CredentialsError(Exception):
    """The credentials file is missing, unreadable or not one."""


@dataclass(frozen=True, slots=True)
class Credentials:
    public_key: bytes  # Z85, 40 bytes
    secret_key: bytes  # Z85, 40 bytes

    def __repr__(self) -> str:  # never print the secret, not even in a traceback
        return f"Credentials(public_key={self.public_key!r})"


def credentials_path(blockdir_root: Path) -> Path:
    return blockdir_root / CREDENTIALS_FILE


def create_credentials(blockdir_root: Path) -> Credentials:
    """Make the cluster's key pair (once, when the block directory is formatted)."""
    public_key, secret_key = new_keypair()
    path = credentials_path(blockdir_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("# clusterfs cluster credentials: keep secret\n"
            f"public = {public_key.decode()}\nsecret = {secret_key.decode()}\n")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CREDENTIALS_MODE)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    return Credentials(public_key, secret_key)


def load_credentials(path: Path) -> Credentials:
    """Read a credentials file, or say in one line why it cannot be used."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CredentialsError(f"{path}: the cluster's credentials are missing (made by "
                               "`clusterfs format`)") from None
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read the cluster's credentials: "
                               f"{exc.strerror}") from None
    return parse_credentials(raw, str(path))


def parse_credentials(raw: bytes, where: str) -> Credentials:
    keys: dict[bytes, bytes] = {}
    for line in raw.splitlines():
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        name, sep, value = (part.strip() for part in line.partition(b"="))
        if not sep or name not in (b"public", b"secret") or not _Z85_KEY.fullmatch(value):
            raise CredentialsError(f"{where}: not a clusterfs credentials file")
        keys[name] = value
    if b"public" not in keys or b"secret" not in keys:
        raise CredentialsError(f"{where}: not a clusterfs credentials file (a key is missing)")
    if public_key_of(keys[b"secret"]) != keys[b"public"]:
        raise CredentialsError(f"{where}: the public key is not the secret key's")
    return Credentials(keys[b"public"], keys[b"secret"])
