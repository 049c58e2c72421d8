#!/usr/bin/env python3
"""Benchmark clusterfs namespace operations on a 3-node cluster beside a 1-node cluster.

Usage: python tools/bench_cluster.py [--ops N] [--clients 1,4,16] [--pin CPU] [--json]
                                     [--workdir DIR] [--phase-limit-s S] [--keep]
       python tools/bench_cluster.py --membership [--entries N] [--json] [--workdir DIR]
                                     (failure detection and a join: see "membership" below)

Theory of operation: one run formats two block directories and starts two clusters on
loopback, a 1-node cluster (the single-node figures: the same code path, one member) and a
3-node cluster, each node its own `clusterfs mount -f` process with its own mount point and
state directory, started one after another (the founder first, then each joiner once the
previous mount is live). Both clusters stay up for the whole run, and every measurement is
made on one and then the other, the order alternating, so that the figures compared were
measured close together in time (DESIGN.md section 7: only ratios within one run count).

The workload, per client, in its own fresh directory: create (open O_CREAT|O_EXCL|O_WRONLY
and close of an empty file), mkdir, rename of each created file within the directory, and
unlink of the renamed files; --ops of each per client. Each operation is timed on its own
with time.perf_counter_ns. Clients start each phase together at a barrier; throughput is the
operations of all clients over the time from the first client's start to the last client's
end (cluster-wide ops/s). Client i works on node i mod N. Latency is one client alone:
on the leader (that run doubles as the 1-client throughput run when client 0's node is the
leader) and, in the 3-node cluster, on a non-leader, which pays the extra hop to the
coordinator. A phase stops at --phase-limit-s and reports what it completed, which bounds
the run time when the cluster is slow.

Clients are processes (multiprocessing, fork), not threads: os calls release the GIL, but
every operation also runs Python code (the loop, the clock, the bookkeeping) that needs it,
and on this 2-core VM sixteen threads handing one GIL around would measure the interpreter's
switching as much as the file system, and would add GIL waits to the per-operation latency.
A process per client has its own interpreter, like sixteen independent applications would.

Caches are not dropped between phases (every name is new; rename and unlink may find their
source entry in the kernel's 1 s entry cache, on both clusters alike). Every daemon started
here is stopped by PID (SIGTERM, then SIGKILL, then `umount -l` for a mount left behind),
also on Ctrl-C or SIGTERM; the work directory is removed unless --keep is given.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import ForkProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from queue import Empty
from types import FrameType
from typing import Any

from clusterfs.credentials import credentials_path, load_credentials
from clusterfs.status import is_mounted
from clusterfs.txn.local_link import link_path

OPS = ("create", "mkdir", "rename", "unlink")
CLUSTER_NODES = 3
SIZES = (1, CLUSTER_NODES)
MOUNT_WAIT_S = 75.0  # a joiner gives up after 60 s (clusterfs.node.JOIN_TIMEOUT_S)
ONLINE_WAIT_S = 30.0
STOP_WAIT_S = 20.0
PORT_ATTEMPTS = 3
IDLE_MEASURE_S = 2.0
BARRIER_GRACE_S = 120.0  # beyond the phase limit: one stalled operation may take this long

# The targets (issue 3, acceptance): printed next to the figures, never enforced.
TARGET_CREATE_P50_MS = 3.0
TARGET_CREATE_OPS_S = 1000.0
TARGET_CREATE_VS_1NODE = 0.5
TARGET_CLIENTS = 16


def cluster_key(size: int) -> str:
    return f"{size}-node"


class BenchError(Exception):
    """A cluster could not be set up or a run failed; the message says why."""


def log(msg: str) -> None:
    print(f"bench_cluster: {msg}", file=sys.stderr, flush=True)


def percentile(sorted_ns: Sequence[int], pct: float) -> float:
    """Nearest-rank percentile of sorted nanosecond values, in milliseconds."""
    if not sorted_ns:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_cpu_s(pid: int) -> float:
    """User+system CPU seconds of a live process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def clusterfs_command() -> str:
    return str(Path(sys.executable).parent / "clusterfs")


@dataclass(frozen=True)
class Config:
    ops: int
    clients: tuple[int, ...]
    pin_cpu: int | None
    phase_limit_s: float


# ----- the clients (child processes) ---------------------------------------------------


@dataclass(frozen=True)
class ClientSpec:
    index: int
    directory: str
    ops: int
    phase_limit_s: float


@dataclass
class PhaseReport:
    """One client's figures for one phase, sent to the parent through a queue."""

    client: int
    op: str
    planned: int
    start_ns: int = 0
    end_ns: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    error: str = ""


def create_empty(path: str) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))


def rename_within(path: str) -> None:
    os.rename(path, path + "r")


def make_dir(path: str) -> None:
    os.mkdir(path, 0o755)


def timed_ops(client: int, op: str, items: Sequence[str], fn: Callable[[str], None],
              limit_s: float) -> PhaseReport:
    """Run fn over items, each call timed, until done, failed or past the time limit."""
    report = PhaseReport(client, op, len(items))
    start = time.perf_counter_ns()
    deadline = start + int(limit_s * 1e9)
    for item in items:
        before = time.perf_counter_ns()
        try:
            fn(item)
        except OSError as exc:
            report.error = f"{op}: {type(exc).__name__}: {exc}"
            break
        after = time.perf_counter_ns()
        report.latencies_ns.append(after - before)
        if after > deadline:
            break
    report.start_ns, report.end_ns = start, time.perf_counter_ns()
    return report


