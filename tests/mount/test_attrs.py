"""lookup/getattr/setattr/mknod through the mount, checked against ext4 (fs_root params)."""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.util import UTIME_NOW, UTIME_OMIT, errname, errno_of, expect_errno, utimensat

pytestmark = pytest.mark.mount

# Kernel timestamps come from a coarse clock; allow this much before "now".
CLOCK_SLACK_NS = 20_000_000


def _tick() -> None:
    """Let the clock advance past the kernel's timestamp granularity."""
    time.sleep(0.03)


# -- lookup / getattr ---------------------------------------------------------------
def test_stat_new_file(fs_root: Path) -> None:
    before_ns = time.time_ns() - CLOCK_SLACK_NS
    p = fs_root / "f"
    p.write_bytes(b"hello")
    st = os.lstat(p)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert st.st_nlink == 1
    assert st.st_size == 5
    assert st.st_ino != os.lstat(fs_root).st_ino
    assert st.st_dev == os.lstat(fs_root).st_dev
    now_ns = time.time_ns() + CLOCK_SLACK_NS
    for t in (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns):
        assert before_ns <= t <= now_ns


def test_stat_blocks_and_blksize(fs_root: Path) -> None:
    p = fs_root / "f"
    with open(p, "wb") as f:
        f.write(b"x" * 100_000)
        f.flush()
        os.fsync(f.fileno())
    st = os.stat(p)
    assert st.st_size == 100_000
    assert st.st_blocks * 512 >= 100_000
    assert st.st_blksize > 0


def test_ino_stable(fs_root: Path) -> None:
    p = fs_root / "f"
    p.write_bytes(b"")
    ino = os.lstat(p).st_ino
    assert os.stat(p).st_ino == ino
    with open(p, "rb") as f:
        assert os.fstat(f.fileno()).st_ino == ino
    os.chmod(p, 0o600)
    assert os.lstat(p).st_ino == ino
    os.rename(p, fs_root / "g")
    assert os.lstat(fs_root / "g").st_ino == ino
    entries = {e.name: e.inode() for e in os.scandir(fs_root)}
    assert entries == {"g": ino}
    (fs_root / "h").write_bytes(b"")
    assert os.lstat(fs_root / "h").st_ino != ino


def test_lookup_missing(fs_root: Path) -> None:
    expect_errno(errno.ENOENT, os.lstat, fs_root / "nope")
    (fs_root / "file").write_bytes(b"")
    expect_errno(errno.ENOTDIR, os.lstat, fs_root / "file" / "x")
    expect_errno(errno.ENOENT, os.lstat, fs_root / "nodir" / "x")


def test_name_too_long(fs_root: Path) -> None:
    ok = "a" * 255
    long = "b" * 256
    (fs_root / ok).write_bytes(b"ok")
    assert os.listdir(fs_root) == [ok]
    assert (fs_root / ok).read_bytes() == b"ok"
    calls: list[tuple[Callable[..., object], tuple[object, ...]]] = [
        (os.lstat, (fs_root / long,)),
        (os.open, (fs_root / long, os.O_CREAT | os.O_WRONLY)),
        (os.mkdir, (fs_root / long,)),
        (os.symlink, ("t", fs_root / long)),
        (os.mknod, (fs_root / long, stat.S_IFIFO | 0o644)),
        (os.link, (fs_root / ok, fs_root / long)),
        (os.rename, (fs_root / ok, fs_root / long)),
        (os.unlink, (fs_root / long,)),
    ]
    wrong = []
    for func, args in calls:
        got = errno_of(func, *args)
        if got != errno.ENAMETOOLONG:
            wrong.append(f"{func.__name__}: got {errname(got)}")
    assert not wrong, "expected ENAMETOOLONG for a 256-byte name: " + "; ".join(wrong)
    assert os.listdir(fs_root) == [ok]


def test_statvfs_sane(fs_root: Path) -> None:
    sv = os.statvfs(fs_root)
    assert sv.f_bsize > 0
    assert sv.f_frsize > 0
    assert sv.f_blocks > 0
    assert 0 < sv.f_bfree <= sv.f_blocks
    assert 0 < sv.f_bavail <= sv.f_bfree
    assert sv.f_ffree <= sv.f_files
    assert sv.f_namemax == 255


# -- setattr ----------------------------------------------------------------------
def test_chmod(fs_root: Path) -> None:
    p = fs_root / "f"
    p.write_bytes(b"data")
    st0 = os.lstat(p)
    _tick()
    for mode in (0o600, 0o4755, 0o2755, 0o1777, 0o000, 0o7777):
        os.chmod(p, mode)
        assert stat.S_IMODE(os.lstat(p).st_mode) == mode
    st = os.lstat(p)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_ctime_ns > st0.st_ctime_ns
    assert st.st_mtime_ns == st0.st_mtime_ns
    assert p.read_bytes() == b"data"  # root reads a 07777 file fine


