"""Stable hashes and affinity keys.

Why: every node must map a session request to the same bucket and build the
same table, in separate processes started with different PYTHONHASHSEED
values, so Python's salted `hash()` is never used here. Two hashes serve two
purposes:

- member permutations (Maglev offset and skip) are computed once per member
  per view, so they use blake2b with a personalisation string per purpose;
- session keys are hashed on every request, so they use CRC-32 from zlib:
  stable, about ten times cheaper than blake2b in CPython, and well spread
  over a prime number of buckets. The key is not a secret, so a keyed or
  cryptographic hash buys nothing here.

An affinity key says which requests belong together (NLB's affinity modes):
the client id (default), the client address, or the client's network (/24 for
IPv4, /64 for IPv6). Keys carry a mode prefix so that the modes never collide.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import zlib

KEY_HASH_SEED = 0x1B5EED  # CRC start value: separates lb keys from other CRC users
IPV4_NETWORK_PREFIX = 24
IPV6_NETWORK_PREFIX = 64


class AffinityMode(enum.Enum):
    """Which part of a request decides where its session lives."""

    CLIENT_ID = "client-id"
    ADDRESS = "address"
    NETWORK = "network"


def member_hash64(name: str, purpose: bytes) -> int:
    """A 64-bit hash of a member name, different for each `purpose` (<= 16 bytes)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8, person=purpose).digest()
    return int.from_bytes(digest, "little")


def key_hash(key: bytes) -> int:
    """The 32-bit hash of an affinity key; the same in every process."""
    return zlib.crc32(key, KEY_HASH_SEED)


def key_bucket(key: bytes, table_size: int) -> int:
    """The bucket of an affinity key in a table of `table_size` buckets."""
    return zlib.crc32(key, KEY_HASH_SEED) % table_size


def affinity_key(mode: AffinityMode, client_id: str, client_addr: str) -> bytes:
    """The affinity key of a request from `client_id` at `client_addr`.

    Raises ValueError when the mode needs an address and `client_addr` is not one.
    """
    if mode is AffinityMode.CLIENT_ID:
        return b"c:" + client_id.encode()
    address = ipaddress.ip_address(client_addr)
    if mode is AffinityMode.ADDRESS:
        return b"a:" + address.packed
    prefix = IPV4_NETWORK_PREFIX if address.version == 4 else IPV6_NETWORK_PREFIX
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    return b"n:" + network.network_address.packed + bytes([prefix])
