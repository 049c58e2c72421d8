"""`clusterfs demo --no-wait`: the README's main job, end to end (a 3-node cluster)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.util import clusterfs_command, is_mounted

NODES = ("n1", "n2", "n3")


def _demo(base: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*clusterfs_command(), "demo", str(base), "--no-wait"],
                          capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.mount
def test_demo_tours_three_nodes_stops_and_restarts_from_its_directory(fresh_base: Path
                                                                      ) -> None:
    proc = _demo(fresh_base)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for name in NODES:
        assert f"node {name} is serving the cluster" in out
        assert not is_mounted(fresh_base / f"mnt-{name}")
    assert "hello from n1" in out.split("read through node n3", 1)[1]
    race = [line for line in out.splitlines() if line.startswith(("  n1: ", "  n2: "))]
    assert sorted(line.split(": ", 1)[1] for line in race) == ["created it", "got EEXIST"]
    status = out.split("clusterfs status", 1)[1]
    assert "members n1, n2, n3" in status
    assert "equal on every online node" in status
    assert "  PR generation=0x1, Reservation follows:" in out  # host-b sees host-a's
    assert "vhdshare: error: RESERVE: RESERVATION CONFLICT" in out
    assert out.rstrip().endswith("stopped")
    again = _demo(fresh_base)  # the nodes restart from their state directories
    assert again.returncode == 0, again.stdout + again.stderr
    assert "members n1, n2, n3" in again.stdout
