"""`clusterfs demo`: a 3-node cluster on loopback under one directory, with a short tour.

It formats a block directory, starts node n1 (which founds the cluster) and nodes n2 and n3
(which join it), each with its own mount point and state directory, then shows a file
written through n1 read through n3, a create race between two nodes settled with exactly
one winner, a rename seen everywhere, a shared disk's reservation held for one VM host and
refused to another (`vhdshare pr`, through the cluster's file protocol), and `clusterfs
status`. Ctrl-C (or SIGTERM) stops
and unmounts every node. Run again on the same directory, the nodes restart from their
state directories.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MOUNT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
NODES = ("n1", "n2", "n3")


def _clusterfs() -> list[str]:
    return [sys.executable, "-m", "clusterfs.cli"]


def _vhdshare() -> list[str]:
    return [sys.executable, "-c", "import sys; from vhdshare.cli import main; sys.exit(main())"]


def _say(text: str) -> None:
    print(text, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DemoCluster:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.blocks = base / "blocks"
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {name: _free_port() for name in NODES}
        self.serving: set[str] = set()

    def mnt(self, name: str) -> Path:
        return self.base / f"mnt-{name}"

    def start(self) -> None:
        """A new cluster grows one node at a time (each joins through n1); a cluster that
        ran here before restarts all at once, since a node serves only with a majority."""
        if not (self.blocks / "clusterfs.format").exists():
            subprocess.run([*_clusterfs(), "format", str(self.blocks)], check=True)
        restart = (self.base / f"state-{NODES[0]}" / "replica").exists()
        for name in NODES:
            self._start_node(name)
            if not restart:
                self._wait_for_mount(name)
        for name in NODES:
            self._wait_for_mount(name)

    def _start_node(self, name: str) -> None:
        state = self.base / f"state-{name}"
        self.mnt(name).mkdir(parents=True, exist_ok=True)
        command = [*_clusterfs(), "mount", str(self.blocks), str(self.mnt(name)), "--node", name,
                   "--state", str(state), "--listen", f"127.0.0.1:{self.ports[name]}", "-f"]
        if name != NODES[0] and not (state / "replica").exists():
            command += ["--join", f"127.0.0.1:{self.ports[NODES[0]]}"]
        state.mkdir(parents=True, exist_ok=True)
        with open(state / "demo-node.log", "ab") as log:
            self.daemons[name] = subprocess.Popen(command, stdout=log, stderr=log)

    def _wait_for_mount(self, name: str) -> None:
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not os.path.ismount(self.mnt(name)):
            if self.daemons[name].poll() is not None or time.monotonic() > deadline:
                log = self.base / f"state-{name}" / "demo-node.log"
                raise SystemExit(f"clusterfs demo: node {name} did not mount (see {log})")
            time.sleep(0.05)
        if name not in self.serving:
            self.serving.add(name)
            _say(f"node {name} is serving the cluster on {self.mnt(name)}")

    def stop(self) -> None:
        for daemon in self.daemons.values():
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
        for name, daemon in self.daemons.items():
            try:
                daemon.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            if os.path.ismount(self.mnt(name)):
                subprocess.run(["umount", "-l", str(self.mnt(name))], check=False)


def _tour(cluster: DemoCluster) -> None:
    m1, m2, m3 = (cluster.mnt(name) for name in NODES)
    _say(f"\n$ echo 'hello from n1' > {m1}/hello.txt      # written through node n1")
    (m1 / "hello.txt").write_text("hello from n1\n")
    _say(f"$ cat {m3}/hello.txt                         # read through node n3")
    _say((m3 / "hello.txt").read_text().rstrip())
    _race(m1, m2)
    _say(f"\n$ mv {m2}/hello.txt {m2}/greeting.txt && ls {m1} {m3}")
    os.rename(m2 / "hello.txt", m2 / "greeting.txt")
    for mnt in (m1, m3):
        _say(f"  {mnt}: {' '.join(sorted(os.listdir(mnt)))}")
    _shared_disk(cluster)
    _say(f"\n$ clusterfs status {m1}")
    subprocess.run([*_clusterfs(), "status", str(m1)], check=False)


def _shared_disk(cluster: DemoCluster) -> None:
    """A VM host reserves a shared disk; another host is refused; the reservation is
    cleared again, so that the next run of the demo starts from the same state."""
    disk = cluster.mnt(NODES[0]) / "shared.vhd"
    if not disk.exists():
        _say(f"\n$ vhdshare create {disk} --size 1G --type dynamic")
        subprocess.run([*_vhdshare(), "create", str(disk), "--size", "1G", "--type",
                        "dynamic"], check=False)
    addresses = ",".join(f"127.0.0.1:{cluster.ports[name]}" for name in NODES)
    credentials = cluster.blocks / "cluster" / "credentials"
    common = ["pr", "--cluster", addresses, "--credentials", str(credentials),
              "--disk", "/shared.vhd"]
    steps = [("host-a", ["register", "--key", "0xa1", "--ignore-existing"]),
             ("host-a", ["reserve", "--key", "0xa1", "--type", "we-ro"]),
             ("host-b", ["read-reservation"]),
             ("host-b", ["reserve", "--key", "0xb2", "--type", "we-ro"]),
             ("host-a", ["clear", "--key", "0xa1"])]
    _say("\n# two VM hosts and one shared disk: a reservation holds through every node")
    for host, action in steps:
        _say(f"$ vhdshare pr --cluster ... --disk /shared.vhd --initiator {host} "
             f"{' '.join(action)}")
        done = subprocess.run([*_vhdshare(), *common, "--initiator", host, *action],
                              capture_output=True, text=True, check=False)
        for line in (done.stdout + done.stderr).splitlines():
            _say(line)


def _race(m1: Path, m2: Path) -> None:
    """Two nodes create the same name with O_EXCL at the same moment: one wins."""
    _say(f"\n# n1 and n2 both create {'race.txt'} with O_CREAT|O_EXCL at the same moment")
    barrier = threading.Barrier(2)
    results: dict[str, str] = {}

    def create(name: str, mnt: Path) -> None:
        barrier.wait()
        try:
            os.close(os.open(mnt / "race.txt", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            results[name] = "created it"
        except OSError as exc:
            results[name] = f"got {errno.errorcode.get(exc.errno or 0, exc.errno)}"

    threads = [threading.Thread(target=create, args=(name, mnt))
               for name, mnt in (("n1", m1), ("n2", m2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in ("n1", "n2"):
        _say(f"  {name}: {results[name]}")


def run_demo(base: Path | None, wait: bool) -> int:
    base = Path(tempfile.mkdtemp(prefix="clusterfs-demo-")) if base is None else base
    base.mkdir(parents=True, exist_ok=True)
    cluster = DemoCluster(base)
    try:
        cluster.start()
        _tour(cluster)
        if wait:
            _say(f"\nThe cluster stays up under {base}. Press Ctrl-C to stop.")
            with contextlib.suppress(KeyboardInterrupt):
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    _say("stopped")
    return 0
