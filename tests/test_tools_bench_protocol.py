"""Smoke test of tools/bench_protocol.py: a --quick run on a 3-node cluster yields a positive
figure for every session-open and I/O metric, and leaves no mount or work directory behind.

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
BENCH = REPO / "tools" / "bench_protocol.py"
IO_METRICS = ("seq_write", "seq_read", "rand_read_cold", "rand_read_warm", "rand_write")

pytestmark = [
    pytest.mark.mount,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One --quick run, shared by the tests below."""
    workdir = tmp_path_factory.mktemp("bench_protocol")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    assert proc.stdout, f"no report; exit {proc.returncode}; stderr:\n{proc.stderr[-3000:]}"
    parsed: dict[str, Any] = json.loads(proc.stdout)
    parsed["_returncode"] = proc.returncode
    parsed["_stderr"] = proc.stderr
    parsed["_workdir"] = str(workdir)
    return parsed


def test_the_run_succeeds(report: dict[str, Any]) -> None:
    assert report["_returncode"] == 0, report["_stderr"][-3000:]
    assert report["errors"] == []
    assert "bench_protocol.py --quick --json" in "\n".join(report["header"])


@pytest.mark.parametrize("phase", ["steady", "during_join"])
def test_session_opens_have_positive_latencies(report: dict[str, Any], phase: str) -> None:
    opens = report["session_open"][phase]
    assert opens["opens"] > 0
    assert opens["p50_ms"] > 0
    assert opens["p99_ms"] >= opens["p50_ms"]
    assert opens["failures"] == 0, opens["failure_messages"]


def test_the_join_was_measured(report: dict[str, Any]) -> None:
    assert report["session_open"]["during_join"]["join_mount_s"] > 0


@pytest.mark.parametrize("metric", IO_METRICS)
def test_io_has_both_sides_and_a_ratio(report: dict[str, Any], metric: str) -> None:
    figure = report["io"][metric]
    assert figure["protocol"] > 0
    assert figure["mount"] > 0
    assert figure["ratio"] > 0
    assert report["io_node"] in {"n1", "n2", "n3"}
    # As root the benchmark reaches its node over the local link, and must say so.
    assert report["io_link"] == ("the local link (a unix socket)" if os.geteuid() == 0
                                 else "loopback TCP with CURVE")


def test_nothing_is_left_behind(report: dict[str, Any]) -> None:
    workdir = report["_workdir"]
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if workdir in line]
    assert os.listdir(workdir) == [], "the scratch directory was not removed"
