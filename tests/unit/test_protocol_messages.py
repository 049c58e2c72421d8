"""The file protocol's messages and path rules, called directly."""

from __future__ import annotations

import contextlib
import errno

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterfs.namespace import NamespaceError
from clusterfs.protocol import messages as m
from clusterfs.protocol.paths import split, split_parent
from lb.messages import SessionRequest


@pytest.mark.parametrize("message", [
    m.Hello(),
    SessionRequest("r1", "host-a", ""),
    m.Call("n1.1.1", 7, m.Write(3, 4096, b"\0data")),
    m.Call("n1.1.1", 8, m.Rename("/a", "/b", 1)),
    m.CloseSession("n1.1.1"),
])
def test_client_messages_survive_the_wire(message: m.ClientMessage) -> None:
    assert m.decode_client(m.encode(message)) == message


@pytest.mark.parametrize("message", [
    m.HelloReply(m.PROTOCOL_VERSION, "n1", 3, [m.Member("n1", "127.0.0.1:7000")], True),
    m.Result(7, value=m.Entries([m.DirEntry("f", 5, 0o100644, 9)], 0)),
    m.Result(8, errno.ENOENT, "No such file or directory"),
    m.MembersChanged("n2", 4, [], False),
    m.ProtocolFault("unreadable", 9),
])
def test_node_messages_survive_the_wire(message: m.NodeMessage) -> None:
    assert m.decode_node(m.encode(message)) == message


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_message_error(payload: bytes) -> None:
    with contextlib.suppress(m.MessageError):
        m.decode_client(payload)
    assert m.call_id_of(payload) >= 0


def test_bytes_that_are_not_utf8_where_a_string_belongs_are_a_message_error() -> None:
    payload = b"\x81\xa4type\xa2\xf7\x01"  # {"type": <invalid UTF-8>}
    with pytest.raises(m.MessageError):
        m.decode_client(payload)
    assert m.call_id_of(payload) == 0


def test_the_call_id_of_an_unreadable_call_is_found_if_it_is_there() -> None:
    payload = msgspec.msgpack.encode({"type": "call", "call_id": 41, "op": {"type": "?"}})
    with pytest.raises(m.MessageError):
        m.decode_client(payload)
    assert m.call_id_of(payload) == 41
    assert m.call_id_of(msgspec.msgpack.encode({"call_id": -3})) == 0
    assert m.call_id_of(msgspec.msgpack.encode({"call_id": True})) in (0, 1)


@pytest.mark.parametrize(("path", "names"), [
    ("/", []),
    ("/a/b", [b"a", b"b"]),
    ("//a/./b/", [b"a", b"b"]),
    ("/a/../../b", [b"a", b"..", b"..", b"b"]),  # ".." is resolved in the namespace
    ("/caf\u00e9", ["caf\u00e9".encode()]),
])
def test_paths_split_into_names(path: str, names: list[bytes]) -> None:
    assert split(path) == names


@pytest.mark.parametrize(("path", "code"), [
    ("relative", errno.EINVAL),
    ("", errno.EINVAL),
    ("/a\0b", errno.EINVAL),
    ("/" + "n" * 256, errno.ENAMETOOLONG),
    ("/a" * 2049, errno.ENAMETOOLONG),
])
def test_bad_paths_are_refused(path: str, code: int) -> None:
    with pytest.raises(NamespaceError) as caught:
        split(path)
    assert caught.value.errno == code


def test_a_change_needs_a_real_last_name() -> None:
    assert split_parent("/a/b") == ([b"a"], b"b")
    for path, code in (("/", errno.EBUSY), ("/a/..", errno.EINVAL)):
        with pytest.raises(NamespaceError) as caught:
            split_parent(path)
        assert caught.value.errno == code


# The bulk sizes where msgpack's bin format changes (bin 8, 16, 32), and a disk command's.
BULK_SIZES = [0, 1, 255, 256, 65535, 65536, 1 << 20]


@pytest.mark.parametrize("size", BULK_SIZES)
def test_a_call_encoded_in_pieces_is_the_same_message(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    bulk = [data[: size // 3], memoryview(data)[size // 3:]]
    call = m.Call("n1.1.1", 7, m.Tunnel(3, memoryview(b"")))
    pieces = m.encode_pieces(call, bulk)
    assert b"".join(pieces) == m.encode(m.Call("n1.1.1", 7, m.Tunnel(3, memoryview(data))))
    assert pieces[1:] == bulk  # the bulk itself, not a copy
    decoded = m.decode_client(b"".join(pieces))
    assert isinstance(decoded, m.Call) and decoded.op == m.Tunnel(3, memoryview(data))


@pytest.mark.parametrize("size", BULK_SIZES)
def test_a_data_result_encoded_in_pieces_is_the_same_message(size: int) -> None:
    data = b"\x5a" * size
    pieces = m.encode_pieces(m.Result(9, value=m.Data(memoryview(b""))), [data])
    assert b"".join(pieces) == m.encode(m.Result(9, value=m.Data(memoryview(data))))


def test_only_a_message_ending_with_an_empty_bytes_field_takes_pieces() -> None:
    with pytest.raises(ValueError):
        m.encode_pieces(m.Result(9, value=m.Data(memoryview(b"x"))), [b"y"])
    with pytest.raises(ValueError):
        m.encode_pieces(m.Call("n1.1.1", 7, m.Rename("/a", "/b", 1)), [b"y"])


def test_bulk_fields_decode_as_views_of_the_message() -> None:
    """A 1 MiB disk command is not copied out of the buffer it arrived in."""
    message = bytearray(m.encode(m.Call("n1.1.1", 7, m.Tunnel(3, memoryview(b"w" * 4096)))))
    call = m.decode_client(message)
    assert isinstance(call, m.Call) and isinstance(call.op, m.Tunnel)
    assert call.op.payload.obj is message
    reply = bytearray(m.encode(m.Result(9, value=m.Data(memoryview(b"r" * 4096)))))
    result = m.decode_node(reply)
    assert isinstance(result, m.Result) and isinstance(result.value, m.Data)
    assert result.value.data.obj is reply and result.value.data == b"r" * 4096