def client_main(spec: ClientSpec, barrier: Barrier, results: Queue[PhaseReport]) -> None:
    """One client: its directory, then each phase between two barriers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and reaps us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    setup_error = ""
    try:
        os.mkdir(spec.directory)
    except OSError as exc:
        setup_error = f"mkdir {spec.directory}: {exc}"
    base = spec.directory
    files = [f"{base}/f{i:06d}" for i in range(spec.ops)]
    created: list[str] = []
    renamed: list[str] = []
    timeout_s = spec.phase_limit_s + BARRIER_GRACE_S
    for op in OPS:
        try:
            barrier.wait(timeout_s)
        except threading.BrokenBarrierError:
            results.put(PhaseReport(spec.index, op, 0, error="barrier broken (a stall?)"))
            return
        if setup_error:
            results.put(PhaseReport(spec.index, op, 0, error=setup_error))
            continue
        if op == "create":
            report = timed_ops(spec.index, op, files, create_empty, spec.phase_limit_s)
            created = files[: len(report.latencies_ns)]
        elif op == "mkdir":
            dirs = [f"{base}/d{i:06d}" for i in range(spec.ops)]
            report = timed_ops(spec.index, op, dirs, make_dir, spec.phase_limit_s)
        elif op == "rename":
            report = timed_ops(spec.index, op, created, rename_within, spec.phase_limit_s)
            renamed = [p + "r" for p in created[: len(report.latencies_ns)]]
        else:
            report = timed_ops(spec.index, op, renamed, os.unlink, spec.phase_limit_s)
        results.put(report)
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(timeout_s)


# ----- the figures of one run -----------------------------------------------------------


@dataclass
class OpFigure:
    ops: int
    planned: int
    elapsed_s: float
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    daemon_cpu_s: float

    def to_json(self) -> dict[str, Any]:
        return {"ops": self.ops, "planned": self.planned, "elapsed_s": self.elapsed_s,
                "ops_per_s": self.ops_per_s, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
                "daemon_cpu_us_per_op": (self.daemon_cpu_s / self.ops * 1e6 if self.ops
                                         else None)}


@dataclass
class RunResult:
    size: int
    nodes: tuple[int, ...]  # node index of each client
    figures: dict[str, OpFigure] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def summarise(op: str, reports: list[PhaseReport], cpu_s: float) -> OpFigure | None:
    done = [r for r in reports if r.latencies_ns]
    if not done:
        return None
    latencies = sorted(ns for r in done for ns in r.latencies_ns)
    elapsed_s = (max(r.end_ns for r in done) - min(r.start_ns for r in done)) / 1e9
    return OpFigure(ops=len(latencies), planned=sum(r.planned for r in reports),
                    elapsed_s=elapsed_s,
                    ops_per_s=len(latencies) / elapsed_s if elapsed_s > 0 else 0.0,
                    p50_ms=percentile(latencies, 50), p99_ms=percentile(latencies, 99),
                    daemon_cpu_s=cpu_s)


# ----- the nodes and clusters -----------------------------------------------------------


class Node:
    """One `clusterfs mount -f` process, started and stopped by PID."""

    def __init__(self, name: str, root: Path, blocks: Path, pin_cpu: int | None) -> None:
        self.name = name
        self.blocks = blocks
        self.mountpoint = root / f"mnt-{name}"
        self.state_dir = root / f"state-{name}"
        self.log_path = root / f"{name}.log"
        self.pin_cpu = pin_cpu
        self.listen = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.mountpoint.mkdir(parents=True)

    def argv(self, join: str | None) -> list[str]:
        pin = ["taskset", "-c", str(self.pin_cpu)] if self.pin_cpu is not None else []
        argv = [*pin, clusterfs_command(), "mount", str(self.blocks), str(self.mountpoint),
                "--node", self.name, "--state", str(self.state_dir), "--listen", self.listen]
        return [*argv, *(["--join", join] if join else []), "-f"]

    def start(self, join: str | None) -> None:
        """Start and wait for the mount; a listen port taken meanwhile is retried."""
        for attempt in range(PORT_ATTEMPTS):
            self.listen = f"127.0.0.1:{free_port()}"
            argv = self.argv(join)
            log(f"{self.name}: {shlex.join(argv)}")
            with open(self.log_path, "ab") as log_file:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            if self._wait_mounted():
                return
            if "Address already in use" not in self.log_tail() or attempt + 1 == PORT_ATTEMPTS:
                break
        raise BenchError(f"{self.name} exited {self.proc.returncode if self.proc else '?'} "
                         f"before mounting: {self.log_tail()}")

    def _wait_mounted(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + MOUNT_WAIT_S
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not mounted after {MOUNT_WAIT_S:.0f} s: "
                                 f"{self.log_tail()}")
            time.sleep(0.05)
        return True

    def log_tail(self, lines: int = 4) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        """SIGTERM (the node unmounts and stops cleanly), then SIGKILL; umount -l if left."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if proc.poll() is not None:
                    break
                log(f"{self.name}: sending {sig.name} to PID {proc.pid}")
                proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_WAIT_S)
            if proc.poll() not in (0, None):
                log(f"{self.name}: PID {proc.pid} exited {proc.returncode}: {self.log_tail()}")
        if is_mounted(self.mountpoint):  # a dead node's mount too
            log(f"{self.name}: lazy unmount of {self.mountpoint}")
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False, timeout=60)
        self.remove_local_link()

    def remove_local_link(self) -> None:
        """The local link socket a node killed with SIGKILL leaves in /run/clusterfs."""
        credentials = credentials_path(self.blocks)
        if self.listen and credentials.exists():
            link_path(load_credentials(credentials).cluster_key, self.listen).unlink(
                missing_ok=True)


