"""`vhdshare attach` as the tests run it: a process of its own, stopped by PID with SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from clusterfs.credentials import credentials_path
from lb.hashing import AffinityMode, affinity_key, key_bucket
from lb.table import DEFAULT_TABLE_SIZE, table_for
from tests.cluster.conftest import Cluster, addresses_of
from tests.cluster.test_vhd_pr_cli import vhdshare, vhdshare_command

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


def new_disk(cluster: Cluster, croot: str, name: str, size: str = "64M",
             kind: str = "dynamic") -> str:
    """A fresh VHD made through node 0's mount; its cluster path."""
    made = vhdshare("create", str(cluster.mnt(0) / croot / name), "--size", size,
                    "--type", kind)
    assert made.returncode == 0, made.stderr
    return f"/{croot}/{name}"


def attach_args(cluster: Cluster, *disks: str) -> list[str]:
    args = ["attach", "--cluster", ",".join(addresses_of(cluster)),
            "--credentials", str(credentials_path(cluster.blockdir))]
    for disk in disks:
        args += ["--disk", disk]
    return args


def owner(session_id: str, cluster: Cluster) -> str:
    """The node lb's Maglev table gives a session id (the cluster's whole membership)."""
    members = tuple(sorted(node.name for node in cluster.nodes))
    key = affinity_key(AffinityMode.CLIENT_ID, session_id, "")
    return table_for(members, DEFAULT_TABLE_SIZE).owners()[key_bucket(key, DEFAULT_TABLE_SIZE)]


def initiator_served_by(cluster: Cluster, node: str, disk: str, prefix: str) -> str:
    """An initiator name whose session with `disk` lb routes to `node`."""
    for n in range(500):
        name = f"{prefix}{n}"
        if owner(f"vhdshare:{name}:{disk}", cluster) == node:
            return name
    raise AssertionError(f"no initiator name of 500 is served by {node}")


class Attachment:
    """A running `vhdshare attach -f`; its stderr goes to `log_path`."""

    def __init__(self, args: list[str], log_path: Path, ready_path: Path | None) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen([*vhdshare_command(), *args, "-f"],
                                            stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(ready_path)

    def _wait_ready(self, ready_path: Path | None) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"attach exited {self.process.returncode}: {self.log()}")
            if "serving" in self.log() and (ready_path is None or ready_path.exists()):
                return
            time.sleep(0.05)
        raise AssertionError(f"attach did not start in {START_TIMEOUT_S} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM by PID; kill -9 if it does not end in time (and fail)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"attach ignored SIGTERM: {self.log()}") from None


@contextlib.contextmanager
def attached(args: list[str], tmp_path: Path, ready_path: Path | None = None,
             name: str = "attach") -> Iterator[Attachment]:
    """A running attachment, stopped by PID at the end however the test ends; a clean stop
    (exit status 0 on SIGTERM) is part of the test."""
    attachment = Attachment(args, tmp_path / f"{name}.log", ready_path)
    try:
        yield attachment
    finally:
        status = attachment.stop()
    assert status == 0, f"attach exited {status} on SIGTERM: {attachment.log()}"


def wait_gone(path: Path, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not os.path.exists(path)
