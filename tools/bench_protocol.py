#!/usr/bin/env python3
"""Benchmark the file protocol: session opens, and I/O through the protocol beside a mount.

Usage: python tools/bench_protocol.py [--nodes 3] [--opens 200] [--size-mib 256]
                                      [--random-mib 64] [--seconds 5] [--workdir DIR]
                                      [--json] [--quick] [--keep]

Theory of operation: one run starts one cluster on loopback with tools/bench_cluster.py's
launcher (each node its own `clusterfs mount -f` process) and measures, in this process,
with `clusterfs.client.Client` under one trio loop:

1. Session opens in steady state. Each open is a new `Client` with its own client id,
   seeded with every member's address: entering it makes its ZeroMQ sockets, completes a
   CURVE handshake with every node, says Hello and sends the session request to every
   node, and returns when the one node chosen by the balancer (lb) accepts. Only the
   entering is timed (perf_counter_ns); the close comes after, untimed. A few untimed
   opens first warm the process (imports, the shared ZeroMQ context).
2. Session opens during a membership change: the same loop of opens runs while one more
   node is started with `--join` of the first node's address, from the join's start until
   its mount is live plus JOIN_TAIL_S (the window in which buckets move to the newcomer
   and the balancers ask each other who holds a session). Opens that fail, and session
   requests that had to be sent again (no answer within the client's OPEN_ATTEMPT_S, or a
   "busy, retry" from the balancer), are counted. The newcomer is then stopped by PID.
3. I/O throughput through the protocol beside the same workload through the FUSE mount of
   the node that holds the protocol session (both end on that node's `FileSystem` and the
   same backing directory, so the difference is the path: ZeroMQ + CURVE + msgspec + the
   trio loop, or the local link (a unix socket, no CURVE) when this process may use it,
   vs the kernel's FUSE + pyfuse3; the report says which). One call in flight at a time
   on both sides; the mount side uses plain os.open/os.pwrite/os.pread. Each side writes
   its own files: a sequential write in 1 MiB calls then fsync (both timed), and a
   sequential read in 1 MiB calls; then on a laid-out file, 4 KiB reads and writes at
   random aligned offsets (one seeded generator, the same offsets on both sides) for
   --seconds each: reads from a cold start, reads warm, then writes (not fsynced). "Cold"
   is after sync + echo 3 > /proc/sys/vm/drop_caches, which empties the mount's FUSE page
   cache and the node's backing-file cache alike (if it is not writable, the header says
   so). Cold random reads mostly measure the disk on the protocol side (nothing reads
   ahead of random 4 KiB preads) while the mount reads in 128 KiB requests and soon holds
   the whole file; warm ones (after one untimed sequential read through the same side)
   show each path's own cost: the protocol's a round trip to the node's backing-file
   cache, the mount's mostly its own page cache, which is part of what a mount offers.
   The side that goes first alternates from phase to phase.

This is done in this order, the membership change last, so that the I/O figures are not
measured beside a member that was just stopped. Every node is stopped by PID (SIGTERM, then
SIGKILL, then `umount -l` for a mount left behind), also on errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_cluster  # sibling script, not a package

from clusterfs.client import Client, ClientError
from clusterfs.credentials import Credentials, credentials_path, load_credentials
from clusterfs.protocol.messages import MAX_IO_BYTES

MIB = 1 << 20
SEQ_CALL_BYTES = MIB  # the FUSE mount's max_write: one call is one request on both sides
RANDOM_IO_BYTES = 4096
RANDOM_SEED = 4096
WARMUP_OPENS = 5
JOIN_TAIL_S = 2.0
# The I/O client's call timeout: past it the client takes the node for lost and re-routes;
# the fsync of a big sequential write can take longer than the library's 5 s default.
IO_CALL_TIMEOUT_S = 120.0
EXPECTED = (OSError, ClientError, bench_cluster.BenchError, subprocess.SubprocessError)
SIDES = ("protocol", "mount")
assert SEQ_CALL_BYTES <= MAX_IO_BYTES


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str


METRICS = (Metric("seq_write", "sequential write, 1 MiB calls, + fsync", "MiB/s"),
           Metric("seq_read", "sequential read, 1 MiB calls", "MiB/s"),
           Metric("rand_read_cold", "4 KiB random read, cold start", "IOPS"),
           Metric("rand_read_warm", "4 KiB random read, warm", "IOPS"),
           Metric("rand_write", "4 KiB random write", "IOPS"))


@dataclass(frozen=True)
class Settings:
    nodes: int
    opens: int
    size_mib: int
    random_mib: int
    seconds: float
    can_drop_caches: bool


def log(msg: str) -> None:
    print(f"bench_protocol: {msg}", file=sys.stderr, flush=True)


def drop_caches() -> bool:
    """sync, then drop the page cache, dentries and inodes; False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