@dataclass
class Cluster:
    size: int
    nodes: list[Node]
    leader: str = ""
    epoch: int = 0
    idle_cpu: float | None = None  # CPUs the members use with no client (1.0 = one CPU)

    @property
    def key(self) -> str:
        return cluster_key(self.size)

    def leader_index(self) -> int:
        names = [n.name for n in self.nodes]
        return names.index(self.leader) if self.leader in names else 0

    def non_leader_index(self) -> int | None:
        others = [i for i in range(self.size) if i != self.leader_index()]
        return others[0] if others else None

    def daemon_cpu_s(self) -> float:
        return sum(node.cpu_s() for node in self.nodes)


def cluster_status(node: Node) -> dict[str, Any]:
    proc = subprocess.run([clusterfs_command(), "status", str(node.mountpoint), "--json"],
                          capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise BenchError(f"clusterfs status: {proc.stderr.strip() or proc.returncode}")
    parsed: dict[str, Any] = json.loads(proc.stdout)
    return parsed


def wait_online(cluster: Cluster) -> None:
    """Until every member reports itself online in one view; note the leader."""
    names = sorted(n.name for n in cluster.nodes)
    deadline = time.monotonic() + ONLINE_WAIT_S
    last = ""
    while time.monotonic() < deadline:
        try:
            nodes = cluster_status(cluster.nodes[0])["nodes"]
        except (BenchError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            last = str(exc)
            time.sleep(0.2)
            continue
        online = sorted(n["name"] for n in nodes if n["state"] == "online")
        leaders = {n["leader"] for n in nodes}
        if online == names and len(leaders) == 1 and all(sorted(n["members"]) == names
                                                         for n in nodes):
            cluster.leader = leaders.pop()
            cluster.epoch = max(int(n["epoch"]) for n in nodes)
            return
        last = ", ".join(f"{n['name']} {n['state']}" for n in nodes)
        time.sleep(0.2)
    raise BenchError(f"{cluster.key} cluster not online after {ONLINE_WAIT_S:.0f} s: {last}")


@contextlib.contextmanager
def running_cluster(work: Path, size: int, cfg: Config) -> Iterator[Cluster]:
    root = work / cluster_key(size)
    root.mkdir()
    blocks = root / "blocks"
    proc = subprocess.run([clusterfs_command(), "format", str(blocks)], capture_output=True,
                          text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise BenchError(f"clusterfs format: {proc.stderr.strip()}")
    cluster = Cluster(size, [])
    try:
        for i in range(size):
            node = Node(f"n{i + 1}", root, blocks, cfg.pin_cpu)
            cluster.nodes.append(node)
            node.start(cluster.nodes[0].listen if i else None)
        wait_online(cluster)
        log(f"{cluster.key} cluster online: members "
            f"{', '.join(n.name for n in cluster.nodes)}, leader {cluster.leader}")
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            node.stop()


# ----- running the clients ----------------------------------------------------------------


def run_clients(cluster: Cluster, nodes: tuple[int, ...], tag: str, cfg: Config) -> RunResult:
    """Fork one process per client, step them through the phases, gather the figures."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(nodes) + 1)
    queue: Queue[PhaseReport] = ctx.Queue()
    procs: list[ForkProcess] = []
    result = RunResult(cluster.size, nodes)
    timeout_s = cfg.phase_limit_s + BARRIER_GRACE_S
    cpu_marks: list[float] = []
    try:
        for i, node in enumerate(nodes):
            directory = str(cluster.nodes[node].mountpoint / f"{tag}-c{i:02d}")
            spec = ClientSpec(i, directory, cfg.ops, cfg.phase_limit_s)
            proc = ctx.Process(target=client_main, args=(spec, barrier, queue), daemon=True)
            proc.start()
            procs.append(proc)
        with contextlib.suppress(threading.BrokenBarrierError):
            for _ in range(len(OPS) + 1):
                barrier.wait(timeout_s)
                cpu_marks.append(cluster.daemon_cpu_s())
        if len(cpu_marks) < len(OPS) + 1:
            result.errors.append(f"a phase did not finish within {timeout_s:.0f} s (stall?)")
        reports = gather(queue, len(nodes) * len(OPS), 10.0 if result.errors else timeout_s)
    except BaseException:  # Ctrl-C or SIGTERM: stop the clients at once
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        raise
    finally:
        reap(procs)
    fill_result(result, reports, cpu_marks)
    return result


def gather(queue: Queue[PhaseReport], count: int, timeout_s: float) -> list[PhaseReport]:
    reports: list[PhaseReport] = []
    deadline = time.monotonic() + timeout_s
    while len(reports) < count:
        try:
            reports.append(queue.get(timeout=max(0.1, deadline - time.monotonic())))
        except Empty:
            break
    return reports


def reap(procs: list[ForkProcess]) -> None:
    for proc in procs:
        proc.join(10.0)
        if proc.is_alive() and proc.pid is not None:
            log(f"client PID {proc.pid} still running; SIGKILL")
            proc.kill()
            proc.join(10.0)


def fill_result(result: RunResult, reports: list[PhaseReport], cpu_marks: list[float]) -> None:
    for k, op in enumerate(OPS):
        mine = [r for r in reports if r.op == op]
        cpu_s = cpu_marks[k + 1] - cpu_marks[k] if len(cpu_marks) > k + 1 else 0.0
        fig = summarise(op, mine, cpu_s)
        if fig is not None:
            result.figures[op] = fig
        errors = sorted({r.error for r in mine if r.error})
        result.errors += errors
        if fig is None and not errors:
            result.errors.append(f"{op}: no operation completed")
    result.errors = list(dict.fromkeys(result.errors))


# ----- the plan of one run ------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One measurement, made on each cluster that has it: the node of each client."""

    label: str
    nodes: dict[int, tuple[int, ...]]  # cluster size -> node index per client


def plan(clusters: dict[int, Cluster], cfg: Config) -> list[Slot]:
    slots = [Slot("1 client on the leader",
                  {size: (c.leader_index(),) for size, c in clusters.items()})]
    big = clusters.get(CLUSTER_NODES)
    other = big.non_leader_index() if big is not None else None
    if other is not None:
        slots.append(Slot("1 client on a non-leader", {CLUSTER_NODES: (other,)}))
    for count in cfg.clients:
        nodes = {size: tuple(i % size for i in range(count)) for size in clusters}
        slots.append(Slot(f"{count} clients", nodes))
    return slots


def run_all(clusters: dict[int, Cluster], cfg: Config) -> dict[tuple[int, tuple[int, ...]],
                                                                  RunResult]:
    """Each slot on each cluster (the cluster order alternating); identical runs once."""
    results: dict[tuple[int, tuple[int, ...]], RunResult] = {}
    for k, slot in enumerate(plan(clusters, cfg)):
        sizes = sorted(slot.nodes, reverse=k % 2 == 1)
        for size in sizes:
            nodes = slot.nodes[size]
            if (size, nodes) in results or size not in clusters:
                continue
            tag = f"r{len(results):02d}"
            log(f"{cluster_key(size)}: {slot.label}: {len(nodes)} client(s) on nodes "
                f"{','.join(clusters[size].nodes[i].name for i in nodes)}")
            run = run_clients(clusters[size], nodes, tag, cfg)
            for op, fig in run.figures.items():
                log(f"  {op}: {fig.ops_per_s:,.0f}/s, p50 {fig.p50_ms:.2f} ms, "
                    f"p99 {fig.p99_ms:.2f} ms ({fig.ops}/{fig.planned} ops)")
            for err in run.errors:
                log(f"  ! {err}")
            results[(size, nodes)] = run
    return results


# ----- the figures, arranged ----------------------------------------------------------------


@dataclass
class Figures:
    """Latency and throughput per cluster, read out of the runs."""

    latency: dict[str, dict[str, dict[str, OpFigure]]] = field(default_factory=dict)
    throughput: dict[str, dict[int, dict[str, OpFigure]]] = field(default_factory=dict)
    leaders: dict[str, str] = field(default_factory=dict)
    idle_cpu: dict[str, float | None] = field(default_factory=dict)


def arrange(clusters: dict[int, Cluster], runs: dict[tuple[int, tuple[int, ...]], RunResult],
            cfg: Config) -> Figures:
    figs = Figures()
    for size, cluster in clusters.items():
        key = cluster.key
        figs.leaders[key] = cluster.leader
        figs.idle_cpu[key] = cluster.idle_cpu
        roles = {"leader": cluster.leader_index(), "non_leader": cluster.non_leader_index()}
        figs.latency[key] = {}
        for role, index in roles.items():
            run = runs.get((size, (index,))) if index is not None else None
            if run is not None:
                figs.latency[key][role] = run.figures
        figs.throughput[key] = {}
        for count in cfg.clients:
            run = runs.get((size, tuple(i % size for i in range(count))))
            if run is not None:
                figs.throughput[key][count] = run.figures
    return figs


def value(figs: dict[str, OpFigure] | None, op: str, attr: str) -> float | None:
    if figs is None or op not in figs:
        return None
    return float(getattr(figs[op], attr))


def div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


SMALL, BIG = cluster_key(1), cluster_key(CLUSTER_NODES)


def latency_of(figs: Figures, key: str, role: str, op: str, attr: str) -> float | None:
    by_role = figs.latency.get(key, {})
    if key == SMALL:
        role = "leader"  # the one member is its own leader
    return value(by_role.get(role), op, attr)


def throughput_of(figs: Figures, key: str, count: int, op: str) -> float | None:
    return value(figs.throughput.get(key, {}).get(count), op, "ops_per_s")


@dataclass(frozen=True)
class Row:
    op: str
    label: str
    unit: str
    small: float | None
    big: float | None
    target: str


def rows(figs: Figures, cfg: Config) -> list[Row]:
    out: list[Row] = []
    for op in OPS:
        for role, where in (("leader", "leader"), ("non_leader", "non-leader")):
            for pct in ("p50", "p99"):
                attr = f"{pct}_ms"
                big = latency_of(figs, BIG, role, op, attr)
                target = latency_target(big) if op == "create" and pct == "p50" else ""
                out.append(Row(op, f"{pct} latency, 1 client on {where}", "ms",
                               latency_of(figs, SMALL, role, op, attr), big, target))
        for count in cfg.clients:
            small = throughput_of(figs, SMALL, count, op)
            big = throughput_of(figs, BIG, count, op)
            target = (throughput_target(small, big)
                      if op == "create" and count == TARGET_CLIENTS else "")
            out.append(Row(op, f"throughput, {count} client{'s' if count > 1 else ''}",
                           "ops/s", small, big, target))
    return out


def latency_target(big: float | None) -> str:
    goal = f"<{TARGET_CREATE_P50_MS:g} ms"
    return goal if big is None else f"{goal} {'ok' if big < TARGET_CREATE_P50_MS else 'MISSED'}"


def throughput_target(small: float | None, big: float | None) -> str:
    parts = [f">={TARGET_CREATE_OPS_S:,.0f}/s", f">={TARGET_CREATE_VS_1NODE:.2f}x 1 node"]
    if big is not None:
        parts[0] += " ok" if big >= TARGET_CREATE_OPS_S else " MISSED"
    r = div(big, small)
    if r is not None:
        parts[1] += " ok" if r >= TARGET_CREATE_VS_1NODE else " MISSED"
    return ", ".join(parts)


def targets(figs: Figures) -> list[dict[str, Any]]:
    """The issue's three targets with the figures they are judged on (met: None = no figure)."""
    out = []
    for role in ("leader", "non_leader"):
        p50 = latency_of(figs, BIG, role, "create", "p50_ms")
        where = role.replace("_", "-")
        out.append({"target": f"create p50 latency, {CLUSTER_NODES} nodes, client on {where}",
                    "goal": f"< {TARGET_CREATE_P50_MS:g} ms", "value": p50,
                    "met": None if p50 is None else p50 < TARGET_CREATE_P50_MS})
    small = throughput_of(figs, SMALL, TARGET_CLIENTS, "create")
    big = throughput_of(figs, BIG, TARGET_CLIENTS, "create")
    out.append({"target": f"create throughput, {TARGET_CLIENTS} clients, {CLUSTER_NODES} nodes",
                "goal": f">= {TARGET_CREATE_OPS_S:g} ops/s", "value": big,
                "met": None if big is None else big >= TARGET_CREATE_OPS_S})
    r = div(big, small)
    out.append({"target": f"create throughput, {TARGET_CLIENTS} clients, "
                          f"{CLUSTER_NODES} nodes / 1 node",
                "goal": f">= {TARGET_CREATE_VS_1NODE:g}", "value": r,
                "met": None if r is None else r >= TARGET_CREATE_VS_1NODE})
    return out


# ----- reporting ----------------------------------------------------------------------------


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v:.2f}" if v < 100 else f"{v:,.0f}"
    return f"{v:,.0f}"


def table_lines(figs: Figures, cfg: Config) -> list[str]:
    head = ["op", "figure", "unit", "1 node", f"{CLUSTER_NODES} nodes",
            f"{CLUSTER_NODES}n/1n", "target"]
    table = [head]
    for row in rows(figs, cfg):
        ratio = div(row.big, row.small)
        table.append([row.op, row.label, row.unit, fmt(row.small, row.unit),
                      fmt(row.big, row.unit), "-" if ratio is None else f"{ratio:.2f}",
                      row.target])
    widths = [max(len(cells[i]) for cells in table) for i in range(len(head))]
    lines = []
    for line in table:
        cells = [c.ljust(w) if i < 3 or i == 6 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * max(len(line) for line in lines))
    return lines


def header_lines(cfg: Config, work: Path, clusters: dict[int, Cluster]) -> list[str]:
    cpus = sorted(os.sched_getaffinity(0))
    pinned = (f"yes: benchmark, clients and every node on CPU {cfg.pin_cpu} "
              "(sched_setaffinity, taskset)" if cfg.pin_cpu is not None
              else f"no (CPUs {cpus} of {os.cpu_count()})")
    leaders = "; ".join(f"{c.key}: members {', '.join(n.name for n in c.nodes)}, leader "
                        f"{c.leader or '?'}, epoch {c.epoch}" for c in clusters.values())
    return [
        f"command: {shlex.join(sys.orig_argv)}",
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %z')}; host: {platform.node()}; "
        f"kernel: {platform.release()}; python {platform.python_version()}; "
        f"{os.cpu_count()} CPUs; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"pinned: {pinned}",
        f"work dir: {work} ({fs_type(work)}); ops per client per phase: {cfg.ops}; "
        f"phase time limit: {cfg.phase_limit_s:g} s; clients: "
        f"{', '.join(map(str, cfg.clients))} (processes; client i on node i mod N)",
        f"clusters (on loopback, both up for the whole run): {leaders}",
        f"idle CPU of all members, {IDLE_MEASURE_S:g} s before the first run: " + ", ".join(
            f"{c.key} {c.idle_cpu:.1%} of one CPU" for c in clusters.values()
            if c.idle_cpu is not None),
        "latency: one client alone, each operation timed; the 1-node column is the one "
        "member in both the leader and the non-leader rows; a 1-client run on the leader's "
        "node is also the 1-client throughput run",
        "throughput: all clients start each phase at a barrier; ops of all clients / (last "
        "end - first start); each client in its own directory",
    ]


def fs_type(path: Path) -> str:
    proc = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(path)],
                          capture_output=True, text=True, check=False)
    return " ".join(proc.stdout.split()) or "?"


