"""A node joins while the members are busy: writers on every running node create files the
whole time; none of their calls fails, and once the writers stop, the new node is online
with the same namespace and digest as the others."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster.conftest import Cluster
from tests.util import tree_diff, tree_state

pytestmark = [pytest.mark.mount, pytest.mark.slow]

WRITES_AFTER_JOIN = 20


class Writer(threading.Thread):
    """Creates files in its own directory until told to stop; keeps what succeeded."""

    def __init__(self, top: Path) -> None:
        super().__init__(daemon=True)
        self.top = top
        self.stop = threading.Event()
        self.written: dict[str, bytes] = {}
        self.errors: list[str] = []

    def run(self) -> None:
        self.top.mkdir()
        while not self.stop.is_set():
            name = f"f{len(self.written)}"
            data = os.urandom(64)
            try:
                (self.top / name).write_bytes(data)
            except OSError as exc:
                self.errors.append(f"{self.top / name}: {exc}")
                return
            self.written[f"{self.top.name}/{name}"] = data


def test_join_under_a_concurrent_write_load(new_cluster: Callable[..., Cluster]) -> None:
    c = new_cluster(4, start=False)
    c.format()
    for i in range(3):
        c.start_node(i)
    writers = [Writer(c.mnt(i) / f"w{i + 1}") for i in range(3)]
    for writer in writers:
        writer.start()
    try:
        c.start_node(3)  # joins through n1 while the writers go on
        target = sum(len(w.written) for w in writers) + WRITES_AFTER_JOIN
        while sum(len(w.written) for w in writers) < target and all(
                w.is_alive() for w in writers):
            (c.mnt(3) / "w1").exists()  # the new node serves meanwhile
    finally:
        for writer in writers:
            writer.stop.set()
        for writer in writers:
            writer.join(timeout=60)
    assert [e for w in writers for e in w.errors] == []
    quiet = c.wait_quiet_digests()
    assert sorted(n["name"] for n in quiet["nodes"] if n["state"] == "online") == [
        "n1", "n2", "n3", "n4"]
    trees = [tree_state(mount) for mount in c.mounts]
    for i, tree in enumerate(trees[1:], start=2):
        assert tree == trees[0], f"n1 and n{i} differ:\n" + "\n".join(tree_diff(trees[0], tree))
    for writer in writers:
        for name, data in writer.written.items():
            assert (c.mnt(3) / name).read_bytes() == data, f"{name} on n4"
