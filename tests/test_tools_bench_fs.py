"""Smoke test of tools/bench_fs.py: a --quick run on every target yields positive figures.

No timing assertions (DESIGN.md section 5): only that each workload phase ran on each target.
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
BENCH = REPO / "tools" / "bench_fs.py"
TARGETS = ("native", "passthrough", "clusterfs")
METRICS = ("create", "stat", "rename", "unlink", "mkdir", "rmdir", "seq_write",
           "seq_read_cold", "rand_read", "rand_write", "small_write", "small_read")

pytestmark = [
    pytest.mark.mount,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts, drop_caches)"),
]


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """One quick run over all targets, shared by the per-target tests."""
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--files", "60", "--size-mib", "8", "--only",
         ",".join(TARGETS), "--json"],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
    )
    assert proc.stdout, f"no report; exit {proc.returncode}; stderr:\n{proc.stderr[-3000:]}"
    parsed: dict[str, Any] = json.loads(proc.stdout)
    parsed["_stderr"] = proc.stderr
    return parsed


def test_report_header(report: dict[str, Any]) -> None:
    header = "\n".join(report["header"])
    assert "bench_fs.py --quick" in header
    assert "pinned: no" in header
    assert report["pinned"] is False
    assert report["random_io"] in ("fio", "python")


@pytest.mark.parametrize("target", TARGETS)
def test_figures_positive(report: dict[str, Any], target: str) -> None:
    figures = report["targets"][target]
    errors = report["errors"][target]
    bad = [m for m in METRICS if not (isinstance(figures.get(m), float) and figures[m] > 0)]
    assert not bad, f"{target}: no positive figure for {bad}; errors: {set(errors.values())}"
    assert not errors, f"{target}: errors {errors}"


def test_no_mount_left_behind(report: dict[str, Any]) -> None:
    with open("/proc/self/mountinfo") as f:
        leftover = [line for line in f if "bench_fs-" in line]
    assert not leftover, leftover