# ----- session opens ----------------------------------------------------------------------


@dataclass
class Opens:
    """The session opens of one phase."""

    latencies_ns: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    retries: int = 0
    window_s: float = 0.0
    join_mount_s: float | None = None  # the membership phase: the newcomer's mount time

    def to_json(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ns)
        figures: dict[str, Any] = {
            "opens": len(ordered), "failures": len(self.failures), "retries": self.retries,
            "p50_ms": bench_cluster.percentile(ordered, 50),
            "p99_ms": bench_cluster.percentile(ordered, 99),
            "max_ms": ordered[-1] / 1e6 if ordered else 0.0,
            "window_s": self.window_s, "failure_messages": sorted(set(self.failures))[:5]}
        if self.join_mount_s is not None:
            figures["join_mount_s"] = self.join_mount_s
        return figures


async def open_once(addresses: list[str], credentials: Credentials, client_id: str,
                    opens: Opens | None) -> None:
    """Open a session (timed into `opens`, unless None: a warm-up) and close it."""
    client = Client(addresses, credentials, client_id)
    start_ns = time.perf_counter_ns()
    entered = False
    try:
        await client.__aenter__()
        entered = True
    except* (ClientError, OSError) as group:
        if opens is not None:
            opens.failures += [f"{type(e).__name__}: {e}" for e in leaves(group)]
    elapsed_ns = time.perf_counter_ns() - start_ns
    if opens is not None:
        opens.retries += client.session_retries
        if entered:
            opens.latencies_ns.append(elapsed_ns)
    if entered:
        await client.__aexit__(None, None, None)


def leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


async def steady_opens(addresses: list[str], credentials: Credentials, count: int) -> Opens:
    run = uuid.uuid4().hex[:8]  # client ids never seen by the balancers before
    for i in range(WARMUP_OPENS):
        await open_once(addresses, credentials, f"bench-warm-{run}-{i}", None)
    opens = Opens()
    start_s = time.perf_counter()
    for i in range(count):
        await open_once(addresses, credentials, f"bench-steady-{run}-{i}", opens)
    opens.window_s = time.perf_counter() - start_s
    return opens


async def open_forever(addresses: list[str], credentials: Credentials, opens: Opens) -> None:
    run = uuid.uuid4().hex[:8]
    for i in itertools.count():
        await open_once(addresses, credentials, f"bench-join-{run}-{i}", opens)


async def opens_during_join(cluster: bench_cluster.Cluster, addresses: list[str],
                            credentials: Credentials) -> Opens:
    """Open sessions one after another while one more node joins (see the docstring)."""
    first = cluster.nodes[0]
    newcomer = bench_cluster.Node(f"n{len(cluster.nodes) + 1}", first.mountpoint.parent,
                                  first.blocks, None)
    cluster.nodes.append(newcomer)  # so that the cluster's clean-up stops it on any error
    opens = Opens()
    start_s = time.perf_counter()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_forever, addresses, credentials, opens)
            await start_joiner(newcomer, first.listen)
            opens.join_mount_s = time.perf_counter() - start_s
            log(f"{newcomer.name} mounted after {opens.join_mount_s:.2f} s; "
                f"{len(opens.latencies_ns)} opens so far")
            await trio.sleep(JOIN_TAIL_S)
            nursery.cancel_scope.cancel()  # the open in progress is not counted
        opens.window_s = time.perf_counter() - start_s
    finally:
        await trio.to_thread.run_sync(newcomer.stop)  # SIGTERM, then SIGKILL; by PID
    return opens


