#!/usr/bin/env python3
"""Benchmark clusterfs against the native directory and a plain pyfuse3 passthrough.

Usage: python tools/bench_fs.py [--files N] [--size-mib M] [--quick] [--pin CPU]
                                [--only native,passthrough,clusterfs] [--json]

Theory of operation: the same workload runs, in one process and one run, on
(a) a native directory, (b) tools/passthrough.py mounted over a native
directory and (c) a single-node clusterfs mount, all under one work directory
on the same disk. Figures are only comparable within one run (DESIGN.md s. 7),
so the table shows the ratios clusterfs/native, clusterfs/passthrough and
passthrough/native next to the figures.

Every phase is timed with perf_counter around the syscalls only; cache drops,
syncs and clean-up are outside the timed region. Metadata phases start with
the dentry and inode caches dropped (sync; echo 2 > drop_caches), so every
target pays for its lookups; cold reads start after sync; echo 3 >
drop_caches and open the file afresh. Each phase stops at a time limit and
reports the rate over what it completed, which bounds the run time even when
a target is very slow. The FUSE daemons are foreground children; every mount
this script makes is unmounted and every daemon it starts is stopped by PID,
also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from clusterfs.status import is_mounted

MIB = 1 << 20
SMALL_FILE_BYTES = 4096
TARGETS = ("native", "passthrough", "clusterfs")
PASSTHROUGH = Path(__file__).resolve().parent / "passthrough.py"
FUSE_TIMEOUT_S = 1.0  # clusterfs's entry and attribute timeouts; the passthrough gets the same
MOUNT_WAIT_S = 30.0


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    target_vs_passthrough: float | None  # issue 2's acceptance ratio, where it sets one


METRICS = (
    Metric("create", "create empty file", "files/s", 0.5),
    Metric("stat", "stat", "files/s", 0.5),
    Metric("rename", "rename (same dir)", "files/s", 0.5),
    Metric("unlink", "unlink", "files/s", 0.5),
    Metric("mkdir", "mkdir", "dirs/s", 0.5),
    Metric("rmdir", "rmdir", "dirs/s", 0.5),
    Metric("seq_write", "seq write 1 MiB + fsync", "MiB/s", 0.8),
    Metric("seq_read_cold", "seq read 1 MiB, cold", "MiB/s", 0.8),
    Metric("rand_read", "4 KiB random read", "IOPS", None),
    Metric("rand_write", "4 KiB random write", "IOPS", None),
    Metric("small_write", "small file write 4 KiB", "files/s", None),
    Metric("small_read", "small file read 4 KiB, cold", "files/s", None),
)


@dataclass(frozen=True)
class Config:
    files: int
    size_mib: int
    quick: bool
    pin_cpu: int | None
    only: tuple[str, ...]
    phase_limit_s: float
    fio: str | None
    no_fio: bool
    fio_size_mib: int
    fio_runtime_s: int
    py_random_ios: int
    can_drop_caches: bool


@dataclass
class Figure:
    value: float
    ops: int  # operations (files, I/Os or MiB) the value was measured over
    note: str = ""


@dataclass
class TargetResult:
    figures: dict[str, Figure] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    daemon_cpu_s: dict[str, float] = field(default_factory=dict)


class BenchError(Exception):
    """A target could not be set up or a phase failed; the message says why."""


# ----- helpers ------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"bench_fs: {msg}", file=sys.stderr, flush=True)


def drop_caches(level: int) -> bool:
    """sync, then drop the page cache (1), dentries+inodes (2) or both (3)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write(f"{level}\n")
    except OSError:
        return False
    return True


def timed_loop(items: Sequence[Any], op: Callable[[Any], object], limit_s: float) -> Figure:
    """Run op over items until done or limit_s passed; a rate per second."""
    done = 0
    start = time.perf_counter()
    deadline = start + limit_s
    for item in items:
        op(item)
        done += 1
        if time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - start
    note = "" if done == len(items) else f"{done}/{len(items)} in time limit"
    return Figure(done / elapsed if elapsed > 0 else 0.0, done, note)


