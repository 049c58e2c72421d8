"""`vhdshare pr` against the shared cluster: sg_persist's lines, exit statuses and errors."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clusterfs.credentials import credentials_path
from tests.cluster.conftest import Cluster, addresses_of

pytestmark = pytest.mark.mount

_disk_counter = itertools.count()


def vhdshare_command() -> list[str]:
    """The console script next to the running interpreter, else `python -m vhdshare.cli`."""
    script = Path(sys.executable).parent / "vhdshare"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from vhdshare.cli import main; sys.exit(main())"]


def vhdshare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*vhdshare_command(), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def new_disk(cluster: Cluster) -> str:
    """A fresh 16 MiB dynamic disk made through node 0's mount; its cluster path."""
    name = f"pr-{os.getpid()}-{next(_disk_counter)}.vhd"
    made = vhdshare("create", str(cluster.mnt(0) / name), "--size", "16M", "--type", "dynamic")
    assert made.returncode == 0, made.stderr
    return f"/{name}"


def pr(cluster: Cluster, disk: str, initiator: str, *action: str
       ) -> subprocess.CompletedProcess[str]:
    return vhdshare("pr", "--cluster", ",".join(addresses_of(cluster)),
                    "--credentials", str(credentials_path(cluster.blockdir)),
                    "--disk", disk, "--initiator", initiator, *action)


def ok(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert (proc.returncode, proc.stderr) == (0, ""), proc
    return proc.stdout.splitlines()


def test_register_reserve_preempt_release_clear(shared_cluster: Cluster) -> None:
    disk = new_disk(shared_cluster)
    try:
        run_the_tour(shared_cluster, disk)
    finally:
        (shared_cluster.mnt(0) / disk.lstrip("/")).unlink()


def run_the_tour(cluster: Cluster, disk: str) -> None:
    assert ok(pr(cluster, disk, "host-a", "read-keys")) == [
        "  PR generation=0x0, there are NO registered reservation keys"]
    assert ok(pr(cluster, disk, "host-a", "register", "--key", "0xA1")) == []
    assert ok(pr(cluster, disk, "host-a", "reserve", "--key", "0xa1", "--type", "we-ro")) == []
    assert ok(pr(cluster, disk, "host-a", "read-keys")) == [
        "  PR generation=0x1, 1 registered reservation key follows:", "    0xa1"]
    assert ok(pr(cluster, disk, "host-b", "read-reservation")) == [
        "  PR generation=0x1, Reservation follows:", "    Key=0xa1",
        "    scope: LU_SCOPE,  type: Write Exclusive, registrants only"]

    conflict = pr(cluster, disk, "host-b", "reserve", "--key", "0xB2", "--type", "we-ro")
    assert (conflict.returncode, conflict.stdout) == (24, ""), conflict
    assert conflict.stderr == "vhdshare: error: RESERVE: RESERVATION CONFLICT\n", conflict

    assert ok(pr(cluster, disk, "host-b", "register", "--key", "b2")) == []  # hex, as sg_persist
    assert ok(pr(cluster, disk, "host-a", "read-keys")) == [
        "  PR generation=0x2, 2 registered reservation keys follow:", "    0xa1", "    0xb2"]
    assert ok(pr(cluster, disk, "host-a", "preempt", "--key", "0xA1", "--preempt-key", "0xB2",
                 "--type", "we-ro")) == []
    assert ok(pr(cluster, disk, "host-b", "read-keys")) == [
        "  PR generation=0x3, 1 registered reservation key follows:", "    0xa1"]

    assert ok(pr(cluster, disk, "host-a", "release", "--key", "0xA1", "--type", "5")) == []
    assert ok(pr(cluster, disk, "host-a", "read-reservation")) == [
        "  PR generation=0x3, there is NO reservation held"]
    assert ok(pr(cluster, disk, "host-a", "clear", "--key", "0xA1")) == []
    assert ok(pr(cluster, disk, "host-a", "read-keys")) == [
        "  PR generation=0x4, there are NO registered reservation keys"]


def test_mistakes_are_one_line(shared_cluster: Cluster) -> None:
    missing = pr(shared_cluster, f"/no-such-disk-{os.getpid()}.vhd", "host-a", "read-keys")
    assert (missing.returncode, missing.stdout) == (1, ""), missing
    assert missing.stderr == \
        f"vhdshare: error: /no-such-disk-{os.getpid()}.vhd: No such file or directory\n", missing

    bad_type = pr(shared_cluster, "/any.vhd", "host-a", "reserve", "--key", "1", "--type", "4")
    assert bad_type.returncode == 2, bad_type
    assert bad_type.stderr.startswith("vhdshare pr reserve: error: argument --type: invalid "
                                      "reservation type '4'"), bad_type.stderr
    bad_key = pr(shared_cluster, "/any.vhd", "host-a", "register", "--key", "0xno")
    assert bad_key.returncode == 2 and len(bad_key.stderr.splitlines()) == 1, bad_key

    bad_address = vhdshare("pr", "--cluster", "not-an-address", "--credentials",
                           str(credentials_path(shared_cluster.blockdir)), "--disk", "/d.vhd",
                           "--initiator", "host-a", "read-keys")
    assert (bad_address.returncode, bad_address.stderr) == (
        1, "vhdshare: error: 'not-an-address' is not HOST:PORT\n"), bad_address
