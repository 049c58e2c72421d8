"""Smoke test of tools/bench_threads.py: a short run on a 1-node cluster prints a CPU figure
for the node's kinds of threads. No timing assertions (DESIGN.md section 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)"),
]


def run_tool(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The tool with its temporary files in `tmp_path`, which it must leave empty."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_threads.py"), *args],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
        env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == [], "the work directory was left behind"
    return proc


def test_a_short_run_reports_the_threads_of_each_node(tmp_path: Path) -> None:
    proc = run_tool(["--nodes", "1", "--clients", "2", "--seconds", "1"], tmp_path)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("1 node(s), 2 client(s): about ")
    rows = [line.split() for line in lines[2:]]
    kinds = {" ".join(row[1:-3]) for row in rows if row[0] == "n1"}
    assert {"main + invalid.", "trio workers"} <= kinds, proc.stdout
    main = next(row for row in rows if row[1] == "main")
    assert float(main[-2].replace(",", "")) > 0, "the node's loop served creates with no CPU"


def test_the_passthrough_reference_reports_its_daemon(tmp_path: Path) -> None:
    proc = run_tool(["--passthrough", "--clients", "2", "--seconds", "1"], tmp_path)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("passthrough, 2 client(s): about "), proc.stdout
    rows = [line.split() for line in lines[2:]]
    main = next(row for row in rows if row[0] == "pt" and row[1] != "trio")
    assert float(main[-2].replace(",", "")) > 0, "the passthrough served creates with no CPU"