def note_lines(runs: dict[tuple[int, tuple[int, ...]], RunResult],
               node_logs: dict[str, list[str]]) -> list[str]:
    lines = ["per run: ops/s, p50/p99 ms per operation, and the CPU of all members per "
             "operation (us):"]
    for (size, nodes), run in runs.items():
        where = ",".join(f"n{i + 1}" for i in sorted(set(nodes)))
        lines.append(f"  {cluster_key(size)}, {len(nodes)} client(s) on {where}:")
        for op, fig in run.figures.items():
            cpu = f"{fig.daemon_cpu_s / fig.ops * 1e6:,.0f}" if fig.ops else "-"
            limited = "" if fig.ops == fig.planned else f" ({fig.ops}/{fig.planned} done)"
            lines.append(f"    {op:<7} {fig.ops_per_s:>8,.0f}/s  p50 {fig.p50_ms:7.2f}  "
                         f"p99 {fig.p99_ms:7.2f}  cpu {cpu:>6}{limited}")
        lines += [f"    ! {err}" for err in run.errors]
    for node, problems in node_logs.items():
        lines.append(f"node log {node}: {len(problems)} warning/error line(s)")
        lines += [f"  {p[:200]}" for p in problems[:5]]
    return lines


def json_report(cfg: Config, header: list[str], figs: Figures,
                runs: dict[tuple[int, tuple[int, ...]], RunResult], errors: list[str],
                node_logs: dict[str, list[str]]) -> dict[str, Any]:
    def by_op(f: dict[str, OpFigure] | None, attr: str) -> dict[str, float | None]:
        return {op: value(f, op, attr) for op in OPS}

    latency = {key: {role: {op: {"p50": value(f, op, "p50_ms"), "p99": value(f, op, "p99_ms"),
                                 "samples": f[op].ops if op in f else 0} for op in OPS}
                     for role, f in by_role.items()} for key, by_role in figs.latency.items()}
    throughput = {key: {str(c): by_op(f, "ops_per_s") for c, f in by_count.items()}
                  for key, by_count in figs.throughput.items()}
    return {
        "header": header,
        "pinned": cfg.pin_cpu is not None,
        "pin_cpu": cfg.pin_cpu,
        "ops_per_client": cfg.ops,
        "clients": list(cfg.clients),
        "client_model": "process",
        "phase_limit_s": cfg.phase_limit_s,
        "cluster_nodes": CLUSTER_NODES,
        "leaders": figs.leaders,
        "idle_cpu_fraction": figs.idle_cpu,
        "latency_ms": latency,
        "throughput_ops_s": throughput,
        "ratios": {
            "throughput": {str(c): {op: div(throughput_of(figs, BIG, c, op),
                                            throughput_of(figs, SMALL, c, op)) for op in OPS}
                           for c in cfg.clients},
            "latency_p50": {role: {op: div(latency_of(figs, BIG, role, op, "p50_ms"),
                                           latency_of(figs, SMALL, role, op, "p50_ms"))
                                   for op in OPS} for role in ("leader", "non_leader")},
        },
        "targets": targets(figs),
        "runs": [{"cluster": cluster_key(size), "clients": len(nodes),
                  "client_nodes": [f"n{i + 1}" for i in nodes],
                  "figures": {op: f.to_json() for op, f in run.figures.items()},
                  "errors": run.errors} for (size, nodes), run in runs.items()],
        "errors": errors,
        "node_logs": node_logs,
    }