async def start_joiner(node: bench_cluster.Node, contact: str) -> None:
    """Start `node` with --join `contact` and wait, without blocking the opens, until its
    mount is live. (bench_cluster.Node.start blocks: it would stop the open loop.)"""
    node.listen = f"127.0.0.1:{bench_cluster.free_port()}"
    argv = node.argv(contact)
    log(f"{node.name}: {shlex.join(argv)}")
    with open(node.log_path, "ab") as log_file:
        node.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
    with trio.move_on_after(bench_cluster.MOUNT_WAIT_S):
        while not os.path.ismount(node.mountpoint):
            if node.proc.poll() is not None:
                raise bench_cluster.BenchError(f"{node.name} exited {node.proc.returncode} "
                                               f"before mounting: {node.log_tail()}")
            await trio.sleep(0.02)
        return
    raise bench_cluster.BenchError(f"{node.name} not mounted after "
                                   f"{bench_cluster.MOUNT_WAIT_S:.0f} s: {node.log_tail()}")


# ----- the two I/O paths ------------------------------------------------------------------


class ProtocolFile:
    """A file of the cluster namespace through the session of `client`."""

    def __init__(self, client: Client, path: str) -> None:
        self.client, self.path = client, path
        self.handle = 0

    async def open(self, flags: int) -> None:
        self.handle = await self.client.open(self.path, flags, 0o644)

    async def pwrite(self, data: bytes, offset: int) -> int:
        return await self.client.write(self.handle, offset, data)

    async def pread(self, size: int, offset: int) -> bytes:
        return await self.client.read(self.handle, offset, size)

    async def fsync(self) -> None:
        await self.client.fsync(self.handle)

    async def close(self) -> None:
        await self.client.close(self.handle)


