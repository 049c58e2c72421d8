"""Smoke test of tools/bench_cluster.py: a tiny run on a 1-node and a 3-node cluster yields
positive figures for every operation, and leaves no mount or work directory behind.

No timing assertions (DESIGN.md section 5): only that each phase ran on each cluster.
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
BENCH = REPO / "tools" / "bench_cluster.py"
OPS = ("create", "mkdir", "rename", "unlink")
CLUSTERS = ("1-node", "3-node")
CLIENTS = ("1", "2")

pytestmark = [
    pytest.mark.mount,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny run, shared by the tests below."""
    workdir = tmp_path_factory.mktemp("bench_cluster")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--ops", "20", "--clients", ",".join(CLIENTS), "--json",
         "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )
    assert proc.stdout, f"no report; exit {proc.returncode}; stderr:\n{proc.stderr[-3000:]}"
    parsed: dict[str, Any] = json.loads(proc.stdout)
    parsed["_returncode"] = proc.returncode
    parsed["_stderr"] = proc.stderr
    parsed["_workdir"] = str(workdir)
    return parsed


def test_report_header(report: dict[str, Any]) -> None:
    header = "\n".join(report["header"])
    assert "bench_cluster.py --ops 20" in header
    assert "pinned: no" in header
    assert report["pinned"] is False
    assert report["ops_per_client"] == 20
    assert report["clients"] == [1, 2]
    assert report["cluster_nodes"] == 3
    assert set(report["leaders"]) == set(CLUSTERS)


def test_no_errors(report: dict[str, Any]) -> None:
    assert not report["errors"], report["errors"]
    assert report["_returncode"] == 0, report["_stderr"][-3000:]


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_latency_positive(report: dict[str, Any], cluster: str) -> None:
    roles = ("leader",) if cluster == "1-node" else ("leader", "non_leader")
    latency = report["latency_ms"][cluster]
    assert set(latency) == set(roles)
    for role in roles:
        for op in OPS:
            fig = latency[role][op]
            assert fig["samples"] == 20, (role, op, fig)
            assert 0 < fig["p50"] <= fig["p99"], (role, op, fig)


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_throughput_positive(report: dict[str, Any], cluster: str) -> None:
    throughput = report["throughput_ops_s"][cluster]
    assert set(throughput) == set(CLIENTS)
    bad = [(c, op) for c in CLIENTS for op in OPS
           if not (isinstance(throughput[c][op], float) and throughput[c][op] > 0)]
    assert not bad, f"{cluster}: no positive throughput for {bad}"


def test_ratios_and_targets(report: dict[str, Any]) -> None:
    for count in CLIENTS:
        assert all(r > 0 for r in report["ratios"]["throughput"][count].values())
    assert all(r > 0 for r in report["ratios"]["latency_p50"]["non_leader"].values())
    latency_targets = [t for t in report["targets"] if "latency" in t["target"]]
    assert latency_targets and all(isinstance(t["met"], bool) for t in latency_targets)


def test_every_run_on_the_planned_nodes(report: dict[str, Any]) -> None:
    runs = {(r["cluster"], tuple(r["client_nodes"])) for r in report["runs"]}
    assert runs == {("1-node", ("n1",)), ("1-node", ("n1", "n1")), ("3-node", ("n1",)),
                    ("3-node", ("n2",)), ("3-node", ("n1", "n2"))}


def test_nothing_left_behind(report: dict[str, Any]) -> None:
    with open("/proc/self/mountinfo") as f:
        leftover = [line for line in f if "bench_cluster-" in line]
    assert not leftover, leftover
    assert not list(Path(report["_workdir"]).iterdir()), "work directory not removed"


def test_membership_figures(tmp_path: Path) -> None:
    """`--membership` on a tiny namespace: every figure is there and plausible, and the
    cluster it made (four nodes by the end) is gone afterwards."""
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--membership", "--entries", "500", "--json",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout)
    for key in ("follower_killed", "leader_killed"):
        fig = figures[key]
        assert 0 < fig["removed_s"] < 60 and 0 < fig["first_create_s"] < 60, fig
        assert fig["new_epoch"] > 3, fig  # three joins made epoch 3; the removal is later
    assert figures["entries"] == 500 and figures["fill_s"] > 0
    join = figures["join"]
    assert 0 < join["join_mount_s"] <= join["join_online_s"] < 60, join
    assert join["by_snapshot"] is False  # 500 entries: the log reaches back
    during = join["create_during_join_ms"]
    assert during["count"] > 0 and 0 < during["p50"] <= during["p99"] <= during["max"]
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if str(tmp_path) in line]
    assert not list(tmp_path.iterdir()), "work directory not removed"
