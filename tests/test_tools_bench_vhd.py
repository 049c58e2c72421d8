"""Smoke test of tools/bench_vhd.py: a tiny run yields a positive figure for every layer,
the tunnel through a real 1-node cluster included, on both kinds of disk, and for every
workload of every front end that can run here (`vhdshare attach` over NBD and iSCSI,
qemu-nbd, tgtd; any other says why it is left out), and leaves no mount, node,
attachment, qemu-nbd, tgtd or work directory behind.

No timing assertions (DESIGN.md section 5): only that each measurement ran.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
FRONTENDS = ("vhdshare-nbd", "vhdshare-iscsi", "qemu-nbd", "tgtd")
CASES = ("seq-write depth 1", "seq-read depth 1", "rand-write depth 1", "rand-read depth 1")

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
         "--frontend-depths", "1", "--dir", str(workdir)],
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


# --- the front ends (tools/bench_vhd_frontends.py), in the same run ---------------------

def test_the_front_ends_ran(report: dict[str, Any]) -> None:
    fronts = report["frontends"]
    assert fronts["errors"] == []
    assert list(fronts["disks"]) == ["fixed"]
    assert set(fronts["disks"]["fixed"]) == set(CASES)


def test_what_must_run_here_ran(report: dict[str, Any]) -> None:
    fronts = report["frontends"]
    assert "vhdshare-nbd" not in fronts["left_out"]  # the cluster and attach --nbd work
    for name, program in (("qemu-nbd", "qemu-nbd"), ("tgtd", "tgtd")):
        if shutil.which(program):
            assert name not in fronts["left_out"], fronts["left_out"][name]


@pytest.mark.parametrize("front", FRONTENDS)
def test_every_front_end_has_figures_or_a_reason(report: dict[str, Any], front: str) -> None:
    fronts = report["frontends"]
    if front in fronts["left_out"]:
        reason = fronts["left_out"][front]
        assert reason.strip()
        assert f"# {front} column left out: {reason}" in [f"# {h}" for h in fronts["header"]]
        assert all(front not in figures for figures in fronts["disks"]["fixed"].values())
        return
    for case in CASES:
        fig = fronts["disks"]["fixed"][case][front]
        assert fig["ops"] > 0, case
        assert fig["mib_s"] > 0, case
        assert fig["iops"] > 0, case


def test_vhdshare_is_compared_with_qemu_nbd(report: dict[str, Any]) -> None:
    for case in CASES:
        assert report["frontends"]["ratios"]["fixed"][case]["vhdshare-nbd/qemu-nbd"] > 0, case


def test_no_tgtd_is_left_behind(report: dict[str, Any]) -> None:
    # nodes, attachments and qemu-nbd name the work directory (test_nothing_is_left_behind);
    # our tgtd names its control port
    ports = re.findall(r"tgtd -f -C (\d+) ", report["_stderr"])
    assert ports or "tgtd" in report["frontends"]["left_out"]
    for port in ports:
        assert not [pid for pid in pids() if f"tgtd\0-f\0-C\0{port}\0" in cmdline(pid)]
        assert not Path(f"/var/run/tgtd/socket.{port}").exists()


def pids() -> list[str]:
    return [pid for pid in os.listdir("/proc") if pid.isdigit()]
