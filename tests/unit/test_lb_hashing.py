"""Stable hashes and affinity keys."""

from __future__ import annotations

import pytest

from lb.hashing import AffinityMode, affinity_key, key_bucket, key_hash, member_hash64


def test_hashes_are_fixed_values() -> None:
    # Known answers: a change here would move every session of a running cluster.
    assert key_hash(b"c:alice") == 549252692
    assert member_hash64("node-00", b"lb-maglev-offset") == 16696078813381104245
    assert key_bucket(b"c:alice", 65537) == 549252692 % 65537


def test_member_hash_depends_on_purpose() -> None:
    assert member_hash64("n", b"a") != member_hash64("n", b"b")


def test_client_id_mode_ignores_the_address() -> None:
    one = affinity_key(AffinityMode.CLIENT_ID, "vmhost-1", "10.0.0.1")
    assert one == affinity_key(AffinityMode.CLIENT_ID, "vmhost-1", "not an address")
    assert one != affinity_key(AffinityMode.CLIENT_ID, "vmhost-2", "10.0.0.1")


def test_address_mode_ignores_the_client_id() -> None:
    one = affinity_key(AffinityMode.ADDRESS, "a", "192.168.1.7")
    assert one == affinity_key(AffinityMode.ADDRESS, "b", "192.168.1.7")
    assert one != affinity_key(AffinityMode.ADDRESS, "a", "192.168.1.8")


def test_network_mode_groups_a_slash_24() -> None:
    key = affinity_key(AffinityMode.NETWORK, "a", "192.168.1.7")
    assert key == affinity_key(AffinityMode.NETWORK, "b", "192.168.1.250")
    assert key != affinity_key(AffinityMode.NETWORK, "a", "192.168.2.7")


def test_network_mode_groups_an_ipv6_slash_64() -> None:
    key = affinity_key(AffinityMode.NETWORK, "a", "2001:db8::1")
    assert key == affinity_key(AffinityMode.NETWORK, "a", "2001:db8::ffff:1")
    assert key != affinity_key(AffinityMode.NETWORK, "a", "2001:db8:0:1::1")


def test_modes_never_collide() -> None:
    keys = {affinity_key(mode, "10.0.0.1", "10.0.0.1") for mode in AffinityMode}
    assert len(keys) == 3


def test_bad_address_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        affinity_key(AffinityMode.ADDRESS, "a", "not an address")