class MountFile:
    """A file through the FUSE mount: plain blocking syscalls (inline on purpose: one call
    in flight, as on the protocol side, and no thread hand-off in the timed path)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    async def open(self, flags: int) -> None:
        self.fd = os.open(self.path, flags, 0o644)

    async def pwrite(self, data: bytes, offset: int) -> int:
        return os.pwrite(self.fd, data, offset)

    async def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    async def fsync(self) -> None:
        os.fsync(self.fd)

    async def close(self) -> None:
        os.close(self.fd)


File = ProtocolFile | MountFile
WRITE_FLAGS = os.O_CREAT | os.O_TRUNC | os.O_WRONLY


@dataclass
class Figure:
    rate: float  # MiB/s or IOPS
    done: int  # MiB or I/Os


async def write_sequential(file: File, size_mib: int, fsync_timed: bool) -> float:
    """Write `size_mib` MiB in 1 MiB calls (and fsync); the seconds it took."""
    buf = os.urandom(SEQ_CALL_BYTES)
    await file.open(WRITE_FLAGS)
    try:
        start_s = time.perf_counter()
        for k in range(size_mib * MIB // SEQ_CALL_BYTES):
            if await file.pwrite(buf, k * SEQ_CALL_BYTES) != SEQ_CALL_BYTES:
                raise bench_cluster.BenchError(f"short write to {file.path}")
        if fsync_timed:
            await file.fsync()
        return time.perf_counter() - start_s
    finally:
        await file.close()


async def seq_write(file: File, s: Settings) -> Figure:
    elapsed_s = await write_sequential(file, s.size_mib, fsync_timed=True)
    return Figure(s.size_mib / elapsed_s, s.size_mib)


async def read_sequential(file: File, size_mib: int) -> float:
    """Read `size_mib` MiB in 1 MiB calls; the seconds it took."""
    await file.open(os.O_RDONLY)
    try:
        start_s = time.perf_counter()
        for k in range(size_mib * MIB // SEQ_CALL_BYTES):
            if len(await file.pread(SEQ_CALL_BYTES, k * SEQ_CALL_BYTES)) != SEQ_CALL_BYTES:
                raise bench_cluster.BenchError(f"short read of {file.path}")
        return time.perf_counter() - start_s
    finally:
        await file.close()


async def seq_read(file: File, s: Settings) -> Figure:
    drop_caches_if(s)  # cold: both sides read the backing file from the disk
    elapsed_s = await read_sequential(file, s.size_mib)
    return Figure(s.size_mib / elapsed_s, s.size_mib)


def drop_caches_if(s: Settings) -> None:
    if s.can_drop_caches:
        drop_caches()


async def random_io(file: File, s: Settings, write: bool) -> Figure:
    """4 KiB I/Os at random aligned offsets for `s.seconds`; the rate of what completed."""
    blocks = s.random_mib * MIB // RANDOM_IO_BYTES
    rng = random.Random(RANDOM_SEED)  # the same offsets on both sides
    buf = os.urandom(RANDOM_IO_BYTES)
    await file.open(os.O_RDWR)
    try:
        done = 0
        start_s = time.perf_counter()
        deadline_s = start_s + s.seconds
        while time.perf_counter() < deadline_s:
            offset = rng.randrange(blocks) * RANDOM_IO_BYTES
            if write:
                n = await file.pwrite(buf, offset)
            else:
                n = len(await file.pread(RANDOM_IO_BYTES, offset))
            if n != RANDOM_IO_BYTES:
                raise bench_cluster.BenchError(f"short I/O on {file.path} at {offset}")
            done += 1
        elapsed_s = time.perf_counter() - start_s
    finally:
        await file.close()
    return Figure(done / elapsed_s, done)


async def rand_read_cold(file: File, s: Settings) -> Figure:
    await write_sequential(file, s.random_mib, fsync_timed=True)  # the layout, untimed
    drop_caches_if(s)
    return await random_io(file, s, write=False)


async def rand_read_warm(file: File, s: Settings) -> Figure:
    drop_caches_if(s)  # then each side fills its own caches, through its own path
    await read_sequential(file, s.random_mib)
    return await random_io(file, s, write=False)


async def rand_write(file: File, s: Settings) -> Figure:
    return await random_io(file, s, write=True)


PHASES: dict[str, Callable[[File, Settings], Awaitable[Figure]]] = {
    "seq_write": seq_write, "seq_read": seq_read, "rand_read_cold": rand_read_cold,
    "rand_read_warm": rand_read_warm, "rand_write": rand_write}


@dataclass
class Throughput:
    node: str = ""  # the node holding the session, whose mount is the other side
    link: str = ""  # how this process reached it
    figures: dict[str, dict[str, Figure]] = field(default_factory=dict)  # metric -> side


async def throughput(cluster: bench_cluster.Cluster, addresses: list[str],
                     credentials: Credentials, s: Settings, out: Throughput) -> None:
    async with Client(addresses, credentials, f"bench-io-{uuid.uuid4().hex[:8]}",
                      call_timeout_s=IO_CALL_TIMEOUT_S) as client:
        assert client.session is not None
        out.node = client.session.node
        out.link = "the local link (a unix socket)" if client.local_link \
            else "loopback TCP with CURVE"
        node = next(n for n in cluster.nodes if n.name == out.node)
        kinds = ("seq", "rand")  # a file per kind of phase and side, in the same namespace
        protocol = {kind: ProtocolFile(client, f"/bench-protocol-{kind}") for kind in kinds}
        mount = {kind: MountFile(node.mountpoint / f"bench-mount-{kind}") for kind in kinds}
        for k, (key, phase) in enumerate(PHASES.items()):
            kind = key.split("_")[0]
            for side in SIDES if k % 2 == 0 else SIDES[::-1]:
                fig = await phase(protocol[kind] if side == "protocol" else mount[kind], s)
                out.figures.setdefault(key, {})[side] = fig
                log(f"{key} {side}: {fig.rate:,.1f} ({fig.done} done)")
        for kind in kinds:
            await client.unlink(protocol[kind].path)
            os.unlink(mount[kind].path)


# ----- one run ----------------------------------------------------------------------------


@dataclass
class Report:
    header: list[str] = field(default_factory=list)
    steady: Opens | None = None
    during_join: Opens | None = None
    io: Throughput = field(default_factory=Throughput)
    sessions_left: int | None = None  # on the nodes after the steady opens were closed
    errors: list[str] = field(default_factory=list)
    node_logs: dict[str, list[str]] = field(default_factory=dict)


async def guarded(report: Report, what: str, fn: Callable[[], Awaitable[None]]) -> None:
    """Run one measurement; an expected failure is reported and the next one still runs."""
    try:
        await fn()
    except* EXPECTED as group:
        for exc in leaves(group):
            report.errors.append(f"{what}: {type(exc).__name__}: {exc}")
            log(report.errors[-1])


async def measure(cluster: bench_cluster.Cluster, credentials: Credentials, s: Settings,
                  report: Report) -> None:
    addresses = [node.listen for node in cluster.nodes]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupt_on, signals)

            async def steady() -> None:
                log(f"{s.opens} session opens in steady state")
                report.steady = await steady_opens(addresses, credentials, s.opens)
                report.sessions_left = await trio.to_thread.run_sync(sessions_open, cluster)

            async def io() -> None:
                log("I/O through the protocol and through the mount")
                await throughput(cluster, addresses, credentials, s, report.io)

            async def join() -> None:
                log("session opens while a node joins")
                report.during_join = await opens_during_join(cluster, addresses, credentials)

            for what, fn in (("steady opens", steady), ("I/O", io), ("join", join)):
                await guarded(report, what, fn)
            nursery.cancel_scope.cancel()


async def interrupt_on(signals: AsyncIterator[int]) -> None:
    """SIGTERM or SIGHUP inside the trio loop: as Ctrl-C (trio delivers that one itself)."""
    async for signum in signals:
        raise KeyboardInterrupt(f"signal {signum}")


def sessions_open(cluster: bench_cluster.Cluster) -> int:
    status = bench_cluster.cluster_status(cluster.nodes[0])
    return sum(int(n.get("sessions", 0)) for n in status["nodes"])


def bench(work: Path, s: Settings) -> Report:
    report = Report()
    # The launcher reads only pin_cpu; the rest is bench_cluster's own workload.
    cfg = bench_cluster.Config(ops=1, clients=(1,), pin_cpu=None, phase_limit_s=1.0)
    clusters: dict[int, bench_cluster.Cluster] = {}
    try:
        with bench_cluster.running_cluster(work, s.nodes, cfg) as cluster:
            clusters[s.nodes] = cluster
            report.header = header_lines(s, work, cluster)
            credentials = load_credentials(credentials_path(cluster.nodes[0].blocks))
            run_trio(measure, cluster, credentials, s, report)
    except EXPECTED as exc:
        report.errors.append(f"cluster: {type(exc).__name__}: {exc}")
    report.node_logs = bench_cluster.scan_logs(clusters)  # after the nodes stopped
    return report


def run_trio(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """trio.run, with a Ctrl-C or SIGTERM that arrives wrapped in an exception group (trio's
    nurseries wrap what they raise) raised bare, as the clean-up outside expects."""
    try:
        trio.run(fn, *args)
    except BaseExceptionGroup as group:
        interrupt = group.subgroup(KeyboardInterrupt)
        if interrupt is None:
            raise
        raise leaves(interrupt)[0] from group


# ----- reporting ----------------------------------------------------------------------------


def header_lines(s: Settings, work: Path, cluster: bench_cluster.Cluster) -> list[str]:
    cpus = sorted(os.sched_getaffinity(0))
    cold = ("cold = after sync + echo 3 > /proc/sys/vm/drop_caches (the mount's FUSE page "
            "cache and the node's backing-file cache alike)" if s.can_drop_caches else
            "NOT dropped: /proc/sys/vm/drop_caches is not writable; 'cold' reads are not")
    return [
        f"command: {shlex.join(sys.orig_argv)}",
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %z')}; host: {platform.node()}; "
        f"kernel: {platform.release()}; python {platform.python_version()}; "
        f"{os.cpu_count()} CPUs; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"pinned: no (CPUs {cpus} of {os.cpu_count()})",
        f"work dir: {work} ({bench_cluster.fs_type(work)})",
        f"cluster on loopback: members {', '.join(n.name for n in cluster.nodes)}, leader "
        f"{cluster.leader or '?'}, epoch {cluster.epoch}",
        f"session opens: a new Client each (own id, seeded with the address of every "
        f"member before the join), "
        f"entering timed; {s.opens} in steady state after {WARMUP_OPENS} untimed",
        f"during a join: opens one after another from the start of node "
        f"n{s.nodes + 1} (--join n1) until its mount is live + {JOIN_TAIL_S:g} s; retries = "
        "session requests sent again (no answer within 1 s, or busy)",
        f"I/O: one session, one call in flight, vs os.pread/os.pwrite on the mount of the "
        f"session's node; sequential {s.size_mib} MiB in 1 MiB calls (write timed with its "
        f"fsync, read cold); random 4 KiB on a {s.random_mib} MiB file, {s.seconds:g} s per "
        "phase: reads from a cold start, reads warm (after one untimed sequential read "
        "through the same side), writes (not fsynced); the side going first alternates",
        f"caches: {cold}",
    ]


def ratio(fig: dict[str, Figure]) -> float | None:
    if "protocol" in fig and "mount" in fig and fig["mount"].rate > 0:
        return fig["protocol"].rate / fig["mount"].rate
    return None


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}" if r >= 0.1 else f"{r:.4f}"


def open_lines(report: Report) -> list[str]:
    lines = ["session open             opens  p50 ms  p99 ms  max ms  retries  failures"]
    for label, opens in (("steady state", report.steady), ("during a join", report.during_join)):
        if opens is None:
            lines.append(f"{label:<24} -")
            continue
        f = opens.to_json()
        lines.append(f"{label:<24} {f['opens']:>5} {f['p50_ms']:>7.2f} {f['p99_ms']:>7.2f} "
                     f"{f['max_ms']:>7.2f} {f['retries']:>8} {f['failures']:>9}")
    join = report.during_join
    if join is not None and join.join_mount_s is not None:
        lines.append(f"  (the join: mount live after {join.join_mount_s:.2f} s; window "
                     f"{join.window_s:.2f} s)")
    if report.sessions_left is not None:
        lines.append(f"  (sessions still open on the nodes after the steady opens were "
                     f"closed: {report.sessions_left})")
    return lines


def io_lines(report: Report) -> list[str]:
    title = f"I/O, session on {report.io.node or '?'}"
    lines = [f"I/O session reached over {report.io.link or '?'}",
             f"{title:<42} unit     protocol      mount  prot/mount"]
    for metric in METRICS:
        fig = report.io.figures.get(metric.key, {})
        cells = [f"{fig[side].rate:>10,.1f}" if side in fig else f"{'-':>10}" for side in SIDES]
        lines.append(f"{metric.label:<42} {metric.unit:<6} {cells[0]} {cells[1]} "
                     f"{fmt_ratio(ratio(fig)):>11}")
    return lines


def table_lines(report: Report) -> list[str]:
    lines = [*report.header, "", *open_lines(report), "", *io_lines(report)]
    for node, problems in report.node_logs.items():
        lines.append(f"node log {node}: {len(problems)} warning/error line(s)")
        lines += [f"  {p[:200]}" for p in problems[:5]]
    return lines + [f"! {e}" for e in report.errors]


def json_report(report: Report, s: Settings) -> dict[str, Any]:
    return {
        "header": report.header,
        "settings": {"nodes": s.nodes, "opens": s.opens, "size_mib": s.size_mib,
                     "random_mib": s.random_mib, "seconds": s.seconds,
                     "caches_dropped": s.can_drop_caches},
        "session_open": {"steady": report.steady.to_json() if report.steady else None,
                         "during_join": (report.during_join.to_json() if report.during_join
                                         else None)},
        "sessions_left_after_close": report.sessions_left,
        "io_node": report.io.node,
        "io_link": report.io.link,
        "io": {m.key: io_json(m, report.io.figures.get(m.key, {})) for m in METRICS},
        "errors": report.errors,
        "node_logs": report.node_logs,
    }


def io_json(metric: Metric, fig: dict[str, Figure]) -> dict[str, Any]:
    return {"unit": metric.unit, **{side: fig[side].rate for side in SIDES if side in fig},
            "ratio": ratio(fig)}


# ----- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="File protocol: session opens; I/O vs a mount.")
    p.add_argument("--nodes", type=int, default=3, help="cluster size (default 3)")
    p.add_argument("--opens", type=int, default=200,
                   help="session opens in steady state (default 200)")
    p.add_argument("--size-mib", type=int, default=256,
                   help="sequential file size per side (default 256)")
    p.add_argument("--random-mib", type=int, default=64,
                   help="random I/O file size per side (default 64)")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="duration of each random I/O phase per side (default 5)")
    p.add_argument("--workdir", default="/tmp", help="parent of the scratch directory")
    p.add_argument("--json", action="store_true", help="print a JSON object, not the table")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (a smoke test): 20 opens, 8 MiB, 4 MiB, 0.5 s")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        args.opens, args.size_mib, args.random_mib, args.seconds = 20, 8, 4, 0.5
    if min(args.nodes, args.opens, args.size_mib, args.random_mib) < 1 or args.seconds <= 0:
        raise SystemExit("bench_protocol: --nodes, --opens, --size-mib, --random-mib and "
                         "--seconds must be positive")
    return Settings(nodes=args.nodes, opens=args.opens, size_mib=args.size_mib,
                    random_mib=args.random_mib, seconds=args.seconds,
                    can_drop_caches=drop_caches())


def missing_figures(report: Report) -> list[str]:
    """The figures a complete run has and this one lacks (the exit status says so)."""
    missing = [f"session opens {label}" for label, opens in
               (("in steady state", report.steady), ("during a join", report.during_join))
               if opens is None or not opens.latencies_ns]
    return missing + [f"{m.key} {side}" for m in METRICS for side in SIDES
                      if side not in report.io.figures.get(m.key, {})]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    s = make_settings(args)
    bench_cluster.interrupt_on_stop_signals()  # inside trio, `measure`'s handlers do
    work = Path(tempfile.mkdtemp(prefix="bench_protocol-", dir=args.workdir))
    log(f"command: {shlex.join(sys.orig_argv)}; work dir {work}")
    started_s = time.monotonic()
    try:
        report = bench(work, s)
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc or 'SIGINT'}); cleaned up")
        return 130
    finally:
        bench_cluster.remove_work(work, args.keep)
    log(f"done in {time.monotonic() - started_s:.0f} s")
    report.errors += [f"no figure: {what}" for what in missing_figures(report)]
    if args.json:
        print(json.dumps(json_report(report, s), indent=2))
    else:
        print("\n".join(table_lines(report)))
    return 1 if report.errors else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
