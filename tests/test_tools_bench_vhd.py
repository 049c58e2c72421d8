"""Smoke test of tools/bench_vhd.py: a tiny run yields a positive figure for every layer,
the tunnel through a real 1-node cluster included, on both kinds of disk, and leaves no
mount, node process or work directory behind.

No timing assertions (DESIGN.md section 5): only that each measurement ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "tools" / "bench_vhd.py"
DISKS = ("fixed", "dynamic")
LAYERS = ("raw", "image", "target", "tunnel")
WORKLOADS = ("first-write", "seq-write", "seq-read", "rand-write", "rand-read")

pytestmark = [
    pytest.mark.mount,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny run, shared by the tests below."""
    workdir = tmp_path_factory.mktemp("bench_vhd")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--size-mib", "8", "--seconds", "0.2", "--json",
         "--no-frontends", "--dir", str(workdir)],  # the front ends have their own test
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
    assert proc.stdout, f"no report; exit {proc.returncode}; stderr:\n{proc.stderr[-3000:]}"
    parsed: dict[str, Any] = json.loads(proc.stdout)
    parsed["_returncode"] = proc.returncode
    parsed["_stderr"] = proc.stderr
    parsed["_workdir"] = str(workdir)
    return parsed


def test_the_run_succeeds(report: dict[str, Any]) -> None:
    assert report["_returncode"] == 0, report["_stderr"][-3000:]
    assert report["errors"] == []
    assert report["node_logs"] == {}, "the node logged warnings or errors"
    assert report["settings"]["tunnel"] is True
    assert report["tunnel_node"] == "n1"
    # how the node had each disk open, from its /proc/PID/fdinfo
    assert set(report["tunnel_open_modes"]) == set(DISKS)
    assert set(report["tunnel_open_modes"].values()) <= {"O_DIRECT", "buffered"}
    assert "bench_vhd.py --size-mib 8" in "\n".join(report["header"])


@pytest.mark.parametrize("disk", DISKS)
@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_has_positive_figures(report: dict[str, Any], disk: str, layer: str
                                          ) -> None:
    figures = report["disks"][disk][layer]
    assert set(figures) == set(WORKLOADS)
    for workload, fig in figures.items():
        assert fig["ops"] > 0, workload
        assert fig["mib_s"] > 0, workload
        assert fig["iops"] > 0, workload


@pytest.mark.parametrize("disk", DISKS)
def test_the_tunnel_is_compared_with_the_target(report: dict[str, Any], disk: str) -> None:
    for workload in WORKLOADS:
        assert report["ratios"][disk][workload]["tunnel/target"] > 0, workload


def test_nothing_is_left_behind(report: dict[str, Any]) -> None:
    workdir = report["_workdir"]
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if workdir in line]
    assert os.listdir(workdir) == [], "the scratch directory was not removed"
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and workdir in cmdline(pid)]


def cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""  # gone meanwhile
