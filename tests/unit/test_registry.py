"""The node registry: checked names, one address file per node in the block directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterfs.registry import Registry, RegistryError, check_name


@pytest.mark.parametrize("name", ["a", "n0", "node-1", "node_1", "node.example", "A9",
                                  "x" * 63, "0", "a..b", "a-", "cl-i"])
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", [
    "", ".", "..", "../x", "a/b", "/a", "a\\b", "x" * 64, "-a", ".hidden", "_a",
    "cli-1234", "cli-", "a b", "a\n", "a\x00", "é", "a:b", "a@b",
])
def test_check_name_rejects(name: str) -> None:
    with pytest.raises(RegistryError) as info:
        check_name(name)
    assert "\n" not in str(info.value)  # one line for the operator
    assert repr(name) in str(info.value)


def test_register_then_address(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.register("a", "127.0.0.1:7000")
    registry.register("b", "[::1]:7001")
    assert registry.address("a") == "127.0.0.1:7000"
    assert registry.address("b") == "[::1]:7001"
    assert (tmp_path / "cluster" / "nodes" / "a").read_text() == "127.0.0.1:7000\n"


def test_another_registry_on_the_same_directory_sees_the_address(tmp_path: Path) -> None:
    Registry(tmp_path).register("a", "10.0.0.1:7000")
    assert Registry(tmp_path).address("a") == "10.0.0.1:7000"


def test_register_again_overwrites(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.register("a", "127.0.0.1:7000")
    registry.register("a", "127.0.0.1:7999")
    assert registry.address("a") == "127.0.0.1:7999"
    assert sorted(p.name for p in (tmp_path / "cluster" / "nodes").iterdir()) == ["a"]


def test_address_of_an_unknown_name_is_none(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    assert registry.address("a") is None  # not even the directory exists yet
    registry.register("a", "127.0.0.1:7000")
    assert registry.address("b") is None


@pytest.mark.parametrize("name", ["", "..", "../../etc/passwd", "cli-x", "-a", "a/b"])
def test_address_of_an_invalid_name_is_none(tmp_path: Path, name: str) -> None:
    registry = Registry(tmp_path)
    registry.register("a", "127.0.0.1:7000")
    (tmp_path / "cluster" / "x").write_text("127.0.0.1:1\n")  # "nodes/../x" must not be read
    assert registry.address(name) is None


def test_address_of_an_empty_file_is_none(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.register("a", "127.0.0.1:7000")
    (tmp_path / "cluster" / "nodes" / "a").write_text("\n")
    assert registry.address("a") is None


def test_register_refuses_an_invalid_name_and_writes_nothing(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    for name in ("../escape", "cli-1", ".."):
        with pytest.raises(RegistryError):
            registry.register(name, "127.0.0.1:7000")
    assert not (tmp_path / "escape").exists()
    nodes = tmp_path / "cluster" / "nodes"
    assert not nodes.exists() or list(nodes.iterdir()) == []
