"""`vhdshare attach --iscsi` with real initiators from Debian packages (libiscsi's tools, qemu's
iscsi driver) against shared disks of a real 3-node cluster, through the tunnel: data, the
printed target name, and libiscsi's persistent-reservation suites with two initiators whose
commands are served by two different nodes."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.cluster.attach_util import (
    attach_args,
    attached,
    initiator_served_by,
    new_disk,
)
from tests.cluster.conftest import Cluster
from vhdshare.attach import target_name_for

pytestmark = [pytest.mark.mount, pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("qemu-io", "qemu-img", "iscsi-test-cu", "iscsi-ls")),
    reason="needs qemu-utils, qemu-block-extra and libiscsi-bin")]

MIB = 1 << 20
# The suites of libiscsi 1.19's SCSI family for persistent reservations, and their tests.
PR_SUITES = {"SCSI.Prin*": 4, "SCSI.Prout*": 16}


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_qemu_io_and_qemu_img_over_iscsi_with_two_disks(shared_cluster: Cluster, croot: str,
                                         tmp_path: Path) -> None:
    disk = new_disk(shared_cluster, croot, "iscsi.vhd", "32M")
    other = new_disk(shared_cluster, croot, "other.vhd", "8M", "fixed")
    port = free_port()
    with attached([*attach_args(shared_cluster, disk, other), "--iscsi", f"127.0.0.1:{port}"],
                  tmp_path) as attachment:
        name, other_name = target_name_for(disk), target_name_for(other)
        assert f"{disk}: iSCSI target {name}, LUN 0" in attachment.log()  # printed
        listing = run("iscsi-ls", f"iscsi://127.0.0.1:{port}").stdout
        assert f"Target:{name}" in listing and f"Target:{other_name}" in listing, listing
        other_url = f"iscsi://127.0.0.1:{port}/{other_name}/0"
        run("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 64k", other_url)
        run("qemu-io", "-f", "raw", "-c", "read -P 0x42 0 64k", other_url)
        for garbage in (b"\x00" * 48, b"\x03" + b"\xff" * 300, bytes(range(256)) * 8):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as peer:
                peer.sendall(garbage)
                with contextlib.suppress(ConnectionResetError):
                    while peer.recv(4096):  # answered or hung up on, never left hanging
                        pass
        assert "protocol error, connection closed" in attachment.log(), attachment.log()
        url = f"iscsi://127.0.0.1:{port}/{name}/0"
        run("qemu-io", "-f", "raw", "-c", "write -P 0xa5 0 1M", "-c", "write -P 0x5a 20M 3M",
            "-c", "write -P 0x11 31M 1M", url)
        done = run("qemu-io", "-f", "raw", "-c", "read -P 0xa5 0 1M", "-c", "read -P 0x5a 20M 3M",
                   "-c", "read -P 0x11 31M 1M", "-c", "read -P 0 1M 1M", url)
        assert "fail" not in done.stdout.lower(), done.stdout
        copy = tmp_path / "copy.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(copy))
    expected = bytearray(32 * MIB)
    expected[0:MIB] = b"\xa5" * MIB
    expected[20 * MIB : 23 * MIB] = b"\x5a" * (3 * MIB)
    expected[31 * MIB :] = b"\x11" * MIB
    assert copy.read_bytes() == expected
    run("qemu-img", "compare", "-f", "vpc", "-F", "raw",
        str(shared_cluster.mnt(1) / croot / "iscsi.vhd"), str(copy))


@pytest.mark.parametrize("suite", sorted(PR_SUITES))
def test_libiscsi_reservation_suites_with_initiators_on_two_nodes(
        shared_cluster: Cluster, croot: str, tmp_path: Path, suite: str) -> None:
    """iscsi-test-cu's PR suites: every reservation the first initiator makes, through the
    node serving its session, is enforced on the second, served by another node."""
    disk = new_disk(shared_cluster, croot, "pr.vhd", "16M")
    first = initiator_served_by(shared_cluster, "n1", disk, "iqn.2026-11.test:first-")
    second = initiator_served_by(shared_cluster, "n2", disk, "iqn.2026-11.test:second-")
    port = free_port()
    name = "iqn.2026-11.test:shared-pr"
    with attached([*attach_args(shared_cluster, disk), "--iscsi", f"127.0.0.1:{port}",
                   "--target-name", name], tmp_path) as attachment:
        done = subprocess.run(
            ["iscsi-test-cu", "--dataloss", "--test", suite, "--normal",
             "--initiator-name", first, "--initiator-name-2", second,
             f"iscsi://127.0.0.1:{port}/{name}/0"],
            capture_output=True, text=True, timeout=300, check=False)
        log = attachment.log()
    summary = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", done.stdout)
    assert summary, done.stdout + done.stderr
    total, ran, passed, failed = map(int, summary.groups())
    assert failed == 0 and passed == ran == total >= PR_SUITES[suite], done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{disk} attached for {first} through node n1" in log, log
    if suite.startswith("SCSI.Prout"):  # the PR IN suite uses the first initiator only
        assert f"{disk} attached for {second} through node n2" in log, log
