"""Benchmark a shared disk's front ends beside the usual servers of the same data, in one run:

  vhdshare-nbd    `vhdshare attach --nbd unix:SOCKET`: NBD requests become SCSI commands sent
                  through the file protocol to a node, whose unpacker runs them on the VHD
  vhdshare-iscsi  `vhdshare attach --iscsi 127.0.0.1:PORT --target-name IQN`, LUN 0
  qemu-nbd        `qemu-nbd -f vpc --cache=none --aio=native -t -k SOCKET` on the same VHD file
  tgtd            our own `tgtd -f -C N --iscsi portal=127.0.0.1:PORT`, LUN 1 = a raw copy of
                  the same data, backing store rdwr with --bsoflags direct

Theory of operation. The node opens shared disks with O_DIRECT; qemu-nbd and tgtd bypass the
page cache too, so every column includes the device. A VHD is made with create_image through
the first node's FUSE mount and filled once through the NBD attachment (untimed: every timed
write is an overwrite) and copied to a raw file for tgtd; then all four serve at once and the
cases run interleaved (case, repeat, front end), so noise hits them alike. One client for
all, `qemu-img bench`; it runs a count of requests, calibrated by probe runs to about
seconds/REPEATS; the best of REPEATS runs counts. It knows only a fixed step between offsets,
wrapping modulo the disk size, so "rand" is 4 KiB requests k x 4 KiB apart, k coprime with the
number of 4 KiB slots: scattered over the disk, not random. A front end that cannot start is
left out with a `#` line giving its reason. Every process started is stopped by PID (SIGTERM,
then SIGKILL; tgtd first deletes its target and exits through its control port), also on
errors, Ctrl-C and SIGTERM. tools/bench_vhd.py runs this on its tunnel cluster.

    .venv/bin/python tools/bench_vhd_frontends.py [--size-mib 128] [--seconds 1.5]
        [--depths 1,16,64] [--kinds fixed[,dynamic]] [--nodes 1] [--pin CPU] [--no-cluster]
        [--json] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_cluster  # sibling script, not a package

from clusterfs.blockdir import BlockDir
from clusterfs.credentials import credentials_path, load_credentials
from clusterfs.txn import local_link
from vhdshare.image import create_image

REPEATS = 3
SEQ_BYTES = 1 << 20
RAND_BYTES = 4096
WORKLOADS = ("seq-write", "seq-read", "rand-write", "rand-read")
FRONTENDS = ("vhdshare-nbd", "vhdshare-iscsi", "qemu-nbd", "tgtd")
RATIOS = (("vhdshare-nbd/qemu-nbd", "vhdshare-nbd", "qemu-nbd"),
          ("vhdshare-iscsi/tgtd", "vhdshare-iscsi", "tgtd"))
INITIATOR = "iqn.2025-01.clusterfs.bench:bench-vhd-frontends"
IQN_VHDSHARE = "iqn.2025-01.clusterfs.bench:vhdshare-disk"
IQN_TGTD = "iqn.2025-01.clusterfs.bench:tgtd-disk"
FILL_DEPTH = 4
PROBE_MIN_S = 0.05  # a probe run shorter than this is repeated with more requests
READY_WAIT_S = 30.0
STOP_WAIT_S = 10.0
TGTD_RUN_DIR = Path("/var/run/tgtd")  # where tgtd puts its control socket and lock
CLUSTER_ERRORS = (bench_cluster.BenchError, OSError, subprocess.SubprocessError)


def log(msg: str) -> None:
    print(f"bench_vhd_frontends: {msg}", file=sys.stderr, flush=True)


class Unavailable(Exception):
    """A front end cannot run here; the message is the one-line reason."""


class ClientError(Exception):
    """A client run failed; the message says how."""


# ----- figures (tools/bench_vhd.py uses them too) -----------------------------------------


@dataclass
class Result:
    ops: int
    bytes_done: int
    elapsed_s: float

    @property
    def mib_s(self) -> float:
        return self.bytes_done / (1 << 20) / self.elapsed_s

    @property
    def iops(self) -> float:
        return self.ops / self.elapsed_s

    def to_json(self) -> dict[str, float]:
        return {"ops": self.ops, "bytes": self.bytes_done, "elapsed_s": self.elapsed_s,
                "mib_s": self.mib_s, "iops": self.iops}


def best(runs: list[Result]) -> Result:
    return max(runs, key=lambda r: r.bytes_done / r.elapsed_s)


# ----- the servers: processes started and stopped by PID -----------------------------------


class Daemon:
    """One server process in its own session (a Ctrl-C reaches only us), its output in a log."""

    def __init__(self, name: str, argv: list[str], log_path: Path, label: str = "") -> None:
        self.name, self.argv, self.log_path = name, argv, log_path
        self.label = label or Path(argv[0]).name
        self.proc: subprocess.Popen[bytes] | None = None
        self.before_stop: Callable[[], None] | None = None

    def start(self, stack: contextlib.ExitStack, ready: Callable[[], bool]) -> None:
        """Start it (stopped when `stack` closes) and wait until `ready()`; Unavailable with
        the log's last line if it exits first."""
        log(f"{self.name}: {shlex.join(self.argv)}")
        stack.callback(self.stop)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + READY_WAIT_S
        while not ready():
            if self.proc.poll() is not None:
                raise Unavailable(f"`{self.label}` exited {self.proc.returncode}: "
                                  f"{self.last_line()}")
            if time.monotonic() > deadline:
                raise Unavailable(f"not ready after {READY_WAIT_S:.0f} s: {self.last_line()}")
            time.sleep(0.05)

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def last_line(self) -> str:
        return ([line.strip() for line in self.log_text().splitlines() if line.strip()]
                or ["(no output)"])[-1]

    def stop(self) -> None:
        """`before_stop` (if any), then SIGTERM, then SIGKILL, each given time to work."""
        for step in (self.before_stop, signal.SIGTERM, signal.SIGKILL):
            if step is None or self.proc is None or self.proc.poll() is not None:
                continue
            if isinstance(step, signal.Signals):
                log(f"{self.name}: sending {step.name} to PID {self.proc.pid}")
                self.proc.send_signal(step)
            else:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    step()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_WAIT_S)