def scan_logs(clusters: dict[int, Cluster]) -> dict[str, list[str]]:
    """WARNING, ERROR and traceback lines of every node's log."""
    found: dict[str, list[str]] = {}
    for cluster in clusters.values():
        for node in cluster.nodes:
            try:
                text = node.log_path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            bad = [line for line in text if any(w in line for w in (
                " WARNING ", " ERROR ", " CRITICAL ", "Traceback"))]
            if bad:
                found[f"{cluster.key}/{node.name}"] = bad
    return found


# ----- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="clusterfs namespace operations: 3 nodes vs 1.")
    p.add_argument("--ops", type=int, default=150,
                   help="operations per client per phase (default 150: 1-2 min in all)")
    p.add_argument("--clients", default="1,4,16",
                   help="comma-separated concurrent client counts (default 1,4,16)")
    p.add_argument("--pin", type=int, metavar="CPU", help="run everything on this one CPU")
    p.add_argument("--json", action="store_true", help="print a JSON object, not the table")
    p.add_argument("--phase-limit-s", type=float, default=10.0,
                   help="stop a phase after this long (default 10)")
    p.add_argument("--workdir", "--nodes-dir", dest="workdir", default="/tmp",
                   help="parent of the scratch directory for the nodes (default /tmp)")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch directory (node logs and state) afterwards")
    p.add_argument("--membership", action="store_true",
                   help="measure failure detection and a join instead of the operations")
    p.add_argument("--entries", type=int, default=100_000,
                   help="namespace size for the --membership join (default 100000)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    try:
        clients = tuple(int(c) for c in args.clients.split(",") if c.strip())
    except ValueError:
        raise SystemExit(f"bench_cluster: --clients takes numbers like 1,4,16; "
                         f"got {args.clients!r}") from None
    if not clients or min(clients) < 1 or args.ops < 1:
        raise SystemExit("bench_cluster: --clients and --ops must be positive")
    return Config(ops=args.ops, clients=tuple(dict.fromkeys(clients)), pin_cpu=args.pin,
                  phase_limit_s=args.phase_limit_s)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_stop_signals() -> None:
    """Outside trio, SIGTERM and SIGHUP act as Ctrl-C, so that whatever was started is
    stopped (inside, trio's own handlers do); SIGINT gets Python's own handler even if it
    was ignored (a background job)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass
class Outcome:
    clusters: dict[int, Cluster] = field(default_factory=dict)
    runs: dict[tuple[int, tuple[int, ...]], RunResult] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    node_logs: dict[str, list[str]] = field(default_factory=dict)


def bench(work: Path, cfg: Config) -> Outcome:
    out = Outcome()
    with contextlib.ExitStack() as stack:
        for size in SIZES:
            log(f"starting the {cluster_key(size)} cluster")
            try:
                out.clusters[size] = stack.enter_context(running_cluster(work, size, cfg))
            except (OSError, BenchError, subprocess.SubprocessError) as exc:
                out.errors.append(f"{cluster_key(size)}: {type(exc).__name__}: {exc}")
                log(out.errors[-1])
        measure_idle(out.clusters)
        out.header = header_lines(cfg, work, out.clusters)
        if out.clusters:
            out.runs = run_all(out.clusters, cfg)
        # the logs are read after the nodes stopped (ExitStack), below
    out.node_logs = scan_logs(out.clusters)
    return out


def measure_idle(clusters: dict[int, Cluster]) -> None:
    """The members' CPU with no client at all: the baseline in the CPU-per-op figures."""
    if not clusters:
        return
    before = {size: c.daemon_cpu_s() for size, c in clusters.items()}
    start = time.monotonic()
    time.sleep(IDLE_MEASURE_S)
    elapsed_s = time.monotonic() - start
    for size, cluster in clusters.items():
        cluster.idle_cpu = (cluster.daemon_cpu_s() - before[size]) / elapsed_s


# ----- membership: failure detection and a join into a big namespace -----------------------
#
# `--membership` runs this instead of the operation phases: on a 3-node cluster, the time
# from kill -9 of a follower (and then of the leader) until the survivors' view no longer
# holds it, and until a create through a survivor succeeds again; then the namespace is
# filled to --entries entries (files in directories of 1,000, by 16 client processes over
# the three nodes) and a fourth node joins while one client creates files through n1 one
# after another, timing each: the join's time to a live mount and to online, and the
# commit latency before and during the join.


VIEW_LINE = re.compile(r"^(\S+ \S+) \S+ INFO view (\d+): members (.*), leader (\S+)$")


def view_change_after(node: Node, gone: str, since_s: float,
                      timeout_s: float = 60.0) -> tuple[float, int]:
    """The wall-clock time and epoch of the first view in `node`'s log, installed after
    `since_s`, without `gone` (the log is the node's own record of when it installed it;
    `clusterfs status` would wait for the dead member's answer)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in node.log_path.read_text(errors="replace").splitlines():
            match = VIEW_LINE.match(line)
            if not match or gone in match.group(3).split(", "):
                continue
            stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            at_s = stamp.timestamp()
            if at_s >= since_s:
                return at_s, int(match.group(2))
        time.sleep(0.1)
    raise BenchError(f"{gone} still in {node.name}'s view after {timeout_s:.0f} s")


def time_create(path: Path) -> float:
    start = time.perf_counter()
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    return time.perf_counter() - start


def kill_and_measure(cluster: Cluster, victim: Node, survivor: Node) -> dict[str, float]:
    """kill -9 `victim`; seconds until `survivor` installs a view without it and until a
    create through `survivor` succeeds; then the victim is restarted (catching up) and the
    cluster waits until all are online again."""
    assert victim.proc is not None
    probe = survivor.mountpoint / f"after-{victim.name}-{time.monotonic_ns()}"
    killed_at_s = time.time()
    victim.proc.kill()
    victim.proc.wait()
    victim.remove_local_link()
    time_create(probe)
    first_create_s = time.time() - killed_at_s
    removed_at_s, epoch = view_change_after(survivor, victim.name, killed_at_s - 0.01)
    subprocess.run(["umount", "-l", str(victim.mountpoint)], check=False, timeout=60)
    victim.start(None)
    wait_online(cluster)
    return {"removed_s": removed_at_s - killed_at_s, "first_create_s": first_create_s,
            "new_epoch": float(epoch)}


def fill_namespace(cluster: Cluster, entries: int) -> float:
    """Create `entries` entries (directories of 1,000 files) with 16 client processes over
    the nodes; returns the seconds it took."""
    per_dir = 1000
    dirs = max(1, entries // (per_dir + 1))
    jobs = [(str(cluster.nodes[d % len(cluster.nodes)].mountpoint / "fill" / f"d{d}"), per_dir)
            for d in range(dirs)]
    (cluster.nodes[0].mountpoint / "fill").mkdir()
    start = time.monotonic()
    with multiprocessing.get_context("fork").Pool(16) as pool:
        pool.map(_fill_dir, jobs, chunksize=1)
    return time.monotonic() - start


def _fill_dir(job: tuple[str, int]) -> None:
    directory, count = job
    os.mkdir(directory)
    for k in range(count):
        os.close(os.open(f"{directory}/f{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))


def join_and_measure(work: Path, cluster: Cluster, cfg: Config) -> dict[str, Any]:
    """A fourth node joins while a client on n1 creates files one after another."""
    first = cluster.nodes[0]
    root = first.mountpoint.parent
    newcomer = Node(f"n{len(cluster.nodes) + 1}", root, first.blocks, cfg.pin_cpu)
    lane = first.mountpoint / "during-join"
    lane.mkdir()
    before = sorted(time_create(lane / f"before{k}") for k in range(200))
    during: list[float] = []
    stop = threading.Event()

    def writer() -> None:
        k = 0
        while not stop.is_set():
            during.append(time_create(lane / f"during{k}"))
            k += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        cluster.nodes.append(newcomer)
        newcomer.start(first.listen)
        mounted_s = time.monotonic() - start
        wait_online(cluster)
        online_s = time.monotonic() - start
    finally:
        stop.set()
        thread.join(60)
    during.sort()
    text = newcomer.log_path.read_text(errors="replace")
    return {
        "join_mount_s": mounted_s, "join_online_s": online_s,
        "by_snapshot": "installed the snapshot" in text,
        "create_before_join_ms": {"p50": 1e3 * before[len(before) // 2],
                                  "p99": 1e3 * before[int(len(before) * 0.99)],
                                  "max": 1e3 * before[-1]},
        "create_during_join_ms": {"p50": 1e3 * during[len(during) // 2] if during else 0.0,
                                  "p99": 1e3 * during[int(len(during) * 0.99)] if during
                                  else 0.0,
                                  "max": 1e3 * during[-1] if during else 0.0,
                                  "count": len(during)},
    }


def membership_bench(work: Path, cfg: Config, entries: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"entries": entries}
    with running_cluster(work, CLUSTER_NODES, cfg) as cluster:
        leader = cluster.nodes[cluster.leader_index()]
        followers = [n for n in cluster.nodes if n is not leader]
        log("kill -9 of a follower")
        figures["follower_killed"] = kill_and_measure(cluster, followers[0], leader)
        log("kill -9 of the leader")
        figures["leader_killed"] = kill_and_measure(cluster, leader, followers[0])
        log(f"filling the namespace with {entries} entries")
        figures["fill_s"] = fill_namespace(cluster, entries)
        log("a fourth node joins")
        figures["join"] = join_and_measure(work, cluster, cfg)
    return figures


def membership_lines(figures: dict[str, Any]) -> list[str]:
    join = figures["join"]
    lines = []
    for key, what in (("follower_killed", "follower"), ("leader_killed", "leader")):
        f = figures[key]
        lines.append(f"kill -9 of the {what}: removed from the view after {f['removed_s']:.2f} s"
                     f"; first create through a survivor returned after "
                     f"{f['first_create_s']:.2f} s")
    lines.append(f"namespace filled to {figures['entries']:,} entries in "
                 f"{figures['fill_s']:.0f} s")
    lines.append(f"join of a fourth node: mount live after {join['join_mount_s']:.2f} s, "
                 f"online in every member's view after {join['join_online_s']:.2f} s "
                 f"({'by snapshot' if join['by_snapshot'] else 'by log'})")
    for key, what in (("create_before_join_ms", "before the join"),
                      ("create_during_join_ms", "during the join")):
        f = join[key]
        lines.append(f"create latency on n1 {what}: p50 {f['p50']:.2f} ms, p99 {f['p99']:.2f}"
                     f" ms, max {f['max']:.2f} ms")
    return lines


def remove_work(work: Path, keep: bool) -> None:
    with open("/proc/self/mountinfo") as f:
        mounted = [line.split()[4] for line in f if f" {work}/" in line]
    if mounted:
        log(f"NOT removing {work}: still mounted: {mounted}")
    elif keep:
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = make_config(args)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    if cfg.pin_cpu is not None:
        os.sched_setaffinity(0, {cfg.pin_cpu})
    work = Path(tempfile.mkdtemp(prefix="bench_cluster-", dir=args.workdir))
    log(f"command: {shlex.join(sys.orig_argv)}; work dir {work}")
    started = time.monotonic()
    if args.membership:
        return membership_main(work, cfg, args)
    try:
        out = bench(work, cfg)
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); cleaned up")
        return 130
    finally:
        remove_work(work, args.keep)
    log(f"done in {time.monotonic() - started:.0f} s")
    figs = arrange(out.clusters, out.runs, cfg)
    errors = out.errors + [f"{cluster_key(s)} {len(n)} client(s): {e}"
                           for (s, n), run in out.runs.items() for e in run.errors]
    if args.json:
        print(json.dumps(json_report(cfg, out.header, figs, out.runs, errors, out.node_logs),
                         indent=2))
    else:
        lines = [*out.header, "", *table_lines(figs, cfg), "", *note_lines(out.runs,
                                                                           out.node_logs)]
        lines += [f"! {e}" for e in out.errors]
        print("\n".join(lines))
    return 1 if errors else 0


def membership_main(work: Path, cfg: Config, args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        figures = membership_bench(work, cfg, args.entries)
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); cleaned up")
        return 130
    except (OSError, BenchError, subprocess.SubprocessError) as exc:
        log(f"membership run failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        remove_work(work, args.keep)
    log(f"done in {time.monotonic() - started:.0f} s")
    print(json.dumps(figures, indent=2) if args.json else "\n".join(membership_lines(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
