"""mkdir/rmdir/unlink/symlink/readlink/link and parent times, checked against ext4."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.util import expect_errno

pytestmark = pytest.mark.mount


def _tick() -> None:
    time.sleep(0.03)


# -- mkdir / rmdir ------------------------------------------------------------------
def test_mkdir_nlink(fs_root: Path) -> None:
    d = fs_root / "d"
    d.mkdir()
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_nlink == 2
    assert os.lstat(fs_root).st_nlink == 3
    (d / "a").mkdir()
    (d / "b").mkdir()
    (d / "file").write_bytes(b"")
    os.symlink("a", d / "link")
    assert os.lstat(d).st_nlink == 4  # files and symlinks do not count
    assert os.lstat(d / "a").st_nlink == 2
    os.rmdir(d / "a")
    assert os.lstat(d).st_nlink == 3
    assert os.stat(d / "b" / "..").st_ino == os.lstat(d).st_ino
    assert os.stat(os.path.join(d, ".")).st_ino == os.lstat(d).st_ino


def test_mkdir_mode(fs_root: Path) -> None:
    os.mkdir(fs_root / "d", 0o700)
    assert stat.S_IMODE(os.lstat(fs_root / "d").st_mode) == 0o700
    os.mkdir(fs_root / "e", 0o1777)
    assert stat.S_IMODE(os.lstat(fs_root / "e").st_mode) == 0o1755  # umask 022


def test_mkdir_errors(fs_root: Path) -> None:
    (fs_root / "d").mkdir()
    (fs_root / "f").write_bytes(b"")
    os.symlink("dangling", fs_root / "l")
    expect_errno(errno.EEXIST, os.mkdir, fs_root / "d")
    expect_errno(errno.EEXIST, os.mkdir, fs_root / "f")
    expect_errno(errno.EEXIST, os.mkdir, fs_root / "l")
    expect_errno(errno.ENOENT, os.mkdir, fs_root / "missing" / "x")
    expect_errno(errno.ENOTDIR, os.mkdir, fs_root / "f" / "x")


def test_rmdir(fs_root: Path) -> None:
    d = fs_root / "d"
    d.mkdir()
    (d / "f").write_bytes(b"")
    (fs_root / "file").write_bytes(b"")
    (fs_root / "empty").mkdir()
    expect_errno(errno.ENOTEMPTY, os.rmdir, d)
    expect_errno(errno.ENOTDIR, os.rmdir, fs_root / "file")
    expect_errno(errno.ENOENT, os.rmdir, fs_root / "missing")
    expect_errno(errno.EINVAL, os.rmdir, os.path.join(fs_root, "empty", "."))
    os.unlink(d / "f")
    os.rmdir(d)
    os.rmdir(fs_root / "empty")
    expect_errno(errno.ENOENT, os.lstat, d)
    assert os.lstat(fs_root).st_nlink == 2
    assert os.listdir(fs_root) == ["file"]


def test_rmdir_nonempty_by_subdir_and_symlink(fs_root: Path) -> None:
    (fs_root / "a" / "b").mkdir(parents=True)
    expect_errno(errno.ENOTEMPTY, os.rmdir, fs_root / "a")
    os.mkdir(fs_root / "c")
    os.symlink("x", fs_root / "c" / "l")
    expect_errno(errno.ENOTEMPTY, os.rmdir, fs_root / "c")


def test_rmdir_while_open(fs_root: Path) -> None:
    d = fs_root / "d"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(d)
        assert os.fstat(fd).st_nlink == 0
        expect_errno(errno.ENOENT, os.open, "x", os.O_CREAT | os.O_WRONLY, dir_fd=fd)
        assert os.listdir(fd) == []
    finally:
        os.close(fd)


# -- unlink -------------------------------------------------------------------------
def test_unlink(fs_root: Path) -> None:
    p = fs_root / "f"
    p.write_bytes(b"x")
    os.unlink(p)
    expect_errno(errno.ENOENT, os.lstat, p)
    assert os.listdir(fs_root) == []
    (fs_root / "d").mkdir()
    expect_errno(errno.EISDIR, os.unlink, fs_root / "d")
    expect_errno(errno.ENOENT, os.unlink, fs_root / "missing")
    (fs_root / "file").write_bytes(b"")
    expect_errno(errno.ENOTDIR, os.unlink, fs_root / "file" / "x")


def test_unlink_symlink_not_target(fs_root: Path) -> None:
    (fs_root / "t").write_bytes(b"keep")
    os.symlink("t", fs_root / "l")
    os.unlink(fs_root / "l")
    assert (fs_root / "t").read_bytes() == b"keep"
    assert os.listdir(fs_root) == ["t"]


# -- symlink / readlink -------------------------------------------------------------
def test_symlink_readlink(fs_root: Path) -> None:
    (fs_root / "target").write_bytes(b"content")
    os.symlink("target", fs_root / "l")
    st = os.lstat(fs_root / "l")
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len("target")
    assert st.st_nlink == 1
    assert os.readlink(fs_root / "l") == "target"
    assert (fs_root / "l").read_bytes() == b"content"
    assert os.stat(fs_root / "l").st_ino == os.lstat(fs_root / "target").st_ino
    # absolute, dangling, binary-ish and long targets are stored verbatim
    for name, target in [
        ("abs", "/etc/hostname"),
        ("dangling", "does/not/exist"),
        ("odd", "a b\tc\u00e9\u2603"),
        ("long", "x/" * 2000),
    ]:
        os.symlink(target, fs_root / name)
        assert os.readlink(fs_root / name) == target
        assert os.lstat(fs_root / name).st_size == len(os.fsencode(target))
    expect_errno(errno.ENOENT, os.stat, fs_root / "dangling")


def test_symlink_errors(fs_root: Path) -> None:
    (fs_root / "f").write_bytes(b"")
    (fs_root / "d").mkdir()
    expect_errno(errno.EEXIST, os.symlink, "x", fs_root / "f")
    expect_errno(errno.EEXIST, os.symlink, "x", fs_root / "d")
    expect_errno(errno.EINVAL, os.readlink, fs_root / "f")
    expect_errno(errno.EINVAL, os.readlink, fs_root / "d")
    expect_errno(errno.ENOENT, os.readlink, fs_root / "missing")
    expect_errno(errno.ENOENT, os.symlink, "", fs_root / "empty-target")


def test_symlink_loop(fs_root: Path) -> None:
    os.symlink("b", fs_root / "a")
    os.symlink("a", fs_root / "b")
    os.symlink("self", fs_root / "self")
    expect_errno(errno.ELOOP, os.open, fs_root / "a", os.O_RDONLY)
    expect_errno(errno.ELOOP, os.open, fs_root / "self", os.O_RDONLY)
    expect_errno(errno.ELOOP, os.stat, fs_root / "a")
    expect_errno(errno.ELOOP, os.open, fs_root / "a", os.O_RDONLY | os.O_CREAT)
    expect_errno(errno.ELOOP, os.open, fs_root / "a", os.O_RDONLY | os.O_NOFOLLOW)
    assert stat.S_ISLNK(os.lstat(fs_root / "a").st_mode)


def test_symlink_to_dir_traversal(fs_root: Path) -> None:
    (fs_root / "real" / "sub").mkdir(parents=True)
    (fs_root / "real" / "sub" / "f").write_bytes(b"deep")
    os.symlink("real/sub", fs_root / "l")
    assert (fs_root / "l" / "f").read_bytes() == b"deep"
    assert os.listdir(fs_root / "l") == ["f"]
    expect_errno(errno.ENOTDIR, os.rmdir, fs_root / "l")


# -- hard links ---------------------------------------------------------------------
def test_hard_links(fs_root: Path) -> None:
    a = fs_root / "a"
    a.write_bytes(b"shared")
    (fs_root / "d").mkdir()
    st0 = os.lstat(a)
    _tick()
    os.link(a, fs_root / "b")
    os.link(a, fs_root / "d" / "c")
    for p in (a, fs_root / "b", fs_root / "d" / "c"):
        st = os.lstat(p)
        assert st.st_nlink == 3
        assert st.st_ino == st0.st_ino
    assert os.lstat(a).st_ctime_ns > st0.st_ctime_ns
    assert os.lstat(fs_root / "d").st_nlink == 2  # links to files do not count
    with open(fs_root / "b", "ab") as f:
        f.write(b"+more")
    assert (fs_root / "d" / "c").read_bytes() == b"shared+more"
    os.unlink(a)
    assert os.lstat(fs_root / "b").st_nlink == 2
    os.unlink(fs_root / "b")
    assert os.lstat(fs_root / "d" / "c").st_nlink == 1
    assert (fs_root / "d" / "c").read_bytes() == b"shared+more"


def test_hard_link_errors(fs_root: Path) -> None:
    (fs_root / "f").write_bytes(b"")
    (fs_root / "g").write_bytes(b"")
    (fs_root / "d").mkdir()
    expect_errno(errno.EPERM, os.link, fs_root / "d", fs_root / "d2")
    expect_errno(errno.EEXIST, os.link, fs_root / "f", fs_root / "g")
    expect_errno(errno.EEXIST, os.link, fs_root / "f", fs_root / "d")
    expect_errno(errno.ENOENT, os.link, fs_root / "missing", fs_root / "h")
    expect_errno(errno.ENOENT, os.link, fs_root / "f", fs_root / "nodir" / "h")
    assert os.lstat(fs_root / "f").st_nlink == 1


def test_hard_link_symlink_and_special(fs_root: Path) -> None:
    os.symlink("target", fs_root / "l")
    os.link(fs_root / "l", fs_root / "l2", follow_symlinks=False)
    assert os.lstat(fs_root / "l2").st_nlink == 2
    assert os.readlink(fs_root / "l2") == "target"
    os.mkfifo(fs_root / "p")
    os.link(fs_root / "p", fs_root / "p2")
    assert os.lstat(fs_root / "p").st_nlink == 2
    assert stat.S_ISFIFO(os.lstat(fs_root / "p2").st_mode)


# -- parent ctime/mtime -------------------------------------------------------------
def _times(p: Path) -> tuple[int, int]:
    st = os.lstat(p)
    return st.st_mtime_ns, st.st_ctime_ns


def _assert_changed(p: Path, before: tuple[int, int], what: str) -> None:
    mtime_ns, ctime_ns = _times(p)
    assert mtime_ns > before[0], f"{what}: mtime of {p.name} did not advance"
    assert ctime_ns > before[1], f"{what}: ctime of {p.name} did not advance"


def _assert_same(p: Path, before: tuple[int, int], what: str) -> None:
    assert _times(p) == before, f"{what}: times of {p.name} changed"


OPS: list[tuple[str, Callable[[Path], object]]] = [
    ("create", lambda d: os.close(os.open(d / "new", os.O_CREAT | os.O_WRONLY, 0o644))),
    ("mkdir", lambda d: os.mkdir(d / "newdir")),
    ("mknod", lambda d: os.mknod(d / "fifo", stat.S_IFIFO | 0o644)),
    ("symlink", lambda d: os.symlink("x", d / "sl")),
    ("link", lambda d: os.link(d / "existing", d / "hl")),
    ("unlink", lambda d: os.unlink(d / "existing")),
    ("rmdir", lambda d: os.rmdir(d / "existing_dir")),
    ("rename", lambda d: os.rename(d / "existing", d / "renamed")),
]


@pytest.mark.parametrize(("what", "op"), OPS, ids=[name for name, _ in OPS])
def test_parent_times_change(fs_root: Path, what: str, op: Callable[[Path], object]) -> None:
    d = fs_root / "d"
    d.mkdir()
    (d / "existing").write_bytes(b"x")
    (d / "existing_dir").mkdir()
    before_d, before_root = _times(d), _times(fs_root)
    _tick()
    op(d)
    _assert_changed(d, before_d, what)
    _assert_same(fs_root, before_root, what)


def test_rename_across_parents_times(fs_root: Path) -> None:
    (fs_root / "a").mkdir()
    (fs_root / "b").mkdir()
    (fs_root / "a" / "f").write_bytes(b"")
    (fs_root / "a" / "sub").mkdir()
    before_a, before_b = _times(fs_root / "a"), _times(fs_root / "b")
    ctime_f = os.lstat(fs_root / "a" / "f").st_ctime_ns
    ctime_sub = os.lstat(fs_root / "a" / "sub").st_ctime_ns
    mtime_f = os.lstat(fs_root / "a" / "f").st_mtime_ns
    _tick()
    os.rename(fs_root / "a" / "f", fs_root / "b" / "f")
    os.rename(fs_root / "a" / "sub", fs_root / "b" / "sub")
    _assert_changed(fs_root / "a", before_a, "rename out")
    _assert_changed(fs_root / "b", before_b, "rename in")
    # ext4 updates the ctime (not the mtime) of the moved inode itself
    assert os.lstat(fs_root / "b" / "f").st_ctime_ns > ctime_f
    assert os.lstat(fs_root / "b" / "f").st_mtime_ns == mtime_f
    assert os.lstat(fs_root / "b" / "sub").st_ctime_ns > ctime_sub


def test_child_changes_leave_parent_times(fs_root: Path) -> None:
    d = fs_root / "d"
    d.mkdir()
    f = d / "f"
    f.write_bytes(b"x")
    (d / "sub").mkdir()
    before = _times(d)
    _tick()
    with open(f, "ab") as fh:
        fh.write(b"more")
    os.chmod(f, 0o600)
    os.truncate(f, 1)
    os.utime(f)
    (d / "sub" / "inner").write_bytes(b"")
    _assert_same(d, before, "changes below")


def test_file_times_on_write(fs_root: Path) -> None:
    f = fs_root / "f"
    f.write_bytes(b"x")
    before = _times(f)
    _tick()
    with open(f, "r+b") as fh:
        fh.write(b"y")
    _assert_changed(f, before, "write")
    assert f.read_bytes() == b"y"