def test_fchmod_dir(fs_root: Path) -> None:
    d = fs_root / "d"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fchmod(fd, 0o3710)
    finally:
        os.close(fd)
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o3710


def test_chown(fs_root: Path) -> None:
    p = fs_root / "f"
    p.write_bytes(b"")
    st0 = os.lstat(p)
    _tick()
    os.chown(p, 1000, 1001)
    st = os.lstat(p)
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert st.st_ctime_ns > st0.st_ctime_ns
    os.chown(p, -1, 2000)
    assert (os.lstat(p).st_uid, os.lstat(p).st_gid) == (1000, 2000)
    os.chown(p, 3000, -1)
    assert (os.lstat(p).st_uid, os.lstat(p).st_gid) == (3000, 2000)


def test_lchown_symlink(fs_root: Path) -> None:
    (fs_root / "t").write_bytes(b"")
    os.symlink("t", fs_root / "l")
    os.chown(fs_root / "l", 1000, 1000, follow_symlinks=False)
    assert (os.lstat(fs_root / "l").st_uid, os.lstat(fs_root / "l").st_gid) == (1000, 1000)
    assert (os.stat(fs_root / "t").st_uid, os.stat(fs_root / "t").st_gid) == (0, 0)


def test_truncate_grow_shrink(fs_root: Path) -> None:
    p = fs_root / "f"
    p.write_bytes(b"hello")
    st0 = os.lstat(p)
    _tick()
    os.truncate(p, 10_000)
    st = os.lstat(p)
    assert st.st_size == 10_000
    assert st.st_mtime_ns > st0.st_mtime_ns
    assert st.st_ctime_ns > st0.st_ctime_ns
    assert p.read_bytes() == b"hello" + bytes(9_995)
    os.truncate(p, 3)
    assert os.lstat(p).st_size == 3
    assert p.read_bytes() == b"hel"
    with open(p, "r+b") as f:
        os.ftruncate(f.fileno(), 1)
        assert os.fstat(f.fileno()).st_size == 1
        os.ftruncate(f.fileno(), 4)
        assert f.read() == b"h\0\0\0"
    os.truncate(p, 0)
    assert p.read_bytes() == b""
    # shrink then grow must not resurrect old bytes
    p.write_bytes(b"abcdef")
    os.truncate(p, 2)
    os.truncate(p, 6)
    assert p.read_bytes() == b"ab\0\0\0\0"


def test_truncate_errors(fs_root: Path) -> None:
    d = fs_root / "d"
    d.mkdir()
    expect_errno(errno.EISDIR, os.truncate, d, 0)
    expect_errno(errno.ENOENT, os.truncate, fs_root / "missing", 0)
    p = fs_root / "f"
    p.write_bytes(b"x")
    expect_errno(errno.EINVAL, os.truncate, p, -1)


def test_utime_seconds_and_ns(fs_root: Path) -> None:
    p = fs_root / "f"
    p.write_bytes(b"")
    os.utime(p, (1_000_000_000, 1_100_000_000))
    st = os.lstat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000 * 10**9, 1_100_000_000 * 10**9)
    atime_ns, mtime_ns = 1_234_567_890_123_456_789, 1_300_000_000_987_654_321
    os.utime(p, ns=(atime_ns, mtime_ns))
    st = os.lstat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime_ns, mtime_ns)
    future_ns = (2**33) * 10**9 + 5  # year 2242
    os.utime(p, ns=(future_ns, future_ns))
    assert os.lstat(p).st_mtime_ns == future_ns


def test_utime_now_and_ctime(fs_root: Path) -> None:
    p = fs_root / "f"
    p.write_bytes(b"")
    os.utime(p, ns=(10**18, 10**18))
    ctime0 = os.lstat(p).st_ctime_ns
    _tick()
    before_ns = time.time_ns() - CLOCK_SLACK_NS
    os.utime(p)
    after_ns = time.time_ns() + CLOCK_SLACK_NS
    st = os.lstat(p)
    assert before_ns <= st.st_atime_ns <= after_ns
    assert before_ns <= st.st_mtime_ns <= after_ns
    assert st.st_ctime_ns > ctime0


