"""Smoke test of tools/bench_transport.py: a tiny run prints a round-trip figure for each
message size with and without CURVE. No timing assertions (DESIGN.md section 5)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_tiny_run_measures_both_variants_for_each_size() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_transport.py"), "--count", "20",
         "--sizes", "10,3000"],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert [(r[0], " ".join(r[2:-2])) for r in rows] == [
        ("10", "without CURVE"), ("10", "with CURVE"),
        ("3000", "without CURVE"), ("3000", "with CURVE")]
    assert all(float(r[-2]) > 0 and float(r[-1]) >= float(r[-2]) for r in rows)
