"""`vhdshare attach --nbd` with real NBD clients: qemu-io, qemu-img, nbdinfo and nbdcopy
against a shared disk of a real 3-node cluster, through the tunnel."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket as sock
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster.attach_util import (
    attach_args,
    attached,
    initiator_served_by,
    new_disk,
    wait_gone,
)
from tests.cluster.conftest import Cluster
from tests.cluster.test_vhd_pr_cli import pr, vhdshare

pytestmark = [pytest.mark.mount, pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("qemu-io", "qemu-img", "nbdinfo", "nbdcopy")),
    reason="needs qemu-utils and libnbd-bin")]

MIB = 1 << 20
KILL_AFTER_MS = 500  # the failover test kills the serving node this long into the writes


def run(*argv: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if ok:
        assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done


def nbd_uri(socket: Path, export: str = "") -> str:
    return f"nbd+unix:///{export.lstrip('/')}?socket={socket}"


def qemu_io(uri: str, *commands: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    done = run(*argv, uri, ok=ok)
    if ok:
        assert "fail" not in done.stdout.lower() and "error" not in done.stdout.lower(), done
    return done


def test_qemu_io_nbdinfo_map_and_nbdcopy(shared_cluster: Cluster, croot: str,
                                         tmp_path: Path) -> None:
    disk = new_disk(shared_cluster, croot, "nbd.vhd", "64M")
    socket = tmp_path / "nbd.sock"
    args = [*attach_args(shared_cluster, disk), "--initiator", "vmhost-1",
            "--nbd", f"unix:{socket}"]
    with attached(args, tmp_path, socket):
        uri = nbd_uri(socket)
        qemu_io(uri, "write -P 0xab 0 1M", "write -P 0xcd 10M 64k", "write -P 0x5a 40M 3M",
                "aio_flush")
        qemu_io(uri, "read -P 0xab 0 1M", "read -P 0xcd 10M 64k", "read -P 0x5a 40M 3M",
                "read -P 0 1M 1M", "read -P 0 20M 4M")
        info = run("nbdinfo", "--size", uri).stdout
        assert int(info) == 64 * MIB
        # The allocation map: the dynamic disk's 2 MiB blocks that were written are data.
        lines = run("nbdinfo", "--map", uri).stdout.split("\n")
        data = [tuple(map(int, line.split()[:2])) for line in lines if line.endswith("data")]
        assert data == [(0, 2 * MIB), (10 * MIB, 2 * MIB), (40 * MIB, 4 * MIB)], lines
        holes = [line for line in lines if "hole,zero" in line]
        assert len(holes) == 3, lines
        copy = tmp_path / "copy.raw"
        run("nbdcopy", uri, str(copy))
        converted = tmp_path / "converted.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(converted))
        expected = bytearray(64 * MIB)
        expected[0:MIB] = b"\xab" * MIB
        expected[10 * MIB : 10 * MIB + 65536] = b"\xcd" * 65536
        expected[40 * MIB : 43 * MIB] = b"\x5a" * (3 * MIB)
        assert copy.read_bytes() == expected and converted.read_bytes() == expected
        # qemu's own VHD driver reads the same through the mount of another node
        run("qemu-img", "compare", "-f", "vpc", "-F", "raw",
            str(shared_cluster.mnt(2) / croot / "nbd.vhd"), str(copy))
        # write zeroes and trim (qemu-io "write -z" with and without -u)
        qemu_io(uri, "write -z 0 512k", "write -z -u 40M 2M", "discard 10M 64k")
        qemu_io(uri, "read -P 0 0 512k", "read -P 0xab 512k 512k", "read -P 0 40M 2M",
                "read -P 0x5a 42M 1M", "read -P 0 10M 64k")
    assert wait_gone(socket), "the NBD socket was not removed"
    checked = vhdshare("check", str(shared_cluster.mnt(1) / croot / "nbd.vhd"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_several_disks_by_export_name_and_garbage_from_a_client(shared_cluster: Cluster, croot: str,
                                      tmp_path: Path) -> None:
    first = new_disk(shared_cluster, croot, "one.vhd", "8M", "fixed")
    second = new_disk(shared_cluster, croot, "two.vhd", "16M")
    socket = tmp_path / "nbd.sock"
    args = [*attach_args(shared_cluster, first, second), "--initiator", "vmhost-2",
            "--nbd", f"unix:{socket}"]
    with attached(args, tmp_path, socket) as attachment:
        assert int(run("nbdinfo", "--size", nbd_uri(socket, first)).stdout) == 8 * MIB
        assert int(run("nbdinfo", "--size", nbd_uri(socket, second)).stdout) == 16 * MIB
        assert int(run("nbdinfo", "--size", nbd_uri(socket)).stdout) == 8 * MIB
        qemu_io(nbd_uri(socket, first), "write -P 1 0 64k")
        qemu_io(nbd_uri(socket, second), "write -P 2 0 64k")
        qemu_io(nbd_uri(socket, first), "read -P 1 0 64k")
        qemu_io(nbd_uri(socket, second), "read -P 2 0 64k")
        listing = run("nbdinfo", "--list", f"nbd+unix://?socket={socket}").stdout
        assert f"export=\"{first.lstrip('/')}\"" in listing, listing
        for garbage in (b"\x00" * 64, b"NBDMAGIC" * 40, bytes(range(256)) * 8):
            with sock.socket(sock.AF_UNIX, sock.SOCK_STREAM) as peer:
                peer.connect(str(socket))
                peer.recv(18)  # the greeting
                peer.sendall(garbage)
                peer.settimeout(10)
                with contextlib.suppress(ConnectionResetError):
                    while peer.recv(4096):  # answered or hung up on, never left hanging
                        pass
        qemu_io(nbd_uri(socket, first), "read -P 1 0 64k")  # and it serves on
        assert "NBD client dropped" in attachment.log(), attachment.log()


def test_reservation_held_elsewhere_refuses_nbd_writes(shared_cluster: Cluster, croot: str,
                                                       tmp_path: Path) -> None:
    disk = new_disk(shared_cluster, croot, "fenced.vhd", "8M")
    assert pr(shared_cluster, disk, "host-a", "register", "--key", "a1").returncode == 0
    assert pr(shared_cluster, disk, "host-a", "reserve", "--key", "a1", "--type", "we-ro"
              ).returncode == 0
    socket = tmp_path / "nbd.sock"
    args = [*attach_args(shared_cluster, disk), "--initiator", "host-b",
            "--nbd", f"unix:{socket}"]
    with attached(args, tmp_path, socket):
        refused = qemu_io(nbd_uri(socket), "write -P 7 0 4k", ok=False)
        assert "Input/output error" in refused.stdout + refused.stderr, refused
        qemu_io(nbd_uri(socket), "read -P 0 0 4k")  # reads are allowed under WE-RO
        assert pr(shared_cluster, disk, "host-b", "register", "--key", "b2").returncode == 0
        qemu_io(nbd_uri(socket), "write -P 7 0 4k", "read -P 7 0 4k")


def test_unreachable_cluster_and_wrong_disk_are_one_line(shared_cluster: Cluster, croot: str,
                                                         tmp_path: Path) -> None:
    socket = tmp_path / "nbd.sock"
    unreachable = vhdshare(*attach_args(shared_cluster, "/x.vhd")[:1], "--cluster",
                           "127.0.0.1:9", *attach_args(shared_cluster, "/x.vhd")[3:],
                           "--initiator", "h", "--nbd", f"unix:{socket}", "--timeout", "2")
    assert unreachable.returncode == 1, unreachable
    assert unreachable.stderr.startswith("vhdshare: error: ") \
        and unreachable.stderr.count("\n") == 1, unreachable.stderr
    missing = vhdshare(*attach_args(shared_cluster, f"/{croot}/none.vhd"), "--initiator", "h",
                       "--nbd", f"unix:{socket}", "--timeout", "10")
    assert (missing.returncode, missing.stderr) == (
        1, f"vhdshare: error: /{croot}/none.vhd: No such file or directory\n"), missing
    not_a_disk = shared_cluster.mnt(0) / croot / "notes.txt"
    not_a_disk.write_text("hello")
    wrong = vhdshare(*attach_args(shared_cluster, f"/{croot}/notes.txt"), "--initiator", "h",
                     "--nbd", f"unix:{socket}", "--timeout", "10")
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1, wrong
    assert "not usable as a disk" in wrong.stderr, wrong.stderr
    assert not socket.exists()


def test_writes_go_on_when_the_serving_node_is_killed(new_cluster: Callable[..., Cluster],
                                                      tmp_path: Path) -> None:
    """kill -9 of the node that serves the attachment while qemu-io writes: the attachment
    re-routes (previous issue) and every write lands; qemu's VHD driver reads them back
    through a survivor's mount."""
    cluster = new_cluster(3)
    (cluster.mnt(0) / "vms").mkdir()
    disk = new_disk(cluster, "vms", "failover.vhd", "32M")
    victim = 1
    initiator = initiator_served_by(cluster, cluster.nodes[victim].name, disk, "vmhost-")
    socket = tmp_path / "nbd.sock"
    args = [*attach_args(cluster, disk), "--initiator", initiator, "--nbd", f"unix:{socket}"]
    writes = [f"write -P {n % 200 + 1} {n * 256}k 256k" for n in range(96)]
    # The kill lands while the first half is written or in the pause after it, however
    # fast the writes go: the second half always meets a killed node.
    script = [*writes[:48], f"sleep {KILL_AFTER_MS * 2}", *writes[48:]]
    with attached(args, tmp_path, socket) as attachment:
        commands = [word for command in script for word in ("-c", command)]
        writer = subprocess.Popen(["qemu-io", "-f", "raw", *commands, nbd_uri(socket)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(KILL_AFTER_MS / 1000)
            cluster.kill9(victim)
            output, _ = writer.communicate(timeout=120)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        assert writer.returncode == 0 and "error" not in output.lower(), output
        rerouted = f"node {cluster.nodes[victim].name} is gone: routing the session again"
        assert rerouted in attachment.log(), attachment.log()
        # Nodes and attachment on one host, as root: the session uses the local link.
        assert re.search(r"session \S+ on node n[13] \(local link\)", attachment.log())
        qemu_io(nbd_uri(socket), *(w.replace("write", "read") for w in writes))
    survivor = cluster.mnt(2) / "vms" / "failover.vhd"
    copy = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", str(survivor), str(copy))
    data = copy.read_bytes()
    for n in range(96):
        assert data[n * 256 * 1024 : (n + 1) * 256 * 1024] == bytes([n % 200 + 1]) * 262144, n


def test_without_f_it_runs_in_the_background(shared_cluster: Cluster, croot: str,
                                             tmp_path: Path) -> None:
    disk = new_disk(shared_cluster, croot, "bg.vhd", "8M")
    socket = tmp_path / "nbd.sock"
    started = vhdshare(*attach_args(shared_cluster, disk), "--initiator", "bg",
                       "--nbd", f"unix:{socket}")
    assert started.returncode == 0, started
    match = re.fullmatch(r"vhdshare: attach running as pid (\d+)\n", started.stdout)
    assert match, started.stdout
    pid = int(match.group(1))
    try:
        assert socket.exists()
        qemu_io(nbd_uri(socket), "write -P 9 0 64k", "read -P 9 0 64k")
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_gone(socket, 20.0), "the background attach did not stop on SIGTERM"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