def daemon_cpu_s(pid: int) -> float:
    """User+system CPU seconds of a live process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_prefix(cfg: Config) -> list[str]:
    return ["taskset", "-c", str(cfg.pin_cpu)] if cfg.pin_cpu is not None else []


# ----- the workload -------------------------------------------------------------------


GROUP_NAMES = ("files", "directories", "sequential", "random", "small files")


class Workload:
    """The phases, run in order on one directory; a failed phase skips its dependants."""

    def __init__(self, root: Path, cfg: Config) -> None:
        self.root = root
        self.cfg = cfg
        self.names: list[str] = []
        self.files: list[str] = []
        self.renamed: list[str] = []
        self.dirs: list[str] = []
        self.small: list[str] = []
        self.seq_path = str(root / "seq.dat")
        self.rand_path = str(root / "rand.dat")
        self.rand_ops: dict[str, int] = {}

    def groups(self) -> list[list[tuple[str, Callable[[], Figure]]]]:
        return [
            [("create", self.create), ("stat", self.stat), ("rename", self.rename),
             ("unlink", self.unlink)],
            [("mkdir", self.mkdir), ("rmdir", self.rmdir)],
            [("seq_write", self.seq_write), ("seq_read_cold", self.seq_read_cold)],
            [("rand_read", self.rand_read), ("rand_write", self.rand_write)],
            [("small_write", self.small_write), ("small_read", self.small_read)],
        ]

    def _fresh_dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path

    def _drop_dentries(self) -> None:
        if self.cfg.can_drop_caches:
            drop_caches(2)

    def create(self) -> Figure:
        meta = self._fresh_dir("meta")
        self.names = [str(meta / f"f{i:06d}") for i in range(self.cfg.files)]
        self._drop_dentries()
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        fig = timed_loop(self.names, lambda p: os.close(os.open(p, flags, 0o644)),
                         self.cfg.phase_limit_s)
        self.files = self.names[: fig.ops]
        return fig

    def stat(self) -> Figure:
        self._drop_dentries()
        return timed_loop(self.files, os.stat, self.cfg.phase_limit_s)

    def rename(self) -> Figure:
        self._drop_dentries()
        fig = timed_loop(self.files, lambda p: os.rename(p, p + "r"), self.cfg.phase_limit_s)
        self.renamed = [p + "r" for p in self.files[: fig.ops]]
        return fig

    def unlink(self) -> Figure:
        self._drop_dentries()
        return timed_loop(self.renamed, os.unlink, self.cfg.phase_limit_s)

    def mkdir(self) -> Figure:
        parent = self._fresh_dir("dirs")
        names = [str(parent / f"d{i:06d}") for i in range(self.cfg.files)]
        self._drop_dentries()
        fig = timed_loop(names, lambda p: os.mkdir(p, 0o755), self.cfg.phase_limit_s)
        self.dirs = names[: fig.ops]
        return fig

    def rmdir(self) -> Figure:
        self._drop_dentries()
        return timed_loop(self.dirs, os.rmdir, self.cfg.phase_limit_s)

    def seq_write(self) -> Figure:
        buf = os.urandom(MIB)
        deadline = time.perf_counter() + self.cfg.phase_limit_s
        written_mib = 0
        start = time.perf_counter()
        fd = os.open(self.seq_path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        try:
            while written_mib < self.cfg.size_mib and time.perf_counter() < deadline:
                if os.write(fd, buf) != MIB:
                    raise BenchError("short write")
                written_mib += 1
            os.fsync(fd)
        finally:
            os.close(fd)
        elapsed = time.perf_counter() - start
        note = "" if written_mib == self.cfg.size_mib else f"{written_mib} MiB in time limit"
        return Figure(written_mib / elapsed, written_mib, note)

    def seq_read_cold(self) -> Figure:
        if self.cfg.can_drop_caches:
            drop_caches(3)
        buf = bytearray(MIB)
        view = memoryview(buf)
        deadline = time.perf_counter() + self.cfg.phase_limit_s
        read_bytes = 0
        start = time.perf_counter()
        with open(self.seq_path, "rb", buffering=0) as f:
            while time.perf_counter() < deadline:
                n = f.readinto(view)
                if not n:
                    break
                read_bytes += n
        elapsed = time.perf_counter() - start
        os.unlink(self.seq_path)
        return Figure(read_bytes / MIB / elapsed, read_bytes // MIB)

    def rand_read(self) -> Figure:
        if self.cfg.fio:
            return self._fio("randread")
        self._layout_rand_file()
        return self._py_random(write=False)

    def rand_write(self) -> Figure:
        fig = self._fio("randwrite") if self.cfg.fio else self._py_random(write=True)
        os.unlink(self.rand_path)
        return fig

    def fio_args(self, rw: str) -> list[str]:
        assert self.cfg.fio is not None
        return [self.cfg.fio, f"--name={rw}", f"--filename={self.rand_path}", f"--rw={rw}",
                "--ioengine=psync", "--direct=0", "--bs=4k", f"--size={self.cfg.fio_size_mib}M",
                f"--runtime={self.cfg.fio_runtime_s}", "--time_based", "--output-format=json"]

    def _fio(self, rw: str) -> Figure:
        # The time-based run is bounded; laying out the file on a slow target may not be.
        timeout_s = self.cfg.fio_runtime_s + max(60.0, 2 * self.cfg.phase_limit_s)
        proc = subprocess.run(self.fio_args(rw), capture_output=True, text=True,
                              timeout=timeout_s, check=False)
        if proc.returncode != 0:
            raise BenchError(f"fio {rw} exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
        report = json.loads(proc.stdout[proc.stdout.index("{"):])
        job = report["jobs"][0]
        side = job["read" if rw == "randread" else "write"]
        if job.get("error"):
            raise BenchError(f"fio {rw}: error {job['error']}")
        return Figure(float(side["iops"]), int(side["total_ios"]))

    def _layout_rand_file(self) -> None:
        size_bytes = self.cfg.fio_size_mib * MIB
        with open(self.rand_path, "wb") as f:
            chunk = os.urandom(MIB)
            for _ in range(size_bytes // MIB):
                f.write(chunk)

    def _py_random(self, write: bool) -> Figure:
        blocks = self.cfg.fio_size_mib * MIB // 4096
        rng = random.Random(4096)
        offsets = [rng.randrange(blocks) * 4096 for _ in range(self.cfg.py_random_ios)]
        buf = os.urandom(4096)
        fd = os.open(self.rand_path, os.O_RDWR)
        try:
            if write:
                return timed_loop(offsets, lambda off: os.pwrite(fd, buf, off),
                                  self.cfg.phase_limit_s)
            return timed_loop(offsets, lambda off: os.pread(fd, 4096, off),
                              self.cfg.phase_limit_s)
        finally:
            os.close(fd)

    def small_write(self) -> Figure:
        parent = self._fresh_dir("small")
        names = [str(parent / f"s{i:06d}") for i in range(self.cfg.files)]
        buf = os.urandom(SMALL_FILE_BYTES)
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        self._drop_dentries()

        def write_one(path: str) -> None:
            fd = os.open(path, flags, 0o644)
            try:
                if os.write(fd, buf) != SMALL_FILE_BYTES:
                    raise BenchError("short write")
            finally:
                os.close(fd)

        fig = timed_loop(names, write_one, self.cfg.phase_limit_s)
        self.small = names[: fig.ops]
        return fig

    def small_read(self) -> Figure:
        if self.cfg.can_drop_caches:
            drop_caches(3)

        def read_one(path: str) -> None:
            fd = os.open(path, os.O_RDONLY)
            try:
                if len(os.read(fd, 2 * SMALL_FILE_BYTES)) != SMALL_FILE_BYTES:
                    raise BenchError(f"{path}: short read")
            finally:
                os.close(fd)

        return timed_loop(self.small, read_one, self.cfg.phase_limit_s)

    def clean_up(self) -> None:
        for name in ("meta", "dirs", "small"):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for path in (self.seq_path, self.rand_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def run_group(group: Sequence[tuple[str, Callable[[], Figure]]], result: TargetResult,
              daemon_pid: int | None) -> None:
    """Run a group's phases in order; after a failure, the rest of the group is skipped."""
    failed = ""
    for key, phase in group:
        if failed:
            result.errors[key] = f"skipped: {failed}"
            continue
        failed = run_phase(key, phase, result, daemon_pid)


