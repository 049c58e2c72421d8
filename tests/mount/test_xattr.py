"""Extended attributes in the user. namespace, checked against ext4."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from tests.util import expect_errno

pytestmark = pytest.mark.mount


@pytest.fixture
def f(fs_root: Path) -> Path:
    p = fs_root / "f"
    p.write_bytes(b"content")
    return p


def test_set_get_list_remove(f: Path) -> None:
    assert os.listxattr(f) == []
    os.setxattr(f, "user.color", b"blue")
    os.setxattr(f, "user.bin", b"\x00\xff\x00binary\n")
    os.setxattr(f, "user.empty", b"")
    assert os.getxattr(f, "user.color") == b"blue"
    assert os.getxattr(f, "user.bin") == b"\x00\xff\x00binary\n"
    assert os.getxattr(f, "user.empty") == b""
    assert sorted(os.listxattr(f)) == ["user.bin", "user.color", "user.empty"]
    os.setxattr(f, "user.color", b"a much longer value than before" * 10)
    assert os.getxattr(f, "user.color") == b"a much longer value than before" * 10
    os.setxattr(f, "user.color", b"r")
    assert os.getxattr(f, "user.color") == b"r"
    os.removexattr(f, "user.color")
    expect_errno(errno.ENODATA, os.getxattr, f, "user.color")
    assert sorted(os.listxattr(f)) == ["user.bin", "user.empty"]
    assert f.read_bytes() == b"content"


def test_flags(f: Path) -> None:
    expect_errno(errno.ENODATA, os.setxattr, f, "user.a", b"1", os.XATTR_REPLACE)
    expect_errno(errno.ENODATA, os.getxattr, f, "user.a")
    os.setxattr(f, "user.a", b"1", os.XATTR_CREATE)
    expect_errno(errno.EEXIST, os.setxattr, f, "user.a", b"2", os.XATTR_CREATE)
    assert os.getxattr(f, "user.a") == b"1"
    os.setxattr(f, "user.a", b"3", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.a") == b"3"
    os.removexattr(f, "user.a")
    expect_errno(errno.ENODATA, os.setxattr, f, "user.a", b"4", os.XATTR_REPLACE)


def test_missing(f: Path, fs_root: Path) -> None:
    expect_errno(errno.ENODATA, os.getxattr, f, "user.nope")
    expect_errno(errno.ENODATA, os.removexattr, f, "user.nope")
    expect_errno(errno.ENOENT, os.getxattr, fs_root / "missing", "user.x")
    expect_errno(errno.ENOENT, os.setxattr, fs_root / "missing", "user.x", b"")


def test_size_limits(f: Path) -> None:
    expect_errno(errno.E2BIG, os.setxattr, f, "user.big", b"x" * (64 * 1024 + 1))
    expect_errno(errno.ERANGE, os.setxattr, f, "user." + "n" * 251, b"v")  # 256 bytes
    expect_errno(errno.ERANGE, os.getxattr, f, "user." + "n" * 251)
    expect_errno(errno.ERANGE, os.setxattr, f, "", b"v")
    name = "user." + "n" * 250  # 255 bytes: the longest allowed name
    os.setxattr(f, name, b"v")
    assert os.getxattr(f, name) == b"v"
    value = bytes(range(256)) * 12  # 3 KiB fits in an ext4 xattr block
    os.setxattr(f, "user.mid", value)
    assert os.getxattr(f, "user.mid") == value
    assert sorted(os.listxattr(f)) == sorted([name, "user.mid"])


def test_many_attributes(f: Path) -> None:
    names = [f"user.attr{i:02d}" for i in range(20)]
    for i, name in enumerate(names):
        os.setxattr(f, name, str(i).encode())
    assert sorted(os.listxattr(f)) == names
    for i, name in enumerate(names):
        assert os.getxattr(f, name) == str(i).encode()


def test_unknown_namespace(f: Path) -> None:
    expect_errno(errno.EOPNOTSUPP, os.setxattr, f, "bogus.attr", b"v")
    expect_errno(errno.EOPNOTSUPP, os.setxattr, f, "noprefix", b"v")
    expect_errno(errno.EOPNOTSUPP, os.getxattr, f, "bogus.attr")


def test_directory_and_symlink(fs_root: Path) -> None:
    d = fs_root / "d"
    d.mkdir()
    os.setxattr(d, "user.dir", b"yes")
    assert os.getxattr(d, "user.dir") == b"yes"
    assert os.listxattr(d) == ["user.dir"]
    os.symlink("d", fs_root / "l")
    # user.* attributes are not allowed on symlinks themselves
    expect_errno(errno.EPERM, os.setxattr, fs_root / "l", "user.x", b"v", follow_symlinks=False)
    assert os.getxattr(fs_root / "l", "user.dir") == b"yes"  # follows to the directory
    assert os.listxattr(fs_root / "l", follow_symlinks=False) == []


def test_fd_based(f: Path) -> None:
    fd = os.open(f, os.O_RDONLY)
    try:
        os.setxattr(fd, "user.viafd", b"1")
        assert os.getxattr(fd, "user.viafd") == b"1"
        assert os.listxattr(fd) == ["user.viafd"]
        os.removexattr(fd, "user.viafd")
        assert os.listxattr(fd) == []
    finally:
        os.close(fd)


def test_xattr_changes_ctime_not_mtime(f: Path) -> None:
    st0 = os.lstat(f)
    time.sleep(0.03)
    os.setxattr(f, "user.t", b"1")
    st1 = os.lstat(f)
    assert st1.st_ctime_ns > st0.st_ctime_ns
    assert st1.st_mtime_ns == st0.st_mtime_ns
    time.sleep(0.03)
    os.removexattr(f, "user.t")
    assert os.lstat(f).st_ctime_ns > st1.st_ctime_ns


def test_xattrs_follow_hard_links_and_rename(fs_root: Path, f: Path) -> None:
    os.setxattr(f, "user.k", b"v")
    os.link(f, fs_root / "g")
    assert os.getxattr(fs_root / "g", "user.k") == b"v"
    os.rename(f, fs_root / "h")
    assert os.getxattr(fs_root / "h", "user.k") == b"v"
    os.unlink(fs_root / "h")
    assert os.getxattr(fs_root / "g", "user.k") == b"v"