def test_utimensat_omit_and_now(fs_root: Path) -> None:
    p = fs_root / "f"
    p.write_bytes(b"")
    os.utime(p, ns=(1_000_000_000_111, 2_000_000_000_222))
    # atime OMIT, mtime explicit
    utimensat(p, (0, UTIME_OMIT), (3000, 333))
    st = os.lstat(p)
    assert st.st_atime_ns == 1_000_000_000_111
    assert st.st_mtime_ns == 3000 * 10**9 + 333
    # atime NOW, mtime OMIT
    before_ns = time.time_ns() - CLOCK_SLACK_NS
    utimensat(p, (0, UTIME_NOW), (0, UTIME_OMIT))
    st = os.lstat(p)
    assert st.st_atime_ns >= before_ns
    assert st.st_mtime_ns == 3000 * 10**9 + 333
    # both OMIT: nothing changes, not even ctime
    ctime_ns = st.st_ctime_ns
    _tick()
    utimensat(p, (0, UTIME_OMIT), (0, UTIME_OMIT))
    st2 = os.lstat(p)
    assert (st2.st_atime_ns, st2.st_mtime_ns, st2.st_ctime_ns) == (
        st.st_atime_ns, st.st_mtime_ns, ctime_ns,
    )
    # mtime NOW, atime explicit
    utimensat(p, (5, 6), (0, UTIME_NOW))
    st = os.lstat(p)
    assert st.st_atime_ns == 5 * 10**9 + 6
    assert st.st_mtime_ns >= before_ns


def test_utime_symlink_nofollow(fs_root: Path) -> None:
    (fs_root / "t").write_bytes(b"")
    os.utime(fs_root / "t", ns=(10**18, 10**18))
    os.symlink("t", fs_root / "l")
    os.utime(fs_root / "l", ns=(7 * 10**17, 8 * 10**17), follow_symlinks=False)
    assert os.lstat(fs_root / "l").st_mtime_ns == 8 * 10**17
    assert os.stat(fs_root / "t").st_mtime_ns == 10**18


def test_utime_directory(fs_root: Path) -> None:
    d = fs_root / "d"
    d.mkdir()
    os.utime(d, ns=(4 * 10**17, 5 * 10**17))
    st = os.lstat(d)
    assert (st.st_atime_ns, st.st_mtime_ns) == (4 * 10**17, 5 * 10**17)


# -- mknod --------------------------------------------------------------------------
def test_mknod_regular(fs_root: Path) -> None:
    p = fs_root / "reg"
    os.mknod(p, stat.S_IFREG | 0o640)
    st = os.lstat(p)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_size == 0
    p.write_bytes(b"data")
    assert p.read_bytes() == b"data"


def test_mknod_fifo(fs_root: Path) -> None:
    p = fs_root / "fifo"
    os.mknod(p, stat.S_IFIFO | 0o644)
    assert stat.S_ISFIFO(os.lstat(p).st_mode)
    os.mkfifo(fs_root / "fifo2", 0o600)
    st = os.lstat(fs_root / "fifo2")
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    # the fifo works: data goes through the kernel pipe
    rfd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    try:
        wfd = os.open(p, os.O_WRONLY)
        try:
            os.write(wfd, b"through the fifo")
        finally:
            os.close(wfd)
        assert os.read(rfd, 100) == b"through the fifo"
    finally:
        os.close(rfd)


def test_mknod_socket(fs_root: Path) -> None:
    p = fs_root / "sock"
    os.mknod(p, stat.S_IFSOCK | 0o755)
    assert stat.S_ISSOCK(os.lstat(p).st_mode)


def test_unix_socket_bind_connect(fs_root: Path) -> None:
    p = fs_root / "s"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(os.fspath(p))
        server.listen(1)
        assert stat.S_ISSOCK(os.lstat(p).st_mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(os.fspath(p))
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"


@pytest.mark.parametrize(
    ("kind", "dev"),
    [(stat.S_IFCHR, (1, 3)), (stat.S_IFBLK, (8, 17)), (stat.S_IFCHR, (4095, 1048575))],
    ids=["chr-null", "blk-sdb1", "chr-max"],
)
def test_mknod_device_nodes(fs_root: Path, kind: int, dev: tuple[int, int]) -> None:
    p = fs_root / "dev"
    rdev = os.makedev(*dev)
    os.mknod(p, kind | 0o600, rdev)
    st = os.lstat(p)
    assert stat.S_IFMT(st.st_mode) == kind
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_rdev == rdev
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == dev


def test_mknod_existing(fs_root: Path) -> None:
    (fs_root / "x").write_bytes(b"")
    expect_errno(errno.EEXIST, os.mknod, fs_root / "x", stat.S_IFIFO | 0o644)
    expect_errno(errno.ENOENT, os.mknod, fs_root / "no" / "x", stat.S_IFIFO | 0o644)


# -- access (as root; non-root cases are in test_permissions) ------------------------
def test_access_root(fs_root: Path) -> None:
    p = fs_root / "f"
    p.write_bytes(b"")
    os.chmod(p, 0o000)
    assert os.access(p, os.F_OK)
    assert os.access(p, os.R_OK | os.W_OK)
    assert not os.access(p, os.X_OK)  # root needs at least one x bit
    os.chmod(p, 0o010)
    assert os.access(p, os.X_OK)
    assert not os.access(fs_root / "missing", os.F_OK)
    d = fs_root / "d"
    d.mkdir(mode=0o000)
    assert os.access(d, os.R_OK | os.W_OK | os.X_OK)