@dataclass
class FrontEnd:
    name: str
    url: str  # what qemu-img opens


@dataclass
class Disk:
    """One kind of disk under test: its VHD file and what serves it."""

    kind: str
    size_bytes: int
    vhd: Path
    sockets: Path = Path()  # a short path: a unix socket's must be under 108 bytes
    fronts: dict[str, FrontEnd] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise Unavailable(f"{name} is not installed")
    return path


def link_to(node: bench_cluster.Node) -> str:
    """How a client on this host reaches `node`: over the local link or TCP with CURVE."""
    credentials = load_credentials(credentials_path(node.blocks))
    if local_link.client_path(credentials, node.listen) is not None:
        return "the local link (a unix socket, no CURVE)"
    return "loopback TCP with CURVE"


def start_attach(stack: contextlib.ExitStack, cluster: bench_cluster.Cluster, disk: Disk,
                 cluster_path: str, work: Path, protocol: str) -> FrontEnd:
    """`vhdshare attach` serving the disk over NBD (a unix socket) or iSCSI (loopback)."""
    argv = [str(Path(sys.executable).parent / "vhdshare"), "attach", "--cluster",
            ",".join(node.listen for node in cluster.nodes), "--credentials",
            str(credentials_path(cluster.nodes[0].blocks)), "--disk", cluster_path, "-f"]
    if protocol == "nbd":
        socket_path = disk.sockets / f"vhdshare-{disk.kind}.sock"
        argv += ["--initiator", INITIATOR, "--nbd", f"unix:{socket_path}"]
        front = FrontEnd("vhdshare-nbd",
                         f"nbd+unix:///{cluster_path.lstrip('/')}?socket={socket_path}")
    else:
        port = bench_cluster.free_port()
        argv += ["--iscsi", f"127.0.0.1:{port}", "--target-name", IQN_VHDSHARE]
        front = FrontEnd("vhdshare-iscsi", f"iscsi://127.0.0.1:{port}/{IQN_VHDSHARE}/0")
    daemon = Daemon(front.name, argv, work / f"{front.name}-{disk.kind}.log",
                    f"vhdshare attach --{protocol}")
    daemon.start(stack, lambda: re.search(r"serving .* over", daemon.log_text()) is not None)
    return front


def start_qemu_nbd(stack: contextlib.ExitStack, disk: Disk, work: Path) -> FrontEnd:
    socket_path = disk.sockets / f"qemu-nbd-{disk.kind}.sock"
    Daemon("qemu-nbd", [tool("qemu-nbd"), "-f", "vpc", "--cache=none", "--aio=native", "-t",
                        "-k", str(socket_path), str(disk.vhd)],
           work / f"qemu-nbd-{disk.kind}.log").start(stack, socket_path.exists)
    return FrontEnd("qemu-nbd", f"nbd+unix:///?socket={socket_path}")


