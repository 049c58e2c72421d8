"""Fixtures for multi-node tests: a cluster of real `clusterfs mount` processes on loopback.

Every node is its own foreground process (`clusterfs mount ... -f`) started by the test
process with Popen, so the fixture owns its PID; all nodes share one block directory and
each has its own state directory and mount point under one base directory in /var/tmp:

    BASE/block            the common block directory (formatted once)
    BASE/stateK           node nK's state directory (its replica; nK.log is its output)
    BASE/mntK             node nK's mount point

`shared_cluster` is one 3-node cluster for the tests that leave it running; after each
test it checks that every node is still alive and logged no ERROR or traceback, and if a
node died the next test gets a fresh cluster. Tests that kill or restart nodes build their
own with `new_cluster`. Cleanup runs however a test ends: SIGTERM to every PID the fixture
started, SIGKILL to what is left after a grace period, then a lazy unmount of any mount
point still mounted. Nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clusterfs.credentials import Credentials, credentials_path, load_credentials
from clusterfs.txn.local_link import link_path
from tests.util import (
    clusterfs_command,
    free_port,
    fuse_skip_reason,
    is_mounted,
    run_cli,
    unmount,
    wait_or_kill,
)

BASE_DIR = "/var/tmp"
MOUNT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
QUIET_TIMEOUT_S = 30.0
LOG_PROBLEM_MARKERS = ("Traceback", " ERROR ", " CRITICAL ")

_dir_counter = itertools.count()


class ClusterError(AssertionError):
    """A node did not come up, died, or the cluster did not settle."""


class ClusterNode:
    """One node of a Cluster: its process, state directory, mount point and log."""

    def __init__(self, cluster: Cluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"n{index + 1}"
        self.statedir = cluster.base / f"state{index + 1}"
        self.mountpoint = cluster.base / f"mnt{index + 1}"
        self.logfile = self.statedir / f"{self.name}.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}  # for this node's process only (test fault injection)
        self.host = "127.0.0.1"  # another address for a node in a network namespace
        self.prefix: list[str] = []  # a command that runs the node, e.g. nsenter --net=...
        self.statedir.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        os.chmod(self.mountpoint, 0o755)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def has_replica(self) -> bool:
        return (self.statedir / "replica").exists()

    def mount_args(self, join: str | None) -> list[str]:
        args = [
            *clusterfs_command(), "mount", str(self.cluster.blockdir), str(self.mountpoint),
            "--node", self.name, "--state", str(self.statedir), "--listen", self.address,
        ]
        if join:
            args += ["--join", join]
        return [*args, "-f"]

    def spawn(self, join: str | None = None) -> None:
        """Start the node process (not waiting for its mount), with `self.env` added to
        the environment."""
        assert not self.alive(), f"{self.name} is already running (pid {self.pid})"
        if is_mounted(self.mountpoint):  # a dead mount left by kill -9
            self.detach_dead_mount()
        with open(self.logfile, "ab") as log:
            log.write(f"--- test: starting {self.name} (join={join})\n".encode())
            log.flush()
            proc = subprocess.Popen(
                [*self.prefix, *self.mount_args(join)], stdin=subprocess.DEVNULL, stdout=log,
                stderr=log,
                env={**os.environ, **self.env},
            )
        self.proc = proc
        self.cluster.all_procs.append(proc)

    def wait_mounted(self, timeout_s: float = MOUNT_TIMEOUT_S) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if is_mounted(self.mountpoint) and os.path.ismount(self.mountpoint):
                return
            if self.proc.poll() is not None:
                raise ClusterError(
                    f"node {self.name} exited with {self.proc.returncode} before its mount "
                    f"came up:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        raise ClusterError(
            f"mount of node {self.name} did not come up in {timeout_s:g} s:\n{self.log_tail()}"
        )

    def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (a clean stop: the node unmounts); returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout_s)

    def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait for the node process to exit (SIGKILL it after TIMEOUT_S); its status."""
        assert self.proc is not None
        status = wait_or_kill(self.proc, timeout_s)
        if status is None:
            raise ClusterError(
                f"node {self.name} (pid {self.proc.pid}) did not exit within {timeout_s:g} s; "
                f"killed it:\n{self.log_tail()}"
            )
        return status

    def kill9(self) -> None:
        """SIGKILL the node by PID and reap it; its mount stays (dead) until detached."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def detach_dead_mount(self) -> None:
        if is_mounted(self.mountpoint) and not unmount(self.mountpoint, lazy=True):
            raise ClusterError(f"could not detach the dead mount {self.mountpoint}")

    # -- diagnostics ------------------------------------------------------------------------
    def log_text(self, since: int = 0) -> str:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return "\n".join(f"  [{self.name}] {line}" for line in tail)

    def log_mark(self) -> int:
        try:
            return self.logfile.stat().st_size
        except FileNotFoundError:
            return 0

    def log_problems_since(self, offset: int) -> list[str]:
        return [
            f"[{self.name}] {line}"
            for line in self.log_text(offset).splitlines()
            if any(marker in line for marker in LOG_PROBLEM_MARKERS)
        ]


class Cluster:
    """N clusterfs nodes (default 3) on loopback over one common block directory.

    start() formats the block directory and starts the nodes one after another (n1 founds
    the cluster, the others join through n1); stop() stops them cleanly with SIGTERM;
    kill9() SIGKILLs them; restart_all() detaches dead mounts and starts every stopped node
    at about the same time (a restart needs no --join: the state directory remembers the
    view). cleanup() never raises and leaves no process or mount behind.
    """

    def __init__(self, base: Path, n: int = 3) -> None:
        self.base = base
        self.blockdir = base / "block"
        self.nodes = [ClusterNode(self, i) for i in range(n)]
        self.all_procs: list[subprocess.Popen[bytes]] = []

    def __len__(self) -> int:
        return len(self.nodes)

    def mnt(self, i: int) -> Path:
        return self.nodes[i].mountpoint

    @property
    def mounts(self) -> list[Path]:
        return [node.mountpoint for node in self.nodes]

    # -- lifecycle --------------------------------------------------------------------------
    def format(self) -> None:
        self.blockdir.mkdir(parents=True, exist_ok=True)
        run_cli("format", str(self.blockdir), check=True)

    def start(self) -> Cluster:
        """Format (first time only) and start every node, one after another."""
        if not (self.blockdir / "clusterfs.format").exists():
            self.format()
        founder = self.nodes[0]
        for node in self.nodes:
            if node.alive():
                continue
            join = None if node is founder or node.has_replica() else founder.address
            node.spawn(join)
            node.wait_mounted()
        return self

    def start_node(self, i: int) -> None:
        """(Re)start one node; a node that has a replica needs no --join."""
        node = self.nodes[i]
        node.spawn(None if node.has_replica() or i == 0 else self.nodes[0].address)
        node.wait_mounted()

    def stop(self) -> list[int]:
        """Stop every running node with SIGTERM (all at once); their exit statuses."""
        running = [node for node in self.nodes if node.alive()]
        for node in running:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)
        return [node.wait_exit() for node in running]

    def kill9(self, *indexes: int) -> None:
        """SIGKILL the given nodes (all if none given) and detach their dead mounts."""
        nodes = [self.nodes[i] for i in indexes] if indexes else self.nodes
        for node in nodes:
            if node.alive():
                node.kill9()
        for node in nodes:
            node.detach_dead_mount()

    def restart_all(self) -> None:
        """Start every node that is not running, all at about the same time, then wait
        for all their mounts (a node alone cannot reach a majority for long)."""
        stopped = [node for node in self.nodes if not node.alive()]
        for node in stopped:
            node.detach_dead_mount()
        for node in stopped:
            node.spawn(None)
        for node in stopped:
            node.wait_mounted()

    def cleanup(self) -> None:
        """SIGTERM every process this cluster started, SIGKILL what is left after a grace
        period, then lazily unmount what is still mounted. Never raises."""
        try:
            live = [p for p in self.all_procs if p.poll() is None]
            for proc in live:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for proc in live:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
            for node in self.nodes:
                if is_mounted(node.mountpoint):
                    unmount(node.mountpoint, lazy=True)
                self._remove_local_link(node)
        except Exception as exc:  # cleanup must go on
            print(f"Cluster.cleanup: {exc!r}")

    def _remove_local_link(self, node: ClusterNode) -> None:
        """The node's local link socket, which a node killed with SIGKILL leaves behind."""
        path = credentials_path(self.blockdir)
        if path.exists():
            link_path(load_credentials(path).cluster_key, node.address).unlink(missing_ok=True)

    def leftovers(self) -> list[str]:
        """What cleanup failed to remove (for the finalizer's check)."""
        out = [f"pid {p.pid} still running" for p in self.all_procs if p.poll() is None]
        out += [f"{n.mountpoint} still mounted" for n in self.nodes if is_mounted(n.mountpoint)]
        return out

    # -- status -----------------------------------------------------------------------------
    def status(self, i: int = 0) -> dict[str, Any]:
        """`clusterfs status MNT --json` of node i, parsed."""
        proc = run_cli("status", str(self.mnt(i)), "--json", timeout_s=30)
        if proc.returncode != 0:
            raise ClusterError(
                f"clusterfs status {self.mnt(i)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def wait_quiet_digests(self, timeout_s: float = QUIET_TIMEOUT_S) -> dict[str, Any]:
        """Poll status until every started node is online and all report the same applied
        sequence number and replica digest; returns that status."""
        expected = {node.name for node in self.nodes if node.alive()}
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | str = "no status yet"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                current = self.status(self._first_alive())
            except ClusterError as exc:
                last = str(exc)
            else:
                last = current
                nodes = {n["name"]: n for n in current["nodes"]}
                online = {name for name, n in nodes.items() if n["state"] == "online"}
                figures = {(n["applied_seq"], n["digest"]) for n in nodes.values()
                           if n["state"] == "online"}
                if expected <= online and len(figures) == 1 and current["digests_equal"]:
                    return current
            time.sleep(0.2)
        raise ClusterError(
            f"the cluster did not settle on equal digests within {timeout_s:g} s; last status:\n"
            f"{json.dumps(last, indent=1) if isinstance(last, dict) else last}\n{self.log_tails()}"
        )

    def _first_alive(self) -> int:
        for node in self.nodes:
            if node.alive():
                return node.index
        raise ClusterError("no node is running")

    # -- health -----------------------------------------------------------------------------
    def check_alive(self) -> None:
        dead = [node for node in self.nodes if node.proc is not None and not node.alive()]
        if dead:
            raise ClusterError(
                "node(s) died: " + ", ".join(
                    f"{n.name} (exit {n.proc.returncode if n.proc else '?'})" for n in dead
                ) + "\n" + self.log_tails()
            )

    def log_marks(self) -> list[int]:
        return [node.log_mark() for node in self.nodes]

    def log_problems_since(self, marks: list[int]) -> list[str]:
        problems: list[str] = []
        for node, mark in zip(self.nodes, marks, strict=True):
            problems += node.log_problems_since(mark)
        return problems

    def log_tails(self, lines: int = 25) -> str:
        return "\n".join(node.log_tail(lines) for node in self.nodes)


# -- fixtures ------------------------------------------------------------------------------

def _skip_without_fuse() -> None:
    reason = fuse_skip_reason()
    if reason:
        pytest.skip(reason)


def _make_base() -> Path:
    base = Path(tempfile.mkdtemp(prefix="clusterfs-cluster-", dir=BASE_DIR))
    os.chmod(base, 0o755)
    return base


def _remove_base(cluster: Cluster) -> None:
    if not any(is_mounted(m) for m in cluster.mounts):  # never delete through a mount
        shutil.rmtree(cluster.base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def new_cluster() -> Iterator[Callable[..., Cluster]]:
    """A factory of clusters of the test's own (for kill -9 and restart tests); every
    cluster it made is cleaned up by PID when the test ends, however it ends."""
    _skip_without_fuse()
    made: list[Cluster] = []

    def make(n: int = 3, start: bool = True) -> Cluster:
        cluster = Cluster(_make_base(), n)
        made.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield make
    for cluster in made:
        # Captured; pytest shows it with a failure.
        print(f"--- logs of the cluster in {cluster.base}:\n{cluster.log_tails(40)}")
        cluster.cleanup()
    leftovers = [item for cluster in made for item in cluster.leftovers()]
    for cluster in made:
        _remove_base(cluster)
    assert not leftovers, f"cleanup left {leftovers}"


class _SharedCluster:
    """The 3-node cluster shared by the session, (re)started on first use after a failure."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None
        self.retired: list[Cluster] = []
        self.start_error: str | None = None

    def get(self) -> Cluster:
        _skip_without_fuse()
        if self.start_error:
            pytest.fail(f"the shared cluster could not start: {self.start_error}")
        if self.cluster is not None and all(node.alive() for node in self.cluster.nodes):
            return self.cluster
        if self.cluster is not None:  # a node died in an earlier test: start afresh
            self.cluster.cleanup()
            self.retired.append(self.cluster)
        self.cluster = Cluster(_make_base())
        try:
            self.cluster.start()
        except AssertionError as exc:
            self.start_error = str(exc)
            self.cluster.cleanup()
            pytest.fail(f"the shared cluster could not start: {exc}")
        return self.cluster

    def close(self) -> None:
        clusters = [*self.retired, *([self.cluster] if self.cluster else [])]
        statuses: list[int] = []
        try:
            if self.cluster is not None:
                statuses = self.cluster.stop()
        finally:
            for cluster in clusters:
                cluster.cleanup()
            leftovers = [item for cluster in clusters for item in cluster.leftovers()]
            for cluster in clusters:
                _remove_base(cluster)
        assert not leftovers, f"cleanup left {leftovers}"
        assert all(rc == 0 for rc in statuses), f"nodes exited with {statuses} at the end"


@pytest.fixture(scope="session")
def _shared_cluster_holder() -> Iterator[_SharedCluster]:
    holder = _SharedCluster()
    yield holder
    holder.close()


@pytest.fixture
def shared_cluster(_shared_cluster_holder: _SharedCluster) -> Iterator[Cluster]:
    """The session's 3-node cluster; the test fails if a node dies or logs an error."""
    cluster = _shared_cluster_holder.get()
    marks = cluster.log_marks()
    yield cluster
    dead = [node.name for node in cluster.nodes if not node.alive()]
    if dead:
        pytest.fail(f"node(s) {dead} died during the test:\n{cluster.log_tails()}")
    problems = cluster.log_problems_since(marks)
    if problems:
        pytest.fail("nodes logged errors during the test:\n" + "\n".join(problems[:40]))


@pytest.fixture
def croot(shared_cluster: Cluster) -> Iterator[str]:
    """The name of a fresh, empty 0755 directory at the root of the shared cluster (the
    same directory is `shared_cluster.mnt(i) / croot` on every node)."""
    name = f"t{os.getpid()}-{next(_dir_counter):03d}"
    path = shared_cluster.mnt(0) / name
    path.mkdir()
    os.chmod(path, 0o755)
    yield name


# -- the file protocol --------------------------------------------------------------------------

def credentials_of(cluster: Cluster) -> Credentials:
    return load_credentials(credentials_path(cluster.blockdir))


def addresses_of(cluster: Cluster) -> list[str]:
    """The listen addresses of the cluster's live nodes (for protocol clients)."""
    return [node.address for node in cluster.nodes if node.alive()]


@pytest.fixture
def credentials(shared_cluster: Cluster) -> Credentials:
    """The shared cluster's credentials."""
    return credentials_of(shared_cluster)
