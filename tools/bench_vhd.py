"""Benchmark VHD I/O: sequential 1 MiB and random 4 KiB reads/writes, in one run, on
a fixed and a dynamic image, through four layers:

  raw      os.pread/os.pwrite on the image file's data bytes (the floor)
  image    vhdshare.image (FixedImage/DynamicImage) read/write by sector
  target   vhdshare.target.Target executing READ(16)/WRITE(16) CDBs on that image
  tunnel   the same CDBs from a VM host's vhdshare.host.RemoteDisk, through the file
           protocol to a node whose unpacker runs them on a VHD in the block directory

Theory of operation. Each layer starts from a fresh file: "first-write" is sequential 1 MiB
writes into never-written space (a sparse plain file for raw; for a dynamic disk this
includes block allocation, one fdatasync per new 2 MiB block). The rest of the disk is then
filled untimed, and the other workloads are overwrites and reads. The raw layer's other
workloads run last on the file the last local VHD layer used, over the bytes where the
disk's data lies (the blocks region for a dynamic disk). Local data stays in the page cache
(no O_DIRECT, no fsync in the timed loops): software overhead. Every case is time-bounded;
the local layers' runs are interleaved (workload, repeat, layer), so noise hits them alike.

The tunnel layer needs a cluster, started on loopback with tools/bench_cluster.py's launcher
(--nodes, default 1: the data path involves only the session's node; each node is its own
`clusterfs mount -f` process, its block directory beside the local images). For each kind of
disk, after its local layers, a fresh VHD is made with create_image through the first node's
FUSE mount, attached with RemoteDisk.attach by its cluster path, and the same workloads run
on it: the same seeded offsets, time bound and best-of rule, one command in flight. The
client is async (trio), so a disk's whole tunnel measurement runs in one trio.run, NOT
interleaved with the local layers' repeats: a change in the machine's load between the two
shows in "tunnel/target" (the ratio to the SCSI target on the local file). The node's
unpacker opens disks with O_DIRECT where the file system takes it, so the tunnel's figures
include the storage device; the header says how the node had the file open (its
/proc/PID/fdinfo flags, read after the run: the unpacker keeps an idle disk open a minute).
Every node is stopped by PID (SIGTERM, SIGKILL, `umount -l`), also on errors, Ctrl-C and
SIGTERM. If `clusterfs mount` cannot run (no /dev/fuse, or the node does not mount) a `#`
line says the tunnel columns are left out, and why; --no-tunnel skips the cluster. Then, on
the same cluster, tools/bench_vhd_frontends.py's front ends (`vhdshare attach` over NBD and
iSCSI beside qemu-nbd and tgtd) print their own table (--no-frontends skips them). --json
prints one JSON object of all figures instead of the tables.

    .venv/bin/python tools/bench_vhd.py [--size-mib 128] [--seconds 1.5] [--pin CPU]
                        [--nodes 1] [--no-tunnel] [--no-frontends] [--json] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_cluster  # sibling scripts, not a package
import bench_vhd_frontends as frontends
from bench_vhd_frontends import Result, best

from clusterfs.blockdir import BlockDir
from clusterfs.credentials import Credentials, credentials_path, load_credentials
from vhdshare import directio
from vhdshare import initiator as cdbs
from vhdshare.blockimage import SECTOR_SIZE, BlockImage
from vhdshare.dynamic import DynamicImage
from vhdshare.host import DiskError, RemoteDisk, ScsiError
from vhdshare.image import VhdError, VhdImage, create_image, open_image
from vhdshare.target import Target

SEQ_BYTES = 1 << 20
RAND_BYTES = 4096
KINDS = ("fixed", "dynamic")
WORKLOADS = ("seq-write", "seq-read", "rand-write", "rand-read")
REPEATS = 3
DEADLINE_CHECK_OPS = 16  # the clock is read every this many I/Os
FILL = bytes(range(256)) * (SEQ_BYTES // 256)
INITIATOR = "iqn.2025-01.clusterfs.bench:bench-vhd"
TUNNEL_ERRORS = (DiskError, ScsiError, VhdError, OSError)
CLUSTER_ERRORS = (bench_cluster.BenchError, OSError, subprocess.SubprocessError)


def log(msg: str) -> None:
    print(f"bench_vhd: {msg}", file=sys.stderr, flush=True)


# ----- one case: its I/Os and its clock (shared by the local layers and the tunnel) --------


class Plan:
    """The I/Os of one workload: size, kind, offsets (seeded: the same on every layer)."""

    def __init__(self, workload: str, size_bytes: int) -> None:
        self.rng = random.Random(7)
        self.seq = workload.startswith("seq")
        self.writes = workload.endswith("write")
        self.io_bytes = SEQ_BYTES if self.seq else RAND_BYTES
        self.slots = size_bytes // self.io_bytes
        self.data = os.urandom(self.io_bytes)

    def offset(self, index: int) -> int:
        """Sequential ones wrap around the disk."""
        return (index % self.slots if self.seq else self.rng.randrange(self.slots)) \
            * self.io_bytes


class Clock:
    """Counts the I/Os of a case until `seconds` pass, or `limit_ops` are done."""

    def __init__(self, seconds: float, limit_ops: int | None = None) -> None:
        self.ops = 0
        self.limit_ops = limit_ops
        self.start_s = time.perf_counter()
        self.deadline_s = self.start_s + seconds

    def tick(self) -> bool:
        """One more I/O done; True when the case is over."""
        self.ops += 1
        return (self.limit_ops is not None and self.ops >= self.limit_ops) or (
            self.ops % DEADLINE_CHECK_OPS == 0 and time.perf_counter() >= self.deadline_s)

    def result(self, io_bytes: int) -> Result:
        return Result(self.ops, self.ops * io_bytes, time.perf_counter() - self.start_s)


# ----- the local layers (synchronous) ---------------------------------------------------


class Layer:
    """One way of doing I/O at byte offsets of the virtual disk."""

    def read(self, offset_bytes: int, length_bytes: int) -> None:
        raise NotImplementedError

    def write(self, offset_bytes: int, data: bytes) -> None:
        raise NotImplementedError


class RawLayer(Layer):
    def __init__(self, path: Path, base_bytes: int) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.base_bytes = base_bytes

    def read(self, offset_bytes: int, length_bytes: int) -> None:
        os.pread(self.fd, length_bytes, self.base_bytes + offset_bytes)

    def write(self, offset_bytes: int, data: bytes) -> None:
        os.pwrite(self.fd, data, self.base_bytes + offset_bytes)

    def close(self) -> None:
        os.close(self.fd)


class ImageLayer(Layer):
    def __init__(self, image: BlockImage) -> None:
        self.image = image

    def read(self, offset_bytes: int, length_bytes: int) -> None:
        self.image.read(offset_bytes // SECTOR_SIZE, length_bytes // SECTOR_SIZE)

    def write(self, offset_bytes: int, data: bytes) -> None:
        self.image.write(offset_bytes // SECTOR_SIZE, data)


class TargetLayer(Layer):
    """READ(16)/WRITE(16) through vhdshare.target.Target (the CDBs RemoteDisk sends)."""

    def __init__(self, image: BlockImage) -> None:
        self.target = Target(image, "bench-disk")

    def read(self, offset_bytes: int, length_bytes: int) -> None:
        cdb = cdbs.read16(offset_bytes // SECTOR_SIZE, length_bytes // SECTOR_SIZE)
        response = self.target.execute("bench", cdb)
        if response.status != 0:
            raise RuntimeError(f"READ(16) failed: {response}")

    def write(self, offset_bytes: int, data: bytes) -> None:
        cdb = cdbs.write16(offset_bytes // SECTOR_SIZE, len(data) // SECTOR_SIZE)
        response = self.target.execute("bench", cdb, data)
        if response.status != 0:
            raise RuntimeError(f"WRITE(16) failed: {response}")


def run_workload(layer: Layer, workload: str, size_bytes: int, seconds: float,
                 one_pass: bool = False) -> Result:
    """Run `workload` until `seconds` pass (or, if `one_pass`, every slot is written once)."""
    plan = Plan(workload, size_bytes)
    clock = Clock(seconds, plan.slots if one_pass else None)
    for index in itertools.count():
        if plan.writes:
            layer.write(plan.offset(index), plan.data)
        else:
            layer.read(plan.offset(index), plan.io_bytes)
        if clock.tick():
            break
    return clock.result(plan.io_bytes)


def prefill(layer: Layer, done_bytes: int, size_bytes: int) -> None:
    """Write the rest of the disk (untimed), so later writes are overwrites everywhere."""
    for offset in range(done_bytes, size_bytes, SEQ_BYTES):
        layer.write(offset, FILL)


def first_write(layer: Layer, size_bytes: int, seconds: float) -> Result:
    """Sequential writes into never-written space, then the rest filled untimed."""
    result = run_workload(layer, "seq-write", size_bytes, seconds, one_pass=True)
    prefill(layer, result.bytes_done, size_bytes)
    return result


def bench_disk(kind: str, workdir: Path, size_bytes: int, seconds: float
               ) -> dict[str, dict[str, Result]]:
    """raw, image and target layers, each on its own fresh file of `kind`.

    Runs are interleaved (workload, repeat, layer), so noise hits all layers alike.
    """
    plain = workdir / f"{kind}.raw"
    plain.write_bytes(b"")
    os.truncate(plain, size_bytes)
    plain_layer = RawLayer(plain, 0)
    results = {"raw": {"first-write": first_write(plain_layer, size_bytes, seconds)}}
    plain_layer.close()
    plain.unlink()
    names = ["raw", "image", "target"]
    images: list[VhdImage] = []
    layers: dict[str, Layer] = {}
    for name in names:
        path = workdir / f"{kind}-{name}.vhd"
        create_image(path, size_bytes, kind)
        image = open_image(path, writable=True)
        images.append(image)
        if name == "raw":  # blocks allocated through the image, then plain I/O on its data
            prefill(ImageLayer(image), 0, size_bytes)
            image.flush()
            layers[name] = RawLayer(path, data_base_bytes(image))
            continue
        layer = ImageLayer(image) if name == "image" else TargetLayer(image)
        layers[name] = layer
        results[name] = {"first-write": first_write(layer, size_bytes, seconds)}
    for workload in WORKLOADS:
        runs: dict[str, list[Result]] = {name: [] for name in names}
        for _ in range(REPEATS):
            for name in names:
                runs[name].append(run_workload(layers[name], workload, size_bytes,
                                               seconds / REPEATS))
        for name in names:
            results[name][workload] = best(runs[name])
    for image in images:
        image.close()
    return results


def data_base_bytes(image: BlockImage) -> int:
    """Where the disk's bytes start in the file: 0 for fixed, after the BAT for dynamic."""
    if not isinstance(image, DynamicImage):
        return 0
    table_end = image.header.table_offset + image.header.max_table_entries * 4
    return -(-table_end // SECTOR_SIZE) * SECTOR_SIZE


# ----- the tunnel layer (async: one trio.run per disk) ------------------------------------


async def run_tunnel_workload(disk: RemoteDisk, workload: str, size_bytes: int,
                              seconds: float, one_pass: bool = False) -> Result:
    """`run_workload` through the tunnel: the same offsets and clock, one command in flight."""
    plan = Plan(workload, size_bytes)
    clock = Clock(seconds, plan.slots if one_pass else None)
    blocks = plan.io_bytes // SECTOR_SIZE
    for index in itertools.count():
        if plan.writes:
            await disk.write(plan.offset(index) // SECTOR_SIZE, plan.data)
        else:
            await disk.read(plan.offset(index) // SECTOR_SIZE, blocks)
        if clock.tick():
            break
    return clock.result(plan.io_bytes)


async def tunnel_first_write(disk: RemoteDisk, size_bytes: int, seconds: float) -> Result:
    result = await run_tunnel_workload(disk, "seq-write", size_bytes, seconds, one_pass=True)
    for offset in range(result.bytes_done, size_bytes, SEQ_BYTES):  # the rest, untimed
        await disk.write(offset // SECTOR_SIZE, FILL)
    return result


@dataclass
class Tunnel:
    """A running cluster and what a VM host needs to reach it."""

    cluster: bench_cluster.Cluster
    credentials: Credentials
    node: str = ""  # the node that served the last disk's session
    open_modes: dict[str, str] = field(default_factory=dict)  # disk kind -> how the node has it
    link: str = "?"  # how this process reaches the node (while the cluster runs)

    def measure(self, kind: str, size_bytes: int, seconds: float) -> dict[str, Result]:
        """Every workload on a fresh disk of `kind` in the cluster, in one trio.run."""
        local_path = self.cluster.nodes[0].mountpoint / f"bench-vhd-{kind}.vhd"
        create_image(local_path, size_bytes, kind)
        backing = BlockDir(self.cluster.nodes[0].blocks, "").path(local_path.stat().st_ino)
        results: dict[str, Result] = {}
        run_trio(self._measure, f"/{local_path.name}", size_bytes, seconds, results)
        self.open_modes[kind] = self._open_mode(backing)
        self.link = frontends.link_to(self.cluster.nodes[0])
        return results

    def _open_mode(self, backing: str) -> str:
        """How the session's node has `backing` open: "O_DIRECT", "buffered", or "?" (the
        unpacker keeps an idle disk open for a while after the session ends)."""
        node = next((n for n in self.cluster.nodes if n.name == self.node), None)
        if node is None or node.proc is None or node.proc.poll() is not None:
            return "?"
        flags = fd_flags(node.proc.pid, backing)
        return "?" if not flags else (
            "O_DIRECT" if any(f & directio.O_DIRECT for f in flags) else "buffered")

    async def _measure(self, path: str, size_bytes: int, seconds: float,
                       out: dict[str, Result]) -> None:
        addresses = [node.listen for node in self.cluster.nodes]
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(interrupt_on, signals)
                async with RemoteDisk.attach(addresses, self.credentials, path,
                                             INITIATOR) as disk:
                    self.node = disk.node or "?"
                    out["first-write"] = await tunnel_first_write(disk, size_bytes, seconds)
                    for workload in WORKLOADS:
                        out[workload] = best([await run_tunnel_workload(
                            disk, workload, size_bytes, seconds / REPEATS)
                            for _ in range(REPEATS)])
                nursery.cancel_scope.cancel()


def fd_flags(pid: int, path: str) -> list[int]:
    """The open flags of each file descriptor of process `pid` on `path`."""
    flags = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    flags += [int(line.split()[1], 8) for line in f if line.startswith("flags:")]
    return flags


async def interrupt_on(signals: AsyncIterator[int]) -> None:
    """SIGTERM or SIGHUP inside the trio loop: as Ctrl-C (trio delivers that one itself)."""
    async for signum in signals:
        raise KeyboardInterrupt(f"signal {signum}")


def run_trio(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """trio.run, with what the nursery wraps in an exception group raised bare (a Ctrl-C
    first): only one task does the work, so there is one error at most besides it."""
    try:
        trio.run(fn, *args)
    except BaseExceptionGroup as group:
        raise leaves(group.subgroup(KeyboardInterrupt) or group)[0] from group


def leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


@contextlib.contextmanager
def tunnel_cluster(workdir: Path, args: argparse.Namespace, notes: list[str]
                   ) -> Iterator[Tunnel | None]:
    """A running cluster for the tunnel layer, or None (and a note saying why)."""
    reason = "--no-tunnel" if args.no_tunnel else (
        None if os.path.exists("/dev/fuse") else "no /dev/fuse")
    if reason is not None:
        notes.append(f"tunnel columns left out: {reason}")
        yield None
        return
    # The launcher reads only pin_cpu; the rest is bench_cluster's own workload.
    cfg = bench_cluster.Config(ops=1, clients=(1,), pin_cpu=args.pin, phase_limit_s=1.0)
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(bench_cluster.running_cluster(workdir, args.nodes, cfg))
            credentials = load_credentials(credentials_path(cluster.nodes[0].blocks))
        except CLUSTER_ERRORS as exc:
            notes.append(f"tunnel columns left out: clusterfs mount cannot run here: {exc}")
            stack.close()  # the nodes that did start are stopped now
            yield None
            return
        yield Tunnel(cluster, credentials)


# ----- one run ----------------------------------------------------------------------------


@dataclass
class Run:
    header: list[str] = field(default_factory=list)
    results: dict[str, dict[str, dict[str, Result]]] = field(default_factory=dict)
    tunnel: Tunnel | None = None
    errors: list[str] = field(default_factory=list)
    node_logs: dict[str, list[str]] = field(default_factory=dict)
    frontends: frontends.Outcome | None = None


def bench(args: argparse.Namespace, workdir: Path) -> Run:
    size_bytes = args.size_mib << 20
    run = Run()
    notes: list[str] = []
    with tunnel_cluster(workdir, args, notes) as tunnel:
        run.tunnel = tunnel
        for kind in KINDS:
            log(f"{kind} disk: local layers")
            run.results[kind] = bench_disk(kind, workdir, size_bytes, args.seconds)
            if tunnel is None or run.errors:
                continue
            log(f"{kind} disk: tunnel")
            try:
                run.results[kind]["tunnel"] = tunnel.measure(kind, size_bytes, args.seconds)
            except TUNNEL_ERRORS as exc:
                run.errors.append(f"tunnel, {kind} disk: {type(exc).__name__}: {exc}")
                log(run.errors[-1])
        if args.frontends:
            log("front ends")
            run.frontends = frontends.bench(
                workdir, frontends.Settings(args.size_mib, args.seconds, args.frontend_depths,
                                            pin=args.pin),
                tunnel.cluster if tunnel else None, "; ".join(notes))
    if tunnel is not None:
        run.node_logs = bench_cluster.scan_logs({args.nodes: tunnel.cluster})
    run.header = header_lines(args, run.tunnel) + notes
    return run


def header_lines(args: argparse.Namespace, tunnel: Tunnel | None) -> list[str]:
    pinned = f"pinned to CPU {args.pin}" if args.pin is not None else "not pinned"
    lines = [f"bench_vhd: {args.size_mib} MiB disks, <= {args.seconds} s per case (best of "
             f"{REPEATS}; first-write: one run), {pinned}, page cache warm; "
             f"seq = 1 MiB ops, rand = 4 KiB ops",
             f"command: {shlex.join(sys.orig_argv)}"]
    if tunnel is not None:
        modes = ", ".join(f"{kind} {mode}" for kind, mode in tunnel.open_modes.items())
        lines.append(
            f"tunnel: RemoteDisk in this process -> file protocol over {tunnel.link} -> node "
            f"{tunnel.node or '?'} of {len(tunnel.cluster.nodes)} (`clusterfs mount -f`"
            f"{', same CPU' if args.pin is not None else ''}), its unpacker on a VHD in the "
            f"block directory, opened by the node {modes or '?'} (local layers: page cache); "
            f"one command in flight; each disk's tunnel runs in one trio.run after its local "
            f"layers, not interleaved with them; tunnel/target = vs the SCSI target on the "
            f"local file")
    return lines


# ----- reporting ----------------------------------------------------------------------------

# (heading, layer, the layer it is a ratio to, or None for the figure itself)
COLUMNS = (("raw os.pread/pwrite", "raw", None), ("vhdshare.image", "image", None),
           ("image/raw", "image", "raw"), ("SCSI target", "target", None),
           ("target/raw", "target", "raw"), ("tunnel", "tunnel", None),
           ("tunnel/target", "tunnel", "target"))
RATIOS = tuple((heading, layer, base) for heading, layer, base in COLUMNS if base)


def figure(result: Result, workload: str) -> str:
    if workload.startswith("rand"):
        return f"{result.iops:,.0f} IOPS"
    return f"{result.mib_s:,.0f} MiB/s"


def ratio_of(results: dict[str, dict[str, Result]], layer: str, base: str, workload: str
             ) -> float | None:
    result, against = results.get(layer, {}).get(workload), results.get(base, {}).get(workload)
    return None if result is None or against is None else (
        result.bytes_done / result.elapsed_s / (against.bytes_done / against.elapsed_s))


def cell(results: dict[str, dict[str, Result]], layer: str, base: str | None,
         workload: str) -> str:
    if base is not None:
        value = ratio_of(results, layer, base, workload)
        return "-" if value is None else f"{value:.2f}"
    result = results.get(layer, {}).get(workload)
    return "-" if result is None else figure(result, workload)


def table(all_results: dict[str, dict[str, dict[str, Result]]]) -> str:
    shown = {layer for results in all_results.values() for layer in results}
    columns = [c for c in COLUMNS if c[1] in shown]
    lines = ["| disk | workload | " + " | ".join(c[0] for c in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for disk, results in all_results.items():
        for workload in ("first-write", *WORKLOADS):
            cells = [cell(results, layer, base, workload) for _, layer, base in columns]
            lines.append(f"| {disk} | {workload} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_lines(run: Run) -> list[str]:
    lines = [f"# {line}" for line in run.header]
    lines.append(table(run.results))
    for node, problems in run.node_logs.items():
        lines.append(f"# node log {node}: {len(problems)} warning/error line(s)")
        lines += [f"#   {p[:200]}" for p in problems[:5]]
    lines += [f"! {e}" for e in run.errors]
    return lines + (["", *frontends.report_lines(run.frontends)] if run.frontends else [])


def json_report(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "header": run.header,
        "settings": {"size_mib": args.size_mib, "seconds": args.seconds, "repeats": REPEATS,
                     "pin": args.pin, "nodes": args.nodes, "tunnel": run.tunnel is not None},
        "tunnel_node": run.tunnel.node if run.tunnel is not None else None,
        "tunnel_open_modes": run.tunnel.open_modes if run.tunnel is not None else {},
        "disks": {disk: {layer: {workload: result.to_json()
                                 for workload, result in by_workload.items()}
                         for layer, by_workload in results.items()}
                  for disk, results in run.results.items()},
        "ratios": {disk: {workload: {heading: ratio_of(results, layer, base, workload)
                                     for heading, layer, base in RATIOS}
                          for workload in ("first-write", *WORKLOADS)}
                   for disk, results in run.results.items()},
        "errors": run.errors,
        "node_logs": run.node_logs,
        "frontends": frontends.json_report(run.frontends) if run.frontends else None,
    }


# ----- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=128, help="virtual disk size")
    parser.add_argument("--seconds", type=float, default=1.5,
                        help=f"time limit per case (split over {REPEATS} repeats)")
    parser.add_argument("--dir", default=None, help="where to put the images and the cluster "
                        "(default: a temp dir)")
    parser.add_argument("--pin", type=int, default=None,
                        help="pin this process (and the cluster's nodes) to one CPU")
    parser.add_argument("--nodes", type=int, default=1,
                        help="cluster size for the tunnel layer (default 1)")
    parser.add_argument("--no-tunnel", action="store_true",
                        help="no cluster: leave out the tunnel layer")
    parser.add_argument("--frontends", action=argparse.BooleanOptionalAction, default=True,
                        help="also the front ends (tools/bench_vhd_frontends.py; default on)")
    parser.add_argument("--frontend-depths", type=lambda text: tuple(map(int, text.split(","))),
                        default=(1, 16, 64), metavar="D,D",
                        help="the front ends' queue depths (default 1,16,64; 64 is qemu-img "
                             "bench's own default)")
    parser.add_argument("--json", action="store_true", help="print a JSON object, not the table")
    args = parser.parse_args(argv)
    if min(args.size_mib, args.nodes) < 1 or args.seconds <= 0:
        parser.error("--size-mib, --nodes and --seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    bench_cluster.interrupt_on_stop_signals()  # inside trio, `interrupt_on` does
    workdir = Path(tempfile.mkdtemp(prefix="bench-vhd-", dir=args.dir))
    try:
        run = bench(args, workdir)
    except KeyboardInterrupt as exc:
        log(f"interrupted ({str(exc) or 'SIGINT'}); cleaned up")
        return 130
    finally:
        bench_cluster.remove_work(workdir, keep=False)
    if args.json:
        print(json.dumps(json_report(run, args), indent=2))
    else:
        print("\n".join(report_lines(run)))
    return 1 if run.errors or (run.frontends and run.frontends.errors) else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
