"""`clusterfs demo --no-wait`: the README's main job, end to end."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.util import clusterfs_command, is_mounted


@pytest.mark.mount
def test_demo_tours_and_stops(fresh_base: Path) -> None:
    proc = subprocess.run([*clusterfs_command(), "demo", str(fresh_base), "--no-wait"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hello from clusterfs" in proc.stdout
    assert "stopped" in proc.stdout
    assert not is_mounted(fresh_base / "mnt")
