"""The clusterfs command line through real mounts: failed mounts (one-line reason, non-zero
exit), clean shutdown on umount/SIGTERM/SIGINT with everything flushed, daemon mode,
persistence across remounts, statfs from the block dir, backing files and fsck."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.util import (
    ClusterfsMount,
    clusterfs_command,
    free_port,
    is_mounted,
    kill_pids,
    pid_alive,
    pids_serving,
    run_cli,
    unmount,
    wait_pid_gone,
)

pytestmark = pytest.mark.mount

FAIL_TIMEOUT_S = 30


def _mount_cmd(block: Path, mnt: Path, state: Path, foreground: bool = True) -> list[str]:
    return [
        *clusterfs_command(), "mount", str(block), str(mnt), "--node", "n1",
        "--state", str(state), "--listen", f"127.0.0.1:{free_port()}",
        *(["-f"] if foreground else []),
    ]


def _expect_mount_failure(cmd: list[str], mnt: Path) -> str:
    """Run a mount that must fail; return its stderr. Cleans up if it mounted anyway."""
    before = is_mounted(mnt)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=FAIL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        if is_mounted(mnt) and not before:
            unmount(mnt, lazy=True)
        pytest.fail(f"mount did not fail within {FAIL_TIMEOUT_S} s (it mounted?)")
    finally:
        stray = [p for p in pids_serving(mnt) if p != proc.pid]
        if not before and stray:
            unmount(mnt, lazy=True)
            kill_pids(stray)
    assert proc.returncode != 0, f"mount succeeded: {out}{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line reason on stderr, got:\n{err}"
    assert "Traceback" not in err
    assert is_mounted(mnt) == before
    return lines[0]


@pytest.fixture
def dirs(fresh_base: Path) -> dict[str, Path]:
    d = {name: fresh_base / name for name in ("block", "state", "mnt", "empty")}
    for name in ("block", "mnt", "empty"):
        d[name].mkdir()
    run_cli("format", str(d["block"]), check=True)
    return d


# -- failed mounts --------------------------------------------------------------------
@pytest.mark.parametrize("foreground", [True, False], ids=["fg", "daemon"])
def test_mount_missing_block_dir(dirs: dict[str, Path], foreground: bool) -> None:
    cmd = _mount_cmd(dirs["block"].parent / "nonexistent", dirs["mnt"], dirs["state"],
                     foreground)
    line = _expect_mount_failure(cmd, dirs["mnt"])
    assert "nonexistent" in line or "block" in line.lower()


@pytest.mark.parametrize("foreground", [True, False], ids=["fg", "daemon"])
def test_mount_unformatted_block_dir(dirs: dict[str, Path], foreground: bool) -> None:
    _expect_mount_failure(
        _mount_cmd(dirs["empty"], dirs["mnt"], dirs["state"], foreground), dirs["mnt"]
    )
    assert os.listdir(dirs["empty"]) == [], "a failed mount must not format the directory"


def test_mount_point_not_a_directory(dirs: dict[str, Path]) -> None:
    f = dirs["mnt"].parent / "regular-file"
    f.write_bytes(b"")
    _expect_mount_failure(_mount_cmd(dirs["block"], f, dirs["state"]), f)
    missing = dirs["mnt"].parent / "no-such-mountpoint"
    _expect_mount_failure(_mount_cmd(dirs["block"], missing, dirs["state"]), missing)


def test_mount_point_busy(fresh_mount: ClusterfsMount, fresh_base: Path) -> None:
    other_block = fresh_base / "other-block"
    other_block.mkdir()
    run_cli("format", str(other_block), check=True)
    _expect_mount_failure(
        _mount_cmd(other_block, fresh_mount.mountpoint, fresh_base / "other-state"),
        fresh_mount.mountpoint,
    )
    assert fresh_mount.alive()
    (fresh_mount.mountpoint / "still-works").write_bytes(b"ok")
    assert fresh_mount.stop() == 0


def test_mount_without_dev_fuse(dirs: dict[str, Path]) -> None:
    """In a private mount namespace where /dev has no fuse device."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace: {probe.stderr.decode().strip()}")
    inner = " ".join(f"'{a}'" for a in _mount_cmd(dirs["block"], dirs["mnt"], dirs["state"]))
    script = f"mount -t tmpfs none /dev && exec {inner}"
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    line = _expect_mount_failure(cmd, dirs["mnt"])
    assert "fuse" in line.lower()


# -- clean shutdown --------------------------------------------------------------------
def test_exit_0_after_umount(fresh_mount: ClusterfsMount) -> None:
    (fresh_mount.mountpoint / "f").write_bytes(b"x")
    assert fresh_mount.stop() == 0
    assert not is_mounted(fresh_mount.mountpoint)
    assert not pid_alive(fresh_mount.pid)


