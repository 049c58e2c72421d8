"""`clusterfs client` against the shared cluster: every action, and one-line errors."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from clusterfs.credentials import create_credentials, credentials_path
from tests.cluster.conftest import Cluster
from tests.util import clusterfs_command, run_cli

pytestmark = pytest.mark.mount


def client(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("client", "--cluster", ",".join(n.address for n in cluster.nodes),
                   "--credentials", str(credentials_path(cluster.blockdir)), *args)


def test_every_action(shared_cluster: Cluster, croot: str, tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.write_bytes(os.urandom(3 << 20))
    top = f"/{croot}"
    assert client(shared_cluster, "mkdir", f"{top}/d", f"{top}/e").returncode == 0
    assert client(shared_cluster, "put", str(local), f"{top}/d/file").returncode == 0
    assert (shared_cluster.mnt(1) / croot / "d/file").read_bytes() == local.read_bytes()
    listing = client(shared_cluster, "ls", top)
    assert listing.stdout.split() == ["d/", "e/"], listing
    stat = client(shared_cluster, "stat", f"{top}/d/file")
    assert f"size {3 << 20}" in stat.stdout and stat.stdout.startswith(f"{top}/d/file: -rw")
    assert client(shared_cluster, "mv", f"{top}/d/file", f"{top}/e/moved").returncode == 0
    cat = run_cli_bytes(shared_cluster, "cat", f"{top}/e/moved")
    assert cat == local.read_bytes()
    copy = tmp_path / "copy"
    assert client(shared_cluster, "get", f"{top}/e/moved", str(copy)).returncode == 0
    assert copy.read_bytes() == local.read_bytes()
    assert client(shared_cluster, "rm", f"{top}/e/moved", f"{top}/d", f"{top}/e"
                  ).returncode == 0
    assert os.listdir(shared_cluster.mnt(2) / croot) == []


def run_cli_bytes(cluster: Cluster, *args: str) -> bytes:
    return subprocess.run(
        [*clusterfs_command(), "client", "--cluster", cluster.nodes[0].address,
         "--credentials", str(credentials_path(cluster.blockdir)), *args],
        capture_output=True, timeout=60, check=True).stdout


def test_errors_are_one_line(shared_cluster: Cluster, croot: str, tmp_path: Path) -> None:
    missing = client(shared_cluster, "cat", f"/{croot}/missing")
    assert missing.returncode == 1
    assert missing.stderr.strip() == \
        f"clusterfs: /{croot}/missing: No such file or directory", missing.stderr
    busy = client(shared_cluster, "rm", f"/{croot}/..")
    assert busy.returncode == 1 and len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    bad_address = run_cli("client", "--cluster", "not-an-address", "--credentials",
                          str(credentials_path(shared_cluster.blockdir)), "ls", "/")
    assert (bad_address.returncode, bad_address.stderr) == (
        1, "clusterfs: 'not-an-address' is not HOST:PORT\n"), bad_address.stderr
    create_credentials(tmp_path)  # another cluster's key pair
    refused = run_cli("client", "--cluster", shared_cluster.nodes[0].address,
                      "--credentials", str(credentials_path(tmp_path)), "ls", "/",
                      timeout_s=60)
    assert refused.returncode == 1
    assert refused.stderr.startswith("clusterfs: the cluster refused this client"), refused
    assert len(refused.stderr.strip().splitlines()) == 1
