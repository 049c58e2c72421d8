#!/usr/bin/env python3
"""Where a cluster's CPU goes, per node and per kind of thread, while clients create files.

Starts a cluster on loopback (like tools/bench_cluster.py), lets CLIENTS processes create
empty files as fast as they can (client i on node i mod N), and reads each node's threads'
CPU time and context switches from /proc over a window of SECONDS in the middle of the
load. Prints them per created file: the node's main thread (the trio loop: FUSE, commit
protocol, LMDB applies) together with its kernel-invalidation thread (Python threads carry
the process's name), trio's worker threads (the durable log flush), and ZeroMQ's I/O
threads.

    .venv/bin/python tools/bench_threads.py [--nodes 3] [--clients 16] [--seconds 10]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from multiprocessing.queues import Queue
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cluster  # sibling scripts, not a package
import bench_fs

WARMUP_S = 2.0
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass
class ThreadUse:
    threads: int = 0
    cpu_s: float = 0.0
    switches: int = 0


def thread_kind(name: str, process_name: str) -> str:
    if name.startswith("ZMQ"):
        return "zeromq I/O"
    if name == process_name:  # Python does not name OS threads: its own threads too
        return "main + invalid."
    return "trio workers"  # trio names its cached threads after the job they run


def sample(pid: int) -> dict[str, ThreadUse]:
    """CPU seconds and context switches of each kind of thread of process `pid`."""
    use: dict[str, ThreadUse] = defaultdict(ThreadUse)
    with open(f"/proc/{pid}/comm") as f:
        process_name = f.read().strip()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                switches = sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except OSError:
            continue  # the thread ended meanwhile
        kind = use[thread_kind(name, process_name)]
        kind.threads += 1
        kind.cpu_s += (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime + stime
        kind.switches += switches
    return use


def creator(directory: str, stop_at_s: float, counts: Queue[int]) -> None:
    """Create empty files until `stop_at_s`; report how many."""
    os.makedirs(directory, exist_ok=True)
    created = 0
    while time.time() < stop_at_s:
        bench_cluster.create_empty(f"{directory}/f{created}")
        created += 1
    counts.put(created)


@dataclass
class Load:
    rate_per_s: float
    window_s: float
    before: dict[str, dict[str, ThreadUse]]  # by daemon, by kind of thread
    after: dict[str, dict[str, ThreadUse]]


def run_load(mountpoints: list[Path], pids: dict[str, int], clients: int,
             seconds: float) -> Load:
    """CLIENTS creators (client i on mountpoint i mod N); the daemons' threads sampled
    around a window of SECONDS in the middle of it."""
    ctx = multiprocessing.get_context("fork")
    counts: Queue[int] = ctx.Queue()
    load_start_s = time.time()
    stop_at_s = load_start_s + WARMUP_S + seconds + WARMUP_S
    procs = [ctx.Process(target=creator, args=(
        str(mountpoints[i % len(mountpoints)] / f"c{i:02d}"), stop_at_s, counts))
        for i in range(clients)]
    for proc in procs:
        proc.start()
    time.sleep(WARMUP_S)
    before = {name: sample(pid) for name, pid in pids.items()}
    start_s = time.time()
    time.sleep(seconds)
    window_s = time.time() - start_s
    after = {name: sample(pid) for name, pid in pids.items()}
    created = sum(counts.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(30)
    # the load is steady: the window's share
    return Load(created / (stop_at_s - load_start_s), window_s, before, after)


def measure(nodes: int, clients: int, seconds: float) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_threads-"))
    config = bench_cluster.Config(ops=1, clients=(clients,), pin_cpu=None,
                                  phase_limit_s=seconds)
    try:
        with bench_cluster.running_cluster(work, nodes, config) as cluster:
            pids = {node.name: node.proc.pid for node in cluster.nodes if node.proc}
            load = run_load([node.mountpoint for node in cluster.nodes], pids, clients, seconds)
            leader = cluster.leader
    finally:
        bench_cluster.remove_work(work, keep=False)
    print(f"{nodes} node(s), {clients} client(s): about {load.rate_per_s:,.0f} creates/s; "
          f"leader {leader}")
    print_threads(load)


def measure_passthrough(clients: int, seconds: float) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_threads-"))
    config = bench_fs.make_config(bench_fs.parse_args(["--only", "passthrough"]))
    try:
        with bench_fs.passthrough_target(work, config) as (mountpoint, pid):
            assert pid is not None
            load = run_load([mountpoint], {"pt": pid}, clients, seconds)
    finally:
        bench_cluster.remove_work(work, keep=False)
    print(f"passthrough, {clients} client(s): about {load.rate_per_s:,.0f} creates/s")
    print_threads(load)


def print_threads(load: Load) -> None:
    ops = load.rate_per_s * load.window_s
    before, after = load.before, load.after
    print(f"{'node':<5} {'threads':<18} {'count':>5} {'CPU us/create':>14} {'switches/create':>16}")
    for name in sorted(after):
        for kind in sorted(after[name]):
            now, then = after[name][kind], before[name].get(kind, ThreadUse())
            print(f"{name:<5} {kind:<18} {now.threads:>5} "
                  f"{1e6 * (now.cpu_s - then.cpu_s) / ops:>14,.0f} "
                  f"{(now.switches - then.switches) / ops:>16.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--passthrough", action="store_true",
                        help="the same load on tools/passthrough.py instead of a cluster")
    args = parser.parse_args()
    if args.passthrough:
        measure_passthrough(args.clients, args.seconds)
    else:
        measure(args.nodes, args.clients, args.seconds)


if __name__ == "__main__":
    main()