def run_phase(key: str, phase: Callable[[], Figure], result: TargetResult,
              daemon_pid: int | None) -> str:
    """Run one phase into result; return why it failed, or ''."""
    cpu_before = daemon_cpu_s(daemon_pid) if daemon_pid else 0.0
    try:
        fig = phase()
    except (OSError, BenchError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        msg = f"{key} failed: {type(exc).__name__}: {exc}"
        log(msg)
        result.errors[key] = msg
        return msg
    if daemon_pid:
        with contextlib.suppress(OSError):
            result.daemon_cpu_s[key] = daemon_cpu_s(daemon_pid) - cpu_before
    result.figures[key] = fig
    log(f"  {key}: {fig.value:,.1f} {fig.note}")
    return ""


# ----- the targets --------------------------------------------------------------------


class Daemon:
    """A foreground FUSE daemon mounted on mountpoint; stopped by PID, always."""

    def __init__(self, name: str, argv: list[str], mountpoint: Path, log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        log(f"{self.name}: {shlex.join(self.argv)}")
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + MOUNT_WAIT_S
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited {self.proc.returncode} before mounting: "
                                 f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not mounted after {MOUNT_WAIT_S:.0f} s: "
                                 f"{self.log_tail()}")
            time.sleep(0.05)
        return self.proc.pid

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def stop(self) -> None:
        """umount, wait for the daemon; SIGTERM, then SIGKILL it by PID if it lingers."""
        try:
            if is_mounted(self.mountpoint):
                subprocess.run(["umount", str(self.mountpoint)], check=False, timeout=60,
                               stderr=subprocess.DEVNULL)
            if self.proc is not None:
                self._reap(self.proc)
        finally:
            if is_mounted(self.mountpoint):  # a dead daemon's mount too
                log(f"{self.name}: lazy unmount of {self.mountpoint}")
                subprocess.run(["umount", "-l", str(self.mountpoint)], check=False, timeout=60)

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        for sig, wait_s in ((None, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if sig is not None and proc.poll() is None:
                log(f"{self.name}: sending {sig.name} to PID {proc.pid}")
                proc.send_signal(sig)
            try:
                rc = proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
            if rc != 0:
                log(f"{self.name}: PID {proc.pid} exited {rc}: {self.log_tail()}")
            return


@contextlib.contextmanager
def native_target(work: Path, cfg: Config) -> Iterator[tuple[Path, int | None]]:
    root = work / "native"
    root.mkdir()
    yield root, None


@contextlib.contextmanager
def passthrough_target(work: Path, cfg: Config) -> Iterator[tuple[Path, int | None]]:
    source, mnt = work / "pt-src", work / "pt-mnt"
    source.mkdir()
    mnt.mkdir()
    argv = [*pin_prefix(cfg), sys.executable, str(PASSTHROUGH), str(source), str(mnt),
            "--entry-timeout-s", str(FUSE_TIMEOUT_S), "--attr-timeout-s", str(FUSE_TIMEOUT_S)]
    daemon = Daemon("passthrough", argv, mnt, work / "passthrough.log")
    try:
        yield mnt, daemon.start()
    finally:
        daemon.stop()


def clusterfs_command() -> str:
    return str(Path(sys.executable).parent / "clusterfs")


@contextlib.contextmanager
def clusterfs_target(work: Path, cfg: Config) -> Iterator[tuple[Path, int | None]]:
    blocks, state, mnt = work / "cfs-blocks", work / "cfs-state", work / "cfs-mnt"
    for path in (blocks, state, mnt):
        path.mkdir()
    fmt = subprocess.run([clusterfs_command(), "format", str(blocks)], capture_output=True,
                         text=True, timeout=120, check=False)
    if fmt.returncode != 0:
        raise BenchError(f"clusterfs format exit {fmt.returncode}: "
                         f"{(fmt.stderr or fmt.stdout).strip()[-300:]}")
    argv = [*pin_prefix(cfg), clusterfs_command(), "mount", str(blocks), str(mnt),
            "--node", "bench", "--state", str(state), "--listen", f"127.0.0.1:{free_port()}",
            "-f"]
    daemon = Daemon("clusterfs", argv, mnt, work / "clusterfs.log")
    try:
        yield mnt, daemon.start()
    finally:
        daemon.stop()


TARGET_FACTORIES = {
    "native": native_target,
    "passthrough": passthrough_target,
    "clusterfs": clusterfs_target,
}


def failed_target(name: str, exc: Exception) -> TargetResult:
    msg = f"{name}: {type(exc).__name__}: {exc}"
    log(msg)
    return TargetResult(errors={metric.key: msg for metric in METRICS})


def bench_all(work: Path, cfg: Config) -> dict[str, TargetResult]:
    """Mount every target, then run each phase group on each target in turn, alternating
    the order, so that the figures compared are measured close together in time."""
    results = {name: TargetResult() for name in cfg.only}
    with contextlib.ExitStack() as stack:
        live: dict[str, tuple[Workload, int | None]] = {}
        for name in cfg.only:
            log(f"setting up {name}")
            try:
                root, pid = stack.enter_context(TARGET_FACTORIES[name](work, cfg))
            except (OSError, BenchError, subprocess.SubprocessError) as exc:
                results[name] = failed_target(name, exc)
                continue
            workload = Workload(root, cfg)
            stack.callback(workload.clean_up)  # runs before the unmount
            live[name] = (workload, pid)
        names = list(live)
        for index in range(len(GROUP_NAMES)):
            for name in names if index % 2 == 0 else names[::-1]:
                workload, pid = live[name]
                log(f"{name}: {GROUP_NAMES[index]}")
                run_group(workload.groups()[index], results[name], pid)
    return results


# ----- reporting ----------------------------------------------------------------------


def ratio(results: dict[str, TargetResult], key: str, top: str, bottom: str) -> float | None:
    a = results.get(top)
    b = results.get(bottom)
    if a is None or b is None or key not in a.figures or key not in b.figures:
        return None
    denom = b.figures[key].value
    return a.figures[key].value / denom if denom > 0 else None


RATIOS = (("clusterfs", "native"), ("clusterfs", "passthrough"), ("passthrough", "native"))


def fmt_value(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def header_lines(cfg: Config, work: Path) -> list[str]:
    cpus = sorted(os.sched_getaffinity(0))
    pinned = (f"yes: benchmark, fio and daemons on CPU {cfg.pin_cpu} (sched_setaffinity, taskset)"
              if cfg.pin_cpu is not None else f"no (CPUs {cpus} of {os.cpu_count()})")
    cold = ("sync + echo 3 > /proc/sys/vm/drop_caches (drops the FUSE page cache and the "
            "backing files' alike), then a fresh open" if cfg.can_drop_caches
            else "NOT cold: /proc/sys/vm/drop_caches is not writable")
    meta = ("each metadata phase starts after sync + echo 2 > drop_caches (dentries and inodes)"
            if cfg.can_drop_caches else "dentry cache NOT dropped between phases")
    if cfg.fio:
        rand = (f"fio --rw=randread, then --rw=randwrite, --ioengine=psync --direct=0 --bs=4k "
                f"--size={cfg.fio_size_mib}M --runtime={cfg.fio_runtime_s} --time_based "
                "(fio's default invalidate=1 drops the file's page cache at job start: native "
                "random reads start cold, FUSE ones are served from the backing page cache)")
    else:
        rand = (f"Python os.pread/os.pwrite loop, {cfg.py_random_ios} random 4 KiB I/Os on a "
                f"{cfg.fio_size_mib} MiB file ({'--no-fio' if cfg.no_fio else 'fio not found'})")
    return [
        f"command: {shlex.join(sys.orig_argv)}",
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %z')}; host: {platform.node()}; "
        f"kernel: {platform.release()}; python {platform.python_version()}; "
        f"pyfuse3 {pyfuse3_version()}; {fio_version(cfg)}",
        f"pinned: {pinned}",
        f"work dir: {work} ({fs_type(work)}); files per phase: {cfg.files}; "
        f"sequential file: {cfg.size_mib} MiB; phase time limit: {cfg.phase_limit_s:.0f} s",
        f"FUSE timeouts: entry {FUSE_TIMEOUT_S:g} s, attr {FUSE_TIMEOUT_S:g} s (passthrough, "
        "as clusterfs); mount options allow_other,default_permissions",
        f"cold reads: {cold}",
        f"metadata: {meta}",
        f"random I/O: {rand}",
        f"order: all targets mounted at once; each phase group ({', '.join(GROUP_NAMES)}) "
        "runs on every target in turn, the order alternating from group to group",
    ]


def pyfuse3_version() -> str:
    try:
        from importlib.metadata import version

        return version("pyfuse3")
    except Exception:
        return "?"


def fio_version(cfg: Config) -> str:
    if not cfg.fio:
        return "fio: none"
    proc = subprocess.run([cfg.fio, "--version"], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "fio: ?"


def fs_type(path: Path) -> str:
    proc = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(path)],
                          capture_output=True, text=True, check=False)
    return " ".join(proc.stdout.split()) or "?"


def table_lines(results: dict[str, TargetResult], cfg: Config) -> list[str]:
    cols = ["metric", "unit", *cfg.only, *(f"{a[:3]}/{b[:3]}" for a, b in RATIOS), "target"]
    rows = [cols]
    for m in METRICS:
        row = [m.label, m.unit]
        for name in cfg.only:
            fig = results[name].figures.get(m.key)
            row.append(fmt_value(fig.value if fig else None) + ("*" if fig and fig.note else ""))
        row += [fmt_ratio(ratio(results, m.key, a, b)) for a, b in RATIOS]
        row.append(verdict(results, m))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def verdict(results: dict[str, TargetResult], m: Metric) -> str:
    if m.target_vs_passthrough is None:
        return ""
    r = ratio(results, m.key, "clusterfs", "passthrough")
    goal = f">={m.target_vs_passthrough:.2f}"
    if r is None:
        return goal
    return f"{goal} {'ok' if r >= m.target_vs_passthrough else 'LOW'}"


def note_lines(results: dict[str, TargetResult]) -> list[str]:
    lines = []
    for name, res in results.items():
        for key, fig in res.figures.items():
            if fig.note:
                lines.append(f"* {name} {key}: {fig.note}")
        distinct = set(res.errors.values())
        if len(distinct) == 1 and len(res.errors) == len(METRICS):
            lines.append(f"! {name}: {distinct.pop()}")
            continue
        for key, err in res.errors.items():
            lines.append(f"! {name} {key}: {err}")
    cpu_rows = daemon_cpu_lines(results)
    if cpu_rows:
        lines.append("daemon CPU per operation (us; per MiB for sequential phases):")
        lines += cpu_rows
    return lines


def daemon_cpu_lines(results: dict[str, TargetResult]) -> list[str]:
    lines = []
    for m in METRICS:
        cells = []
        for name, res in results.items():
            cpu = res.daemon_cpu_s.get(m.key)
            fig = res.figures.get(m.key)
            if cpu is not None and fig and fig.ops:
                cells.append(f"{name} {cpu / fig.ops * 1e6:,.0f}")
        if cells:
            lines.append(f"  {m.label}: " + ", ".join(cells))
    return lines


def json_report(results: dict[str, TargetResult], cfg: Config,
                header: list[str]) -> dict[str, Any]:
    return {
        "header": header,
        "pinned": cfg.pin_cpu is not None,
        "pin_cpu": cfg.pin_cpu,
        "cold_caches_dropped": cfg.can_drop_caches,
        "random_io": "fio" if cfg.fio else "python",
        "files": cfg.files,
        "size_mib": cfg.size_mib,
        "units": {m.key: m.unit for m in METRICS},
        "targets": {name: {m.key: (res.figures[m.key].value if m.key in res.figures else None)
                           for m in METRICS} for name, res in results.items()},
        "notes": {name: {k: f.note for k, f in res.figures.items() if f.note}
                  for name, res in results.items()},
        "errors": {name: res.errors for name, res in results.items()},
        "daemon_cpu_s": {name: res.daemon_cpu_s for name, res in results.items()},
        "ratios": {f"{a}/{b}": {m.key: ratio(results, m.key, a, b) for m in METRICS}
                   for a, b in RATIOS},
    }


# ----- main ---------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark native vs passthrough vs clusterfs.")
    p.add_argument("--files", type=int, help="files per metadata phase (default 2000)")
    p.add_argument("--size-mib", type=int, help="sequential file size (default 512)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test (<60 s)")
    p.add_argument("--pin", type=int, metavar="CPU", help="run everything on this one CPU")
    p.add_argument("--only", default=",".join(TARGETS),
                   help="comma-separated targets (default native,passthrough,clusterfs)")
    p.add_argument("--json", action="store_true", help="print a JSON report, not the table")
    p.add_argument("--phase-limit-s", type=float, help="stop a phase after this (default 15)")
    p.add_argument("--workdir", help="parent of the scratch directory (default: $TMPDIR)")
    p.add_argument("--no-fio", action="store_true", help="random I/O by a Python loop")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    only = tuple(t.strip() for t in args.only.split(",") if t.strip())
    unknown = [t for t in only if t not in TARGETS]
    if unknown or not only:
        raise SystemExit(f"bench_fs: --only takes {','.join(TARGETS)}; got {args.only!r}")
    quick = bool(args.quick)
    return Config(
        files=args.files or (200 if quick else 2000),
        size_mib=args.size_mib or (32 if quick else 512),
        quick=quick,
        pin_cpu=args.pin,
        only=tuple(t for t in TARGETS if t in only),
        phase_limit_s=args.phase_limit_s or (5.0 if quick else 15.0),
        fio=None if args.no_fio else shutil.which("fio"),
        no_fio=bool(args.no_fio),
        fio_size_mib=16 if quick else 256,
        fio_runtime_s=1 if quick else 10,
        py_random_ios=2000 if quick else 20000,
        can_drop_caches=os.access("/proc/sys/vm/drop_caches", os.W_OK),
    )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = make_config(args)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    if cfg.pin_cpu is not None:
        os.sched_setaffinity(0, {cfg.pin_cpu})
    work = Path(tempfile.mkdtemp(prefix="bench_fs-", dir=args.workdir))
    header = header_lines(cfg, work)
    log(header[0])
    started = time.monotonic()
    try:
        results = bench_all(work, cfg)
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); cleaned up")
        return 130
    finally:
        mounted = [p for p in work.iterdir() if is_mounted(p)]
        if mounted:
            log(f"NOT removing {work}: still mounted: {mounted}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.monotonic() - started:.0f} s")
    if args.json:
        print(json.dumps(json_report(results, cfg, header), indent=2))
    else:
        lines = [*header, "", *table_lines(results, cfg), "",
                 *note_lines(results)]
        print("\n".join(lines))
    return 1 if any(res.errors for res in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
