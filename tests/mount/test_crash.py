"""kill -9 of the daemon in the middle of a metadata-heavy workload, then remount: every
acknowledged change is there, every entry can be stat'ed and read, link counts are right,
and fsck finds nothing to repair."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterfs import status
from tests.mount.crash_workload import expected_trees, read_log, snapshot
from tests.util import ClusterfsMount

pytestmark = pytest.mark.mount

REPO = Path(__file__).resolve().parents[2]
WORKERS = 2
ACKED_BEFORE_KILL = 250  # acknowledged ops (all workers) before the daemon is killed
DEAD_MOUNT_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED}


def _start_worker(root: Path, log: Path, seed: int, max_ops: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.mount.crash_workload", str(root), str(log), str(seed),
         str(max_ops)],
        cwd=REPO, stdin=subprocess.DEVNULL,
    )


def _acked(log: Path) -> int:
    try:
        return log.read_text().count('"state": "ok"')
    except FileNotFoundError:
        return 0


def _stop_workers(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()  # by PID: this Popen's own child
            proc.wait()


def _check_tree(root: Path, log: Path) -> list[str]:
    candidates, acked = expected_trees(log)
    found, problems = snapshot(root)
    if found not in candidates:
        problems = [
            *problems,
            f"tree differs from the {acked} acknowledged ops (+/- the one in flight):",
            *candidates[0].diff(found),
        ]
    return [f"{root.name}: {p}" for p in problems]


def test_workload_model_matches(fs_root: Path) -> None:
    """The workload and its model agree on a file system nobody kills (proves the model
    on ext4, and checks clusterfs without a crash)."""
    log = fs_root.parent / f"{fs_root.name}.workload.log"
    try:
        proc = _start_worker(fs_root, log, seed=5, max_ops=600)
        assert proc.wait(timeout=120) == 0, log.read_text()[-2000:]
        done, pending, end = read_log(log)
        assert pending is None and end["state"] == "done"
        assert len(done) == 600
        assert _check_tree(fs_root, log) == []
    finally:
        log.unlink(missing_ok=True)


@pytest.mark.slow
def test_kill9_during_metadata_workload(fresh_mount: ClusterfsMount) -> None:
    m = fresh_mount
    logs: list[tuple[Path, Path]] = []
    for rnd in range(2):
        round_dir = m.mountpoint / f"round{rnd}"
        round_dir.mkdir()
        procs = []
        for w in range(WORKERS):
            wroot = round_dir / f"w{w}"
            wroot.mkdir()
            log = m.base / f"round{rnd}-w{w}.log"
            logs.append((wroot, log))
            procs.append(_start_worker(wroot, log, seed=100 * rnd + w, max_ops=100_000))
        round_logs = [log for _, log in logs[-WORKERS:]]
        try:
            deadline = time.monotonic() + 60
            while sum(_acked(log) for log in round_logs) < ACKED_BEFORE_KILL:
                assert time.monotonic() < deadline, "workload made too little progress"
                assert all(p.poll() is None for p in procs), "a worker stopped early"
                time.sleep(0.02)
            m.kill9(unmount_dead=False)
            _stop_workers(procs, timeout_s=30)
        finally:
            _stop_workers(procs, timeout_s=0)
            if not m.alive():
                m.unmount_dead()
        for log in round_logs:
            _done, _pending, end = read_log(log)
            assert end.get("state") == "error", f"{log.name}: worker did not stop on an error"
            assert end["errno"] in DEAD_MOUNT_ERRNOS, (
                f"{log.name}: worker failed with {errno.errorcode.get(end['errno'])} "
                f"({end['error']}) - not a dead-mount error"
            )
        m.start()
        problems = [p for wroot, log in logs for p in _check_tree(wroot, log)]
        assert not problems, "after kill -9 and remount:\n" + "\n".join(problems)
    assert m.stop() == 0
    fsck = m.fsck()
    assert fsck.returncode == 0, f"fsck after crash+remount:\n{fsck.stdout}{fsck.stderr}"


def test_kill9_with_unlinked_open_file(fresh_mount: ClusterfsMount) -> None:
    """A file unlinked while open when the daemon dies is reclaimed: after remount no
    backing file is left for it (ext4 processes its orphan list the same way)."""
    m = fresh_mount
    (m.mountpoint / "keep").write_bytes(b"keep")
    victim = m.mountpoint / "victim"
    victim.write_bytes(b"x" * 10_000)
    fd = os.open(victim, os.O_RDONLY)
    try:
        os.unlink(victim)
        assert os.read(fd, 4) == b"xxxx"
        m.kill9(unmount_dead=False)
    finally:
        with contextlib.suppress(OSError):  # the connection is gone
            os.close(fd)
    # What cleanup paths must ask: os.path.ismount meets ENOTCONN on a dead FUSE mount.
    assert status.is_mounted(m.mountpoint) and not os.path.ismount(m.mountpoint)
    m.unmount_dead()
    assert not status.is_mounted(m.mountpoint)
    m.start()
    assert os.listdir(m.mountpoint) == ["keep"]
    assert (m.mountpoint / "keep").read_bytes() == b"keep"
    assert m.stop() == 0
    fsck = m.fsck()
    assert fsck.returncode == 0, f"fsck:\n{fsck.stdout}{fsck.stderr}"
    assert len(m.backing_files()) == 1, f"backing files: {m.backing_files()}"