def test_exit_0_after_plain_umount(fresh_mount: ClusterfsMount) -> None:
    subprocess.run(["umount", str(fresh_mount.mountpoint)], check=True)
    assert fresh_mount.wait_exit() == 0
    assert not is_mounted(fresh_mount.mountpoint)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_shuts_down_cleanly_and_flushes(fresh_mount: ClusterfsMount, sig: int) -> None:
    m = fresh_mount
    before = _tree_state(m.mountpoint)
    (m.mountpoint / "d" / "sub").mkdir(parents=True)
    with open(m.mountpoint / "d" / "data", "wb") as f:
        f.write(b"flushed " * 10_000)  # no fsync: a clean stop must still keep it
    os.symlink("data", m.mountpoint / "d" / "link")
    os.setxattr(m.mountpoint / "d" / "data", "user.k", b"v")
    os.chmod(m.mountpoint / "d" / "data", 0o640)
    expected = _tree_state(m.mountpoint)
    assert expected != before
    assert m.terminate(sig) == 0
    assert not is_mounted(m.mountpoint), "the mount is still there after the daemon exited"
    m.start()
    assert _tree_state(m.mountpoint) == expected
    assert m.stop() == 0


def test_daemon_mode(dirs: dict[str, Path]) -> None:
    """Without -f the command returns 0 once the mount is live; the daemon it leaves
    behind serves the mount and exits when it is unmounted."""
    mnt = dirs["mnt"]
    try:
        proc = subprocess.run(_mount_cmd(dirs["block"], mnt, dirs["state"], foreground=False),
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(mnt) and os.path.ismount(mnt), "command returned before the mount"
        daemons = pids_serving(mnt)
        assert len(daemons) == 1, f"expected one daemon, found {daemons}"
        (mnt / "f").write_bytes(b"served by the daemon")
        assert (mnt / "f").read_bytes() == b"served by the daemon"
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert wait_pid_gone(daemons[0], 30), "daemon did not exit after umount"
        assert not is_mounted(mnt)
    finally:
        stray = pids_serving(mnt)
        if is_mounted(mnt):
            unmount(mnt) or unmount(mnt, lazy=True)
        for pid in stray:
            wait_pid_gone(pid, 10)
        kill_pids([p for p in stray if pid_alive(p)])


# -- persistence -----------------------------------------------------------------------
def _tree_state(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rec: dict[str, Any] = {
                "ino": st.st_ino, "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
                "nlink": st.st_nlink, "mtime_ns": st.st_mtime_ns, "rdev": st.st_rdev,
                "xattrs": {k: os.getxattr(p, k, follow_symlinks=False)
                           for k in os.listxattr(p, follow_symlinks=False)},
            }
            if stat.S_ISREG(st.st_mode):
                rec["data"] = p.read_bytes()
                rec["size"] = st.st_size
            elif stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(p)
            out[str(p.relative_to(root))] = rec
    return out


def test_everything_survives_remount(fresh_mount: ClusterfsMount) -> None:
    m = fresh_mount
    r = m.mountpoint
    (r / "a" / "b" / "c").mkdir(parents=True)
    (r / "a" / "file").write_bytes(b"content\0with nul")
    os.link(r / "a" / "file", r / "a" / "b" / "hard")
    os.symlink("../file", r / "a" / "b" / "sym")
    os.mknod(r / "chr", stat.S_IFCHR | 0o600, os.makedev(10, 200))
    os.mkfifo(r / "fifo")
    (r / "sparse").write_bytes(b"")
    os.truncate(r / "sparse", 5_000_000)
    os.chown(r / "a" / "b", 1000, 2000)
    os.chmod(r / "a" / "b" / "c", 0o3750)
    os.setxattr(r / "a", "user.dir", b"d" * 1000)
    os.utime(r / "a" / "file", ns=(1_111_111_111_222_333_444, 1_222_222_222_333_444_555))
    expected = _tree_state(r)
    root_ino = os.lstat(r).st_ino
    m.remount()
    assert _tree_state(r) == expected
    assert os.lstat(r).st_ino == root_ino
    # the inode counter must not hand out numbers again after a remount
    (r / "new").write_bytes(b"")
    assert os.lstat(r / "new").st_ino not in {v["ino"] for v in expected.values()}
    assert m.stop() == 0


# -- statfs, backing files, fsck ---------------------------------------------------------
def test_statfs_reports_block_dir_storage(cfs: tuple[ClusterfsMount, Path]) -> None:
    mount, _root = cfs
    ours, under = os.statvfs(mount.mountpoint), os.statvfs(mount.blockdir)
    total, under_total = ours.f_blocks * ours.f_frsize, under.f_blocks * under.f_frsize
    assert abs(total - under_total) <= under_total * 0.01
    avail, under_avail = ours.f_bavail * ours.f_frsize, under.f_bavail * under.f_frsize
    assert abs(avail - under_avail) <= under_total * 0.02
    free, under_free = ours.f_bfree * ours.f_frsize, under.f_bfree * under.f_frsize
    assert abs(free - under_free) <= under_total * 0.02


def _wait_backing_count(mount: ClusterfsMount, expected: int, timeout_s: float = 10) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        n = len(mount.backing_files())
        if n == expected or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def test_one_backing_file_per_regular_inode(cfs: tuple[ClusterfsMount, Path]) -> None:
    mount, root = cfs
    base = len(mount.backing_files())
    for i in range(5):
        (root / f"f{i}").write_bytes(b"x" * i)
    os.link(root / "f1", root / "f1-link")
    os.rename(root / "f2", root / "f2-renamed")
    (root / "d").mkdir()
    os.symlink("f1", root / "sym")
    os.mkfifo(root / "fifo")
    assert _wait_backing_count(mount, base + 5) == base + 5
    os.unlink(root / "f1")
    assert _wait_backing_count(mount, base + 5) == base + 5  # f1-link still names it
    os.unlink(root / "f1-link")
    os.rename(root / "f3", root / "f4")  # replaces f4
    assert _wait_backing_count(mount, base + 3) == base + 3


def test_unlink_while_open_leaks_no_backing_file(cfs: tuple[ClusterfsMount, Path]) -> None:
    mount, root = cfs
    base = len(mount.backing_files())
    p = root / "f"
    p.write_bytes(b"payload" * 1000)
    assert _wait_backing_count(mount, base + 1) == base + 1
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        time.sleep(0.2)
        assert len(mount.backing_files()) == base + 1, "data removed while still open"
        assert os.pread(fd, 7, 0) == b"payload"
        os.pwrite(fd, b"more", 7000)
        assert os.pread(fd, 4, 7000) == b"more"
    finally:
        os.close(fd)
    assert _wait_backing_count(mount, base) == base, "backing file leaked after last close"


def test_rename_over_open_file_leaks_nothing(cfs: tuple[ClusterfsMount, Path]) -> None:
    mount, root = cfs
    base = len(mount.backing_files())
    (root / "old").write_bytes(b"old")
    (root / "new").write_bytes(b"new")
    fd = os.open(root / "old", os.O_RDONLY)
    try:
        os.rename(root / "new", root / "old")
        assert os.read(fd, 10) == b"old"
    finally:
        os.close(fd)
    assert _wait_backing_count(mount, base + 1) == base + 1


def test_fsck_clean_then_finds_and_repairs(fresh_mount: ClusterfsMount) -> None:
    m = fresh_mount
    before = set(m.backing_files())
    (m.mountpoint / "victim").write_bytes(b"data")
    (m.mountpoint / "keep").write_bytes(b"keep")
    created = set(m.backing_files()) - before
    assert len(created) == 2
    victim_ino = os.lstat(m.mountpoint / "victim").st_ino
    assert m.stop() == 0
    clean = m.fsck()
    assert clean.returncode == 0, f"fsck of a clean stop:\n{clean.stdout}{clean.stderr}"

    # a missing backing file ...
    victim_backing = next(p for p in created if p.name == f"{victim_ino:x}"
                          or p.name == str(victim_ino))
    victim_backing.unlink()
    # ... and an orphaned one, named like a backing file of the same fan-out directory
    orphan_ino = victim_ino + 256 * 4096
    hex_names = victim_backing.name == f"{victim_ino:x}"
    orphan = victim_backing.parent / (f"{orphan_ino:x}" if hex_names else str(orphan_ino))
    orphan.write_bytes(b"orphan")
    found = m.fsck()
    assert found.returncode == 1, f"fsck must report problems:\n{found.stdout}{found.stderr}"
    report = found.stdout + found.stderr
    assert orphan.name in report, f"fsck does not name the orphaned backing file:\n{report}"
    assert str(victim_ino) in report or f"{victim_ino:x}" in report, (
        f"fsck does not name inode {victim_ino}, whose backing file is missing:\n{report}"
    )
    assert orphan.exists(), "fsck without --repair must not change anything"
    repaired = m.fsck("--repair")
    assert repaired.returncode == 0, f"fsck --repair:\n{repaired.stdout}{repaired.stderr}"
    again = m.fsck()
    assert again.returncode == 0, f"fsck after repair:\n{again.stdout}{again.stderr}"
    assert not orphan.exists()
    m.start()
    assert (m.mountpoint / "keep").read_bytes() == b"keep"
    for name in os.listdir(m.mountpoint):  # whatever repair did, entries can be read
        (m.mountpoint / name).read_bytes()
    assert m.stop() == 0


def test_fsck_repair_fixes_what_it_reports(fresh_mount: ClusterfsMount) -> None:
    """A backing-file-like name in the wrong fan-out directory (no inode owns it there) is
    reported, and --repair exiting 0 means a second fsck finds the block dir clean."""
    m = fresh_mount
    (m.mountpoint / "f").write_bytes(b"data")
    ino = os.lstat(m.mountpoint / "f").st_ino
    (backing,) = m.backing_files()
    assert m.stop() == 0
    name = f"{ino + 1:x}" if backing.name == f"{ino:x}" else str(ino + 1)
    stray = backing.parent / name  # inode ino+1 would live in another fan-out directory
    stray.write_bytes(b"?")
    found = m.fsck()
    assert found.returncode == 1, f"fsck must report {stray}:\n{found.stdout}{found.stderr}"
    repaired = m.fsck("--repair")
    again = m.fsck()
    assert repaired.returncode != 0 or again.returncode == 0, (
        f"--repair exited 0 but fsck still finds problems:\n{again.stdout}{again.stderr}"
    )
    assert backing.exists()
