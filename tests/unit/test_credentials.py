"""The cluster's credentials file: made by format, read back, and refused when wrong."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from clusterfs.blockdir import format_blockdir
from clusterfs.credentials import (
    CredentialsError,
    create_credentials,
    credentials_path,
    load_credentials,
    parse_credentials,
)
from clusterfs.txn.transport import new_keypair


def test_format_makes_a_private_key_pair_that_loads_back(tmp_path: Path) -> None:
    blockdir = format_blockdir(tmp_path / "blocks")
    path = credentials_path(blockdir.root)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    credentials = load_credentials(path)
    assert len(credentials.public_key) == 40 == len(credentials.secret_key)
    assert credentials.secret_key.decode() not in repr(credentials)


def test_every_format_makes_another_key_pair(tmp_path: Path) -> None:
    first = create_credentials(tmp_path / "a")
    second = create_credentials(tmp_path / "b")
    assert first.public_key != second.public_key
    assert load_credentials(credentials_path(tmp_path / "a")) == first


def _file(public: bytes, secret: bytes) -> bytes:
    return b"# comment\n\npublic = " + public + b"\nsecret = " + secret + b"\n"


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="credentials are missing") as info:
        load_credentials(tmp_path / "nothing")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("kind", "message"), [
    ("empty", "a key is missing"),
    ("no secret", "a key is missing"),
    ("short key", "not a clusterfs credentials file"),
    ("other name", "not a clusterfs credentials file"),
    ("binary", "not a clusterfs credentials file"),
    ("mismatched pair", "the public key is not the secret key's"),
])
def test_a_damaged_file_is_refused_in_one_line(kind: str, message: str) -> None:
    public, secret = new_keypair()
    other_public, _ = new_keypair()
    raw = {
        "empty": b"",
        "no secret": b"public = " + public + b"\n",
        "short key": _file(public[:39], secret),
        "other name": _file(public, secret).replace(b"secret", b"private"),
        "binary": os.urandom(200),
        "mismatched pair": _file(other_public, secret),
    }[kind]
    with pytest.raises(CredentialsError, match=message) as info:
        parse_credentials(raw, "FILE")
    assert str(info.value).startswith("FILE: ") and "\n" not in str(info.value)