def start_tgtd(stack: contextlib.ExitStack, disk: Disk, raw: Path, work: Path) -> FrontEnd:
    """Our own tgtd: its own control port (tgtd's default, 0, may be the system's) and portal
    (never 3260); LUN 1 = `raw`. It ignores SIGTERM while it has a target."""
    control = next(p for p in iter(lambda: random.randrange(10000, 32000), None)
                   if not (TGTD_RUN_DIR / f"socket.{p}").exists())  # tgtd refuses >= 32768
    port = bench_cluster.free_port()
    daemon = Daemon("tgtd", [tool("tgtd"), "-f", "-C", str(control), "--iscsi",
                             f"portal=127.0.0.1:{port}"], work / f"tgtd-{disk.kind}.log")

    def tgtadm(*op: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("tgtadm"), "-C", str(control), "--lld", "iscsi", *op],
                              check=False, capture_output=True, text=True, timeout=30)

    def remove_control_files() -> None:  # tgtd leaves them behind
        if daemon.proc is not None and daemon.proc.poll() is not None:
            for suffix in ("", ".lock"):
                (TGTD_RUN_DIR / f"socket.{control}{suffix}").unlink(missing_ok=True)

    def shut_down() -> None:  # tgtd exits once its target is gone and it is told to
        tgtadm("--op", "delete", "--mode", "target", "--tid", "1", "--force")
        tgtadm("--op", "delete", "--mode", "system")

    daemon.before_stop = shut_down
    stack.callback(remove_control_files)
    daemon.start(stack, lambda: tgtadm("--op", "show", "--mode", "sys").returncode == 0)
    for op in (("--mode", "target", "--op", "new", "--tid", "1", "-T", IQN_TGTD),
               ("--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1",
                "-b", str(raw), "--bsoflags", "direct"),
               ("--mode", "target", "--op", "bind", "--tid", "1", "-I", "ALL")):
        if (proc := tgtadm(*op)).returncode != 0:
            raise Unavailable(f"tgtadm {' '.join(op[:4])}: {proc.stderr.strip()}")
    return FrontEnd("tgtd", f"iscsi://127.0.0.1:{port}/{IQN_TGTD}/1")


def start_front(disk: Disk, name: str, start: Callable[[], FrontEnd]) -> None:
    try:
        disk.fronts[name] = start()
    except Unavailable as exc:
        disk.left_out[name] = str(exc)
        log(f"{name} left out: {exc}")


def set_up(stack: contextlib.ExitStack, kind: str, size_bytes: int, work: Path,
           cluster: bench_cluster.Cluster | None, no_cluster_reason: str) -> Disk:
    """The VHD of `kind`, filled once, and every front end that can serve it."""
    sockets = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fe-")))
    if cluster is None:
        disk = Disk(kind, size_bytes, work / f"bench-fe-{kind}.vhd", sockets)
        create_image(disk.vhd, size_bytes, kind)
        disk.left_out = dict.fromkeys(FRONTENDS[:2], no_cluster_reason)
        fill(f"vpc:{disk.vhd}", size_bytes)  # the file itself: no node has it open
    else:
        local = cluster.nodes[0].mountpoint / f"bench-fe-{kind}.vhd"
        create_image(local, size_bytes, kind)
        disk = Disk(kind, size_bytes, Path(BlockDir(cluster.nodes[0].blocks, "").path(
            local.stat().st_ino)), sockets)
        start_front(disk, "vhdshare-nbd", lambda: start_attach(
            stack, cluster, disk, f"/{local.name}", work, "nbd"))
        nbd = disk.fronts.get("vhdshare-nbd")  # filled through vhdshare when it can
        fill(f"raw:{nbd.url}" if nbd else f"vpc:{disk.vhd}", size_bytes)
        start_front(disk, "vhdshare-iscsi", lambda: start_attach(
            stack, cluster, disk, f"/{local.name}", work, "iscsi"))
    raw = work / f"bench-fe-{kind}.raw"  # for tgtd: the same data, fully allocated
    run_tool([tool("qemu-img"), "convert", "-U", "-f", "vpc", "-O", "raw", "-S", "0",
              str(disk.vhd), str(raw)], timeout_s=600)
    start_front(disk, "qemu-nbd", lambda: start_qemu_nbd(stack, disk, work))
    start_front(disk, "tgtd", lambda: start_tgtd(stack, disk, raw, work))
    return disk


