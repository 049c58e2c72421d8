"""Smoke test of tools/bench_vhd_frontends.py: a tiny run through a real 1-node cluster yields
a positive figure for every workload on every front end that can run here (`vhdshare attach`
over NBD, qemu-nbd, tgtd and, once it is built, `vhdshare attach --iscsi`), says why any
other is left out, and leaves no mount, node, attachment, qemu-nbd or tgtd behind.

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
BENCH = REPO / "tools" / "bench_vhd_frontends.py"
FRONTENDS = ("vhdshare-nbd", "vhdshare-iscsi", "qemu-nbd", "tgtd")
CASES = ("seq-write depth 1", "seq-read depth 1", "rand-write depth 1", "rand-read depth 1")

pytestmark = [
    pytest.mark.mount,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts, tgtd)"),
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (the client)"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny run (8 MiB, depth 1, ~0.2 s per case), shared by the tests below."""
    workdir = tmp_path_factory.mktemp("bench_vhd_frontends")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--size-mib", "8", "--seconds", "0.2", "--depths", "1",
         "--json", "--dir", str(workdir)],
        capture_output=True, text=True, timeout=180, check=False, cwd=REPO)
    assert proc.stdout, f"no report; exit {proc.returncode}; stderr:\n{proc.stderr[-3000:]}"
    parsed: dict[str, Any] = json.loads(proc.stdout)
    parsed["_returncode"] = proc.returncode
    parsed["_stderr"] = proc.stderr
    parsed["_workdir"] = str(workdir)
    return parsed


def test_the_run_succeeds(report: dict[str, Any]) -> None:
    assert report["_returncode"] == 0, report["_stderr"][-3000:]
    assert report["errors"] == []
    assert list(report["disks"]) == ["fixed"]
    assert set(report["disks"]["fixed"]) == set(CASES)
    assert "bench_vhd_frontends.py --size-mib 8" in "\n".join(report["header"])


def test_what_must_run_here_ran(report: dict[str, Any]) -> None:
    assert "vhdshare-nbd" not in report["left_out"]  # the cluster and attach --nbd work
    for name, program in (("qemu-nbd", "qemu-nbd"), ("tgtd", "tgtd")):
        if shutil.which(program):
            assert name not in report["left_out"], report["left_out"][name]


@pytest.mark.parametrize("front", FRONTENDS)
def test_every_front_end_has_figures_or_a_reason(report: dict[str, Any], front: str) -> None:
    if front in report["left_out"]:
        reason = report["left_out"][front]
        assert reason.strip()
        assert f"# {front} column left out: {reason}" in [f"# {h}" for h in report["header"]]
        assert all(front not in figures for figures in report["disks"]["fixed"].values())
        return
    for case in CASES:
        fig = report["disks"]["fixed"][case][front]
        assert fig["ops"] > 0, case
        assert fig["mib_s"] > 0, case
        assert fig["iops"] > 0, case


def test_vhdshare_is_compared_with_qemu_nbd(report: dict[str, Any]) -> None:
    for case in CASES:
        assert report["ratios"]["fixed"][case]["vhdshare-nbd/qemu-nbd"] > 0, case


def test_nothing_is_left_behind(report: dict[str, Any]) -> None:
    workdir = report["_workdir"]
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if workdir in line]
    assert os.listdir(workdir) == [], "the scratch directory was not removed"
    # nodes, attachments and qemu-nbd name the work directory; our tgtd its control port
    assert not [pid for pid in pids() if workdir in cmdline(pid)]
    ports = re.findall(r"tgtd -f -C (\d+) ", report["_stderr"])
    assert ports or "tgtd" in report["left_out"]
    for port in ports:
        assert not [pid for pid in pids() if f"tgtd\0-f\0-C\0{port}\0" in cmdline(pid)]
        assert not Path(f"/var/run/tgtd/socket.{port}").exists()


def pids() -> list[str]:
    return [pid for pid in os.listdir("/proc") if pid.isdigit()]


def cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""  # gone meanwhile
