"""`clusterfs status` on a running 3-node cluster: every member, one leader, equal digests
when quiet, the table and the JSON form, through a mount point or --connect, and a one-line
error for a bad argument."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from clusterfs.credentials import credentials_path
from clusterfs.txn.transport import REFUSAL_LOG_INTERVAL_S
from tests.cluster.conftest import Cluster
from tests.util import run_cli

pytestmark = pytest.mark.mount


def _check_nodes(cluster: Cluster, status: dict[str, object]) -> None:
    nodes = status["nodes"]
    assert isinstance(nodes, list)
    names = {node.name for node in cluster.nodes}
    by_name = {n["name"]: n for n in nodes}
    assert set(by_name) == names, f"status lists {sorted(by_name)}, expected {sorted(names)}"
    for node in cluster.nodes:
        reported = by_name[node.name]
        assert reported["state"] == "online", reported
        assert reported["address"] == node.address
        assert reported["pid"] == node.pid
        assert os.path.realpath(reported["mountpoint"]) == os.path.realpath(node.mountpoint)
        assert sorted(reported["members"]) == sorted(names), reported
        assert reported["addresses"] == {n.name: n.address for n in cluster.nodes}
    leaders = {n["leader"] for n in nodes}
    assert len(leaders) == 1, f"nodes disagree about the leader: {leaders}"
    assert leaders <= names
    epochs = {n["epoch"] for n in nodes}
    assert len(epochs) == 1 and epochs.pop() > 0
    assert len({(n["applied_seq"], n["digest"]) for n in nodes}) == 1
    assert status["digests_equal"] is True


def test_status_json_lists_every_member_one_leader_equal_digests(
    shared_cluster: Cluster, croot: str
) -> None:
    # Some traffic first, so the figures are not those of an empty replica.
    for i in range(3):
        (shared_cluster.mnt(i) / croot / f"from-n{i + 1}").write_text("x")
        (shared_cluster.mnt(i) / croot / f"dir-n{i + 1}").mkdir()
    quiet = shared_cluster.wait_quiet_digests()
    assert all(n["applied_seq"] > 0 for n in quiet["nodes"])
    for i in range(3):
        _check_nodes(shared_cluster, shared_cluster.status(i))


def test_status_table(shared_cluster: Cluster) -> None:
    shared_cluster.wait_quiet_digests()
    proc = run_cli("status", str(shared_cluster.mnt(1)))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    status = shared_cluster.status(1)
    leader = status["nodes"][0]["leader"]
    assert f"leader {leader}" in lines[0]
    for node in shared_cluster.nodes:
        rows = [line for line in lines if line.split()[:1] == [node.name]]
        assert len(rows) == 1, proc.stdout
        assert node.address in rows[0] and "online" in rows[0]
    assert "equal" in lines[-1] and "DIFFER" not in proc.stdout


def test_status_connect(shared_cluster: Cluster) -> None:
    shared_cluster.wait_quiet_digests()
    credentials = str(credentials_path(shared_cluster.blockdir))
    for node in shared_cluster.nodes:
        proc = run_cli("status", "--connect", node.address, "--json",
                       "--credentials", credentials)
        assert proc.returncode == 0, proc.stderr
        _check_nodes(shared_cluster, json.loads(proc.stdout))
    proc = run_cli("status", "--connect", shared_cluster.nodes[2].address,
                   "--credentials", credentials)
    assert proc.returncode == 0, proc.stderr
    assert all(node.name in proc.stdout for node in shared_cluster.nodes)


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("clusterfs: ") and "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("kind", ["plain-dir", "missing", "bad-connect", "nothing",
                                  "connect-without-credentials", "missing-credentials",
                                  "not-credentials"])
def test_status_bad_argument_is_one_line_error(kind: str, tmp_path: Path) -> None:
    (tmp_path / "junk").write_text("public = x\n")
    args = {
        "plain-dir": [str(tmp_path)],
        "missing": [str(tmp_path / "no-such-dir")],
        "bad-connect": ["--connect", "not-an-address"],
        "nothing": [],
        "connect-without-credentials": ["--connect", "127.0.0.1:1"],
        "missing-credentials": ["--connect", "127.0.0.1:1", "--credentials",
                                str(tmp_path / "none")],
        "not-credentials": ["--connect", "127.0.0.1:1", "--credentials", str(tmp_path / "junk")],
    }[kind]
    _one_line_error(run_cli("status", *args, "--json"))


def test_status_with_another_clusters_credentials_is_refused(
        shared_cluster: Cluster, tmp_path: Path) -> None:
    other = tmp_path / "other-blocks"
    run_cli("format", str(other), check=True)
    node = shared_cluster.nodes[0]
    mark = node.log_mark()
    deadline = time.monotonic() + REFUSAL_LOG_INTERVAL_S + 20
    while True:  # the node logs refusals at most once per interval: ask until it does
        line = _one_line_error(run_cli("status", "--connect", node.address, "--credentials",
                                       str(credentials_path(other))))
        assert "secure handshake failed" in line
        if "refused a connection" in node.log_text(mark):
            break
        assert time.monotonic() < deadline, node.log_tail()
        time.sleep(1)