def fill(target: str, size_bytes: int) -> None:
    """Write the whole disk once (untimed): "FORMAT:URL-or-file". For a dynamic disk, this
    allocates every block, so the benchmark's writes are overwrites on every front end."""
    fmt, _, where = target.partition(":")
    count = max(1, size_bytes // SEQ_BYTES)
    run_tool([tool("qemu-img"), "bench", "-f", fmt, "-t", "none", "-w", "-s", str(SEQ_BYTES),
              "-c", str(count), "-d", str(FILL_DEPTH), "--pattern=0xa5", where],
             timeout_s=600)


def run_tool(argv: list[str], timeout_s: float) -> str:
    """Run a client to its end (killed on timeout, error or Ctrl-C); its stdout."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
        raise ClientError(f"{Path(argv[0]).name} killed after {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise ClientError(f"{Path(argv[0]).name} exited {proc.returncode}: {last}")
    return proc.stdout


# ----- the cases: one workload at one queue depth, `qemu-img bench` on every front end -------


@dataclass(frozen=True)
class Case:
    workload: str
    depth: int

    @property
    def key(self) -> str:
        return f"{self.workload} depth {self.depth}"

    @property
    def io_bytes(self) -> int:
        return SEQ_BYTES if self.workload.startswith("seq") else RAND_BYTES


def rand_step_bytes(size_bytes: int) -> int:
    """k x 4 KiB with k coprime with the number of 4 KiB slots, near 0.618 of it."""
    slots = size_bytes // RAND_BYTES
    k = max(1, round(slots * (math.sqrt(5) - 1) / 2))
    while math.gcd(k, slots) != 1:
        k += 1
    return k * RAND_BYTES


class Runner:
    """Runs cases on the front ends: calibrated counts, timeouts, best of REPEATS."""

    def __init__(self, disk: Disk, seconds: float) -> None:
        self.disk = disk
        self.run_s = seconds / REPEATS
        self.timeout_s = 60 + 20 * self.run_s

    def once(self, front: FrontEnd, case: Case, count: int) -> Result:
        step = [] if case.io_bytes == SEQ_BYTES else [
            "-S", str(rand_step_bytes(self.disk.size_bytes))]
        try:
            out = run_tool([tool("qemu-img"), "bench", "-f", "raw", "-t", "none", "-c",
                            str(count), "-d", str(case.depth), "-s", str(case.io_bytes), *step,
                            *(["-w"] if case.workload.endswith("write") else []), front.url],
                           self.timeout_s)
        except ClientError as exc:
            raise ClientError(f"{front.name}: {exc}") from None
        found = re.search(r"Run completed in ([0-9.]+) seconds", out)
        if found is None:
            raise ClientError(f"{front.name}: qemu-img bench said {out.strip()[-200:]!r}")
        return Result(count, count * case.io_bytes, max(float(found[1]), 0.0005))

    def calibrate(self, front: FrontEnd, case: Case) -> int:
        """The request count for about `run_s` (probe runs; they warm up, too)."""
        count = 4 * case.depth
        while (result := self.once(front, case, count)).elapsed_s < min(PROBE_MIN_S,
                                                                          self.run_s):
            count *= 8
        return max(case.depth, round(result.iops * self.run_s))

    def measure(self, cases: list[Case], errors: list[str]) -> dict[str, dict[str, Result]]:
        """Every case on every front end, interleaved (case, repeat, front end); a client
        that fails ends its case (an error), not the run."""
        results: dict[str, dict[str, Result]] = {}
        for case in cases:
            log(f"{self.disk.kind} disk: {case.key}")
            runs: dict[str, list[Result]] = {name: [] for name in self.disk.fronts}
            try:
                counts = {f.name: self.calibrate(f, case) for f in self.disk.fronts.values()}
                for _ in range(REPEATS):
                    for front in self.disk.fronts.values():
                        runs[front.name].append(self.once(front, case, counts[front.name]))
            except ClientError as exc:
                errors.append(f"{self.disk.kind} disk, {case.key}: {exc}")
                log(errors[-1])
            results[case.key] = {name: best(rs) for name, rs in runs.items() if rs}
        return results


# ----- one run ----------------------------------------------------------------------------


@dataclass
class Settings:
    size_mib: int = 128
    seconds: float = 1.5
    depths: tuple[int, ...] = (1, 16, 64)  # 64: qemu-img bench's own default
    kinds: tuple[str, ...] = ("fixed",)
    pin: int | None = None


@dataclass
class Outcome:
    settings: Settings
    header: list[str] = field(default_factory=list)
    cases: list[Case] = field(default_factory=list)
    results: dict[str, dict[str, dict[str, Result]]] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def bench(work: Path, settings: Settings, cluster: bench_cluster.Cluster | None,
          no_cluster_reason: str = "no cluster") -> Outcome:
    """Every case on every front end, one kind of disk after the other; all stopped after."""
    out = Outcome(settings, cases=[Case(w, d) for d in settings.depths for w in WORKLOADS])
    work = work / "frontends"
    work.mkdir()
    for kind in settings.kinds:
        with contextlib.ExitStack() as stack:
            try:
                disk = set_up(stack, kind, settings.size_mib << 20, work, cluster,
                              no_cluster_reason)
            except (ClientError, Unavailable, OSError) as exc:
                out.errors.append(f"{kind} disk: cannot set it up: {exc}")
                log(out.errors[-1])
                continue
            out.results[kind] = Runner(disk, settings.seconds).measure(out.cases, out.errors)
            out.left_out.update(disk.left_out)
    out.header = header_lines(settings, cluster, out)
    return out


def version(name: str) -> str:
    with contextlib.suppress(ClientError, Unavailable):
        found = re.search(r"\d+(\.\d+)+", run_tool([tool(name), "--version"], 10))
        return found[0] if found else "?"
    return "?"


def header_lines(settings: Settings, cluster: bench_cluster.Cluster | None,
                 out: Outcome) -> list[str]:
    slots = (settings.size_mib << 20) // RAND_BYTES
    k = rand_step_bytes(settings.size_mib << 20) // RAND_BYTES
    pinned = "not pinned" if settings.pin is None else f"pinned to CPU {settings.pin}"
    lines = [
        f"front ends: {settings.size_mib} MiB {' and '.join(settings.kinds)} VHD, filled once "
        f"(timed writes overwrite); client qemu-img {version('qemu-img')} bench -f raw -t none "
        f"for all four, its count calibrated to ~{settings.seconds / REPEATS:.2g} s a run, "
        f"best of {REPEATS} runs interleaved (case, repeat, front end); queue depths "
        f"{', '.join(map(str, settings.depths))}; {pinned}",
        f"seq = 1 MiB requests at consecutive offsets; rand (qemu-img) = 4 KiB requests at "
        f"offsets i x {k} x 4 KiB mod the disk size ({k} coprime with its {slots} slots: "
        f"scattered, each slot once per pass, not random)",
        f"command: {shlex.join(sys.orig_argv)}"]
    if cluster is not None:
        lines.append(
            f"vhdshare-nbd, vhdshare-iscsi: `vhdshare attach --nbd unix:SOCKET`, `--iscsi "
            f"127.0.0.1:PORT --target-name IQN` (LUN 0) -> file protocol over "
            f"{link_to(cluster.nodes[0])} -> a node of {len(cluster.nodes)} (`clusterfs mount "
            f"-f`), its unpacker on the VHD in the block directory, which it opens with "
            f"O_DIRECT; a disk's commands run side by side on the node (a dynamic disk's "
            f"writes take turns)")
    return lines + [
        f"qemu-nbd {version('qemu-nbd')} -f vpc --cache=none --aio=native -t, unix socket, on "
        f"the same VHD file; tgtd {version('tgtd')} (our own: -f -C N --iscsi "
        f"portal=127.0.0.1:PORT), LUN 1 = a raw copy of the same data, backing store rdwr "
        f"--bsoflags direct"] + [f"{name} column left out: {why}"
                                for name, why in out.left_out.items()]


# ----- reporting ----------------------------------------------------------------------------


def figure(result: Result | None, case: Case) -> str:
    if result is None:
        return "-"
    return f"{result.mib_s:,.0f} MiB/s" if case.io_bytes == SEQ_BYTES \
        else f"{result.iops:,.0f} IOPS"


def ratio_of(by_front: dict[str, Result], name: str, base: str) -> float | None:
    result, against = by_front.get(name), by_front.get(base)
    return None if result is None or against is None else (
        result.bytes_done / result.elapsed_s / (against.bytes_done / against.elapsed_s))


def table(out: Outcome) -> str:
    shown = [name for name in FRONTENDS if name not in out.left_out]
    ratios = [r for r in RATIOS if r[1] in shown and r[2] in shown]
    lines = ["| disk | workload | depth | " + " | ".join(shown + [r[0] for r in ratios]) + " |",
             "|---|---|---:|" + "---:|" * (len(shown) + len(ratios))]
    for kind, by_case in out.results.items():
        for case in out.cases:
            by_front = by_case.get(case.key, {})
            cells = [figure(by_front.get(name), case) for name in shown]
            cells += ["-" if (v := ratio_of(by_front, name, base)) is None else f"{v:.2f}"
                      for _, name, base in ratios]
            lines.append(f"| {kind} | {case.workload} | {case.depth} | " + " | ".join(cells)
                         + " |")
    return "\n".join(lines)


def report_lines(out: Outcome) -> list[str]:
    return [f"# {line}" for line in out.header] + [table(out)] + [f"! {e}" for e in out.errors]


def json_report(out: Outcome) -> dict[str, Any]:
    return {
        "header": out.header,
        "settings": {**dataclasses.asdict(out.settings), "repeats": REPEATS},
        "left_out": out.left_out,
        "disks": {kind: {key: {name: r.to_json() for name, r in by_front.items()}
                         for key, by_front in by_case.items()}
                  for kind, by_case in out.results.items()},
        "ratios": {kind: {key: {heading: ratio_of(by_front, name, base)
                                for heading, name, base in RATIOS}
                          for key, by_front in by_case.items()}
                   for kind, by_case in out.results.items()},
        "errors": out.errors,
    }


# ----- main ---------------------------------------------------------------------------------


@contextlib.contextmanager
def cluster_or_none(work: Path, nodes: int, pin: int | None,
                    notes: list[str]) -> Iterator[bench_cluster.Cluster | None]:
    """A running cluster on loopback, or None (and the reason appended to `notes`)."""
    cfg = bench_cluster.Config(ops=1, clients=(1,), pin_cpu=pin, phase_limit_s=1.0)
    with contextlib.ExitStack() as stack:
        try:
            if not os.path.exists("/dev/fuse"):
                raise bench_cluster.BenchError("no /dev/fuse")
            cluster = stack.enter_context(bench_cluster.running_cluster(work, nodes, cfg))
        except CLUSTER_ERRORS as exc:
            notes.append(f"clusterfs mount cannot run here: {exc}")
            stack.close()  # the nodes that did start are stopped now
            yield None
            return
        yield cluster


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--size-mib", type=int, default=128, help="virtual disk size")
    add("--seconds", type=float, default=1.5,
        help=f"about this long per case and front end ({REPEATS} runs)")
    add("--depths", type=lambda text: tuple(int(d) for d in text.split(",")), default=(1, 16, 64),
        help="queue depths, comma-separated (default 1,16,64)")
    add("--kinds", type=lambda text: tuple(text.split(",")), default=("fixed",),
        help="fixed (default), dynamic or fixed,dynamic")
    add("--nodes", type=int, default=1, help="cluster size (default 1)")
    add("--pin", type=int, default=None, help="pin this process, its children and the nodes "
        "to one CPU")
    add("--no-cluster", action="store_true", help="leave out the vhdshare columns")
    add("--json", action="store_true", help="print a JSON object, not the table")
    add("--dir", default=None, help="where to work (default: a temp dir)")
    args = parser.parse_args(argv)
    if not set(args.kinds) <= {"fixed", "dynamic"}:
        parser.error("--kinds: fixed, dynamic or both")
    if min(args.size_mib, args.nodes, *args.depths) < 1 or args.seconds <= 0:
        parser.error("--size-mib, --nodes, --depths and --seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    bench_cluster.interrupt_on_stop_signals()
    settings = Settings(args.size_mib, args.seconds, args.depths, args.kinds, args.pin)
    work = Path(tempfile.mkdtemp(prefix="bench-vhd-frontends-", dir=args.dir))
    notes: list[str] = []
    try:
        with contextlib.nullcontext() if args.no_cluster else cluster_or_none(
                work, args.nodes, args.pin, notes) as cluster:
            out = bench(work, settings, cluster, "; ".join(notes) or "--no-cluster")
    except KeyboardInterrupt as exc:
        log(f"interrupted ({str(exc) or 'SIGINT'}); cleaned up")
        return 130
    finally:
        bench_cluster.remove_work(work, keep=False)
    print(json.dumps(json_report(out), indent=2) if args.json else "\n".join(report_lines(out)))
    return 1 if out.errors else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
