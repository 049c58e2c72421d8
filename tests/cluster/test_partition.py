"""A network partition, for real: each node runs in a network namespace of its own (made
here with `ip netns` and veth pairs on a bridge; the nodes enter only the network namespace,
so their mounts are visible to the test), and one node's link is cut. The cut node stops
serving (EIO); the two others remove it and go on committing. Once the link is back, the
cut node asks to be admitted again by itself, catches up, serves again, and every digest is
equal."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.cluster.conftest import Cluster
from tests.util import tree_diff, tree_state

pytestmark = [pytest.mark.mount, pytest.mark.slow]

SUBNET = "10.213.77"
OFFLINE_WITHIN_S = 20.0
REJOIN_WITHIN_S = 60.0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Network:
    """A bridge in this namespace and one network namespace per node, linked by veth."""

    def __init__(self, nodes: int) -> None:
        tag = os.getpid() % 100_000
        self.bridge = f"cfsbr{tag}"
        self.namespaces = [f"cfs{tag}n{i + 1}" for i in range(nodes)]
        self.links = [f"cfs{tag}v{i + 1}" for i in range(nodes)]
        self.made: list[Callable[[], None]] = []

    def create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self.made.append(lambda: _ip("link", "del", self.bridge))
        _ip("addr", "add", f"{SUBNET}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (ns, link) in enumerate(zip(self.namespaces, self.links, strict=True)):
            _ip("netns", "add", ns)
            self.made.append(lambda ns=ns: _ip("netns", "del", ns))  # type: ignore[misc]
            _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", link, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def host(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def enter(self, i: int) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.namespaces[i]}", "--"]

    def cut(self, i: int) -> None:
        _ip("link", "set", self.links[i], "down")

    def heal(self, i: int) -> None:
        _ip("link", "set", self.links[i], "up")

    def remove(self) -> None:
        for undo in reversed(self.made):
            try:
                undo()
            except subprocess.CalledProcessError as exc:
                print(f"cleanup: {exc.cmd}: {exc.stderr}")


@pytest.fixture
def network() -> Iterator[Network]:
    """Three node namespaces; removed after the nodes (requested before new_cluster)."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"):
        pytest.skip("needs root, ip (iproute2) and nsenter to make network namespaces")
    net = Network(3)
    try:
        net.create()
    except subprocess.CalledProcessError as exc:
        net.remove()
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.strip()}")
    yield net
    net.remove()


def _errno_of(path: os.PathLike[str]) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_a_cut_node_goes_offline_and_the_majority_goes_on(
        network: Network, new_cluster: Callable[..., Cluster]) -> None:
    c = new_cluster(3, start=False)
    for i, node in enumerate(c.nodes):
        node.host = network.host(i)
        node.prefix = network.enter(i)
    c.start()
    (c.mnt(0) / "before").write_bytes(b"before the cut")
    c.wait_quiet_digests()

    network.cut(2)
    deadline = time.monotonic() + OFFLINE_WITHIN_S
    while _errno_of(c.mnt(2) / "before") != errno.EIO:
        assert time.monotonic() < deadline, "the cut node still serves"
        time.sleep(0.2)
    (c.mnt(0) / "during").write_bytes(b"while n3 was cut off")  # the majority commits
    assert (c.mnt(1) / "during").read_bytes() == b"while n3 was cut off"
    n1 = next(n for n in c.status(0)["nodes"] if n["name"] == "n1")
    assert sorted(n1["members"]) == ["n1", "n2"], n1

    network.heal(2)
    deadline = time.monotonic() + REJOIN_WITHIN_S
    while _errno_of(c.mnt(2) / "during") != 0:  # back, and caught up
        assert time.monotonic() < deadline, "the cut node did not come back after the heal"
        time.sleep(0.2)
    quiet = c.wait_quiet_digests()
    assert sorted(n["name"] for n in quiet["nodes"] if n["state"] == "online") == [
        "n1", "n2", "n3"]
    trees = [tree_state(mount) for mount in c.mounts]
    for i, tree in enumerate(trees[1:], start=2):
        assert tree == trees[0], f"n1 and n{i} differ:\n" + "\n".join(tree_diff(trees[0], tree))
    assert (c.mnt(2) / "during").read_bytes() == b"while n3 was cut off"
