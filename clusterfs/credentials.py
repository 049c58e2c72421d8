"""The cluster's credentials: one CURVE key pair, made by `clusterfs format`.

The pair lives in the common block directory (`BLOCKDIR/cluster/credentials`, mode 0600),
which every node has and which holds every file's data anyway: whoever can read it is
already inside the cluster. Every node uses the pair as its server key and as its client
key, and a node admits a connection only from a peer that proves it holds the secret key
(the transport's ZAP handler). So a process without the file cannot join, cannot send a
prepare or a control request, and cannot read anything on the wire (CURVE encrypts it).

The command line finds the file through the mount point (the block directory is part of the
mount's source, see `status.mount_source`) or is given it with `--credentials`.

Client keys: a host that should use the file protocol without holding the cluster's secret
gets a key pair of its own (`clusterfs client-key BLOCKDIR NAME FILE`), whose public half is
listed in `BLOCKDIR/cluster/clients/NAME`. Its file also names the cluster's public key (the
`server` line) so that it can check it talks to the cluster. The nodes admit such a key as a
file protocol client only: its connections carry the identity prefix `key-`, and a node
drops whatever they send on any other channel (see `clusterfs.txn.transport`). Deleting the
NAME file revokes the key for new connections.

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
CLIENT_KEYS_DIR = "cluster/clients"
CREDENTIALS_MODE = 0o600
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_Z85_KEY = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


class CredentialsError(Exception):
    """The credentials file is missing, unreadable or not one."""


@dataclass(frozen=True, slots=True)
class Credentials:
    public_key: bytes  # Z85, 40 bytes
    secret_key: bytes  # Z85, 40 bytes
    server_key: bytes = b""  # a client key's: the cluster's public key

    def __repr__(self) -> str:  # never print the secret, not even in a traceback
        return f"Credentials(public_key={self.public_key!r})"

    @property
    def is_client_key(self) -> bool:
        return bool(self.server_key)

    @property
    def cluster_key(self) -> bytes:
        """The cluster's public key (the CURVE server key of every node)."""
        return self.server_key or self.public_key


def credentials_path(blockdir_root: Path) -> Path:
    return blockdir_root / CREDENTIALS_FILE


def create_credentials(blockdir_root: Path) -> Credentials:
    """Make the cluster's key pair (once, when the block directory is formatted)."""
    public_key, secret_key = new_keypair()
    path = credentials_path(blockdir_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_secret(path, "# clusterfs cluster credentials: keep secret\n"
                  f"public = {public_key.decode()}\nsecret = {secret_key.decode()}\n")
    return Credentials(public_key, secret_key)


def _write_secret(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CREDENTIALS_MODE)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def create_client_key(blockdir_root: Path, name: str, path: Path) -> Credentials:
    """Make a client key pair into `path` and authorise it as `name` in the cluster."""
    if not _CLIENT_NAME.fullmatch(name):
        raise CredentialsError(f"invalid client name {name!r}: use up to 63 letters, digits, "
                               "'.', '_' or '-'")
    cluster = load_credentials(credentials_path(blockdir_root))
    if path.exists():
        raise CredentialsError(f"{path}: exists; not overwriting a key")
    public_key, secret_key = new_keypair()
    _write_secret(path, f"# clusterfs client key {name}: keep secret\n"
                  f"public = {public_key.decode()}\nsecret = {secret_key.decode()}\n"
                  f"server = {cluster.public_key.decode()}\n")
    listed = blockdir_root / CLIENT_KEYS_DIR / name
    listed.parent.mkdir(parents=True, exist_ok=True)
    listed.write_text(public_key.decode() + "\n")
    return Credentials(public_key, secret_key, cluster.public_key)


def revoke_client_key(blockdir_root: Path, name: str) -> None:
    try:
        (blockdir_root / CLIENT_KEYS_DIR / name).unlink()
    except FileNotFoundError:
        raise CredentialsError(f"no client key {name!r} in {blockdir_root}") from None


def authorised_client_keys(blockdir_root: Path) -> set[bytes]:
    """The public keys (Z85) of the authorised clients; unreadable entries are skipped."""
    keys: set[bytes] = set()
    try:
        entries = list((blockdir_root / CLIENT_KEYS_DIR).iterdir())
    except OSError:
        return keys
    for entry in entries:
        try:
            value = entry.read_bytes().strip()
        except OSError:
            continue
        if _Z85_KEY.fullmatch(value):
            keys.add(value)
    return keys


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
        if not sep or name not in (b"public", b"secret", b"server") \
                or not _Z85_KEY.fullmatch(value):
            raise CredentialsError(f"{where}: not a clusterfs credentials file")
        keys[name] = value
    if b"public" not in keys or b"secret" not in keys:
        raise CredentialsError(f"{where}: not a clusterfs credentials file (a key is missing)")
    if public_key_of(keys[b"secret"]) != keys[b"public"]:
        raise CredentialsError(f"{where}: the public key is not the secret key's")
    return Credentials(keys[b"public"], keys[b"secret"], keys.get(b"server", b""))
