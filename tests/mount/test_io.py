"""create/open flags, read/write/seek, fsync, mmap and unlink-while-open, against ext4."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import stat
from pathlib import Path

import pytest

from tests.util import expect_errno

pytestmark = pytest.mark.mount


def test_create_exclusive(fs_root: Path) -> None:
    p = fs_root / "f"
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.close(fd)
    st = os.lstat(p)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640
    expect_errno(errno.EEXIST, os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    (fs_root / "d").mkdir()
    expect_errno(errno.EEXIST, os.open, fs_root / "d", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.symlink("dangling-target", fs_root / "l")
    expect_errno(errno.EEXIST, os.open, fs_root / "l", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    assert not (fs_root / "dangling-target").exists()


def test_create_through_dangling_symlink(fs_root: Path) -> None:
    os.symlink("target", fs_root / "l")
    fd = os.open(fs_root / "l", os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    assert stat.S_ISREG(os.lstat(fs_root / "target").st_mode)


def test_create_mode_applies_to_later_opens_only(fs_root: Path) -> None:
    # a read-only mode still gives the creating fd write access (as ext4 does)
    fd = os.open(fs_root / "ro", os.O_CREAT | os.O_RDWR, 0o444)
    try:
        assert os.write(fd, b"ok") == 2
        os.lseek(fd, 0, os.SEEK_SET)
        assert os.read(fd, 10) == b"ok"
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.lstat(fs_root / "ro").st_mode) == 0o444


def test_open_errors(fs_root: Path) -> None:
    (fs_root / "d").mkdir()
    (fs_root / "f").write_bytes(b"")
    expect_errno(errno.ENOENT, os.open, fs_root / "missing", os.O_RDONLY)
    expect_errno(errno.ENOENT, os.open, fs_root / "nodir" / "f", os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.EISDIR, os.open, fs_root / "d", os.O_WRONLY)
    expect_errno(errno.EISDIR, os.open, fs_root / "d", os.O_RDWR)
    expect_errno(errno.EISDIR, os.open, fs_root / "d", os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.ENOTDIR, os.open, fs_root / "f", os.O_RDONLY | os.O_DIRECTORY)
    expect_errno(errno.ENOTDIR, os.open, fs_root / "f" / "x", os.O_RDONLY)


def test_o_trunc(fs_root: Path) -> None:
    p = fs_root / "f"
    p.write_bytes(b"0123456789")
    mtime_ns = os.lstat(p).st_mtime_ns
    os.utime(p, ns=(mtime_ns - 10**9, mtime_ns - 10**9))
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    try:
        st = os.fstat(fd)
        assert st.st_size == 0
        assert st.st_mtime_ns > mtime_ns - 10**9
        os.write(fd, b"ab")
    finally:
        os.close(fd)
    assert p.read_bytes() == b"ab"
    # O_TRUNC on an empty file, and with O_CREAT on an existing one
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert p.read_bytes() == b""


def test_o_append(fs_root: Path) -> None:
    p = fs_root / "f"
    p.write_bytes(b"start")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"-one")
        os.lseek(fd, 2, os.SEEK_SET)
        os.write(fd, b"-two")
        assert os.lseek(fd, 0, os.SEEK_CUR) == len(b"start-one-two")
    finally:
        os.close(fd)
    assert p.read_bytes() == b"start-one-two"
    # another writer extends the file; the O_APPEND fd still writes at the new end
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(b, b"XYZ", 13)
        os.write(a, b"!")
    finally:
        os.close(a)
        os.close(b)
    assert p.read_bytes() == b"start-one-twoXYZ!"


def test_read_write_seek(fs_root: Path) -> None:
    p = fs_root / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.write(fd, b"hello world") == 11
        assert os.lseek(fd, 0, os.SEEK_CUR) == 11
        assert os.lseek(fd, -5, os.SEEK_END) == 6
        assert os.read(fd, 100) == b"world"
        assert os.read(fd, 100) == b""  # EOF
        assert os.lseek(fd, 0, os.SEEK_SET) == 0
        assert os.read(fd, 5) == b"hello"
        assert os.lseek(fd, 1, os.SEEK_CUR) == 6
        os.write(fd, b"WORLD")
        assert os.pread(fd, 11, 0) == b"hello WORLD"
        assert os.pwrite(fd, b"J", 0) == 1
        assert os.lseek(fd, 0, os.SEEK_CUR) == 11  # pwrite leaves the offset alone
        assert os.pread(fd, 4, 0) == b"Jell"
        assert os.pread(fd, 10, 100) == b""
        expect_errno(errno.EINVAL, os.lseek, fd, -1, os.SEEK_SET)
    finally:
        os.close(fd)
    assert p.read_bytes() == b"Jello WORLD"


def test_write_past_end_makes_hole(fs_root: Path) -> None:
    p = fs_root / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"head")
        os.pwrite(fd, b"tail", 1_000_000)
        assert os.fstat(fd).st_size == 1_000_004
        assert os.pread(fd, 8, 999_996) == bytes(4) + b"tail"
    finally:
        os.close(fd)
    data = p.read_bytes()
    assert data[:4] == b"head"
    assert data[4:1_000_000] == bytes(999_996)


def test_large_random_io(fs_root: Path) -> None:
    rng = random.Random(1)
    blob = rng.randbytes(3 * 1024 * 1024 + 17)
    p = fs_root / "big"
    with open(p, "wb") as f:
        for off in range(0, len(blob), 128 * 1024 + 3):
            f.write(blob[off : off + 128 * 1024 + 3])
    assert os.lstat(p).st_size == len(blob)
    assert hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256(blob).digest()
    buf = bytearray(blob)
    fd = os.open(p, os.O_RDWR)
    try:
        for _ in range(200):
            off = rng.randrange(len(blob) - 5000)
            chunk = rng.randbytes(rng.randrange(1, 5000))
            os.pwrite(fd, chunk, off)
            buf[off : off + len(chunk)] = chunk
        for _ in range(100):
            off = rng.randrange(len(blob))
            n = rng.randrange(1, 70000)
            assert os.pread(fd, n, off) == bytes(buf[off : off + n])
    finally:
        os.close(fd)
    assert p.read_bytes() == bytes(buf)


def test_two_fds_see_each_other(fs_root: Path) -> None:
    p = fs_root / "f"
    w = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    r = os.open(p, os.O_RDONLY)
    try:
        os.write(w, b"first")
        assert os.read(r, 100) == b"first"
        os.write(w, b"second")
        assert os.read(r, 100) == b"second"
        assert os.fstat(r).st_size == 11
    finally:
        os.close(w)
        os.close(r)


def test_read_on_write_only_fd(fs_root: Path) -> None:
    p = fs_root / "f"
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        expect_errno(errno.EBADF, os.read, fd, 1)
    finally:
        os.close(fd)
    fd = os.open(p, os.O_RDONLY)
    try:
        expect_errno(errno.EBADF, os.write, fd, b"x")
    finally:
        os.close(fd)


def test_fsync_fdatasync(fs_root: Path) -> None:
    p = fs_root / "f"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
        os.write(fd, b"!")
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert p.read_bytes() == b"durable!"


def test_fsync_directory(fs_root: Path) -> None:
    d = fs_root / "d"
    d.mkdir()
    (d / "f").write_bytes(b"")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def test_mmap_shared(fs_root: Path) -> None:
    p = fs_root / "f"
    p.write_bytes(bytes(8192))
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 8192) as m:
        m[100:105] = b"mmap!"
        m.flush()
    assert p.read_bytes()[100:105] == b"mmap!"
    with open(p, "rb") as r, mmap.mmap(r.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[100:105] == b"mmap!"
        assert len(m) == 8192


def test_unlink_while_open(fs_root: Path) -> None:
    p = fs_root / "f"
    p.write_bytes(b"still here")
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        expect_errno(errno.ENOENT, os.lstat, p)
        assert os.listdir(fs_root) == []
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 100, 0) == b"still here"
        os.pwrite(fd, b" and more", 10)
        assert os.pread(fd, 100, 0) == b"still here and more"
        os.ftruncate(fd, 5)
        assert os.fstat(fd).st_size == 5
        os.fsync(fd)
        # a new file of the same name is a different file
        p.write_bytes(b"new")
        assert os.pread(fd, 100, 0) == b"still"
        assert os.lstat(p).st_ino != os.fstat(fd).st_ino
    finally:
        os.close(fd)
    assert p.read_bytes() == b"new"


def test_unlink_hard_link_while_open(fs_root: Path) -> None:
    p = fs_root / "f"
    p.write_bytes(b"linked")
    os.link(p, fs_root / "g")
    fd = os.open(p, os.O_RDONLY)
    try:
        os.unlink(p)
        assert os.fstat(fd).st_nlink == 1
        os.unlink(fs_root / "g")
        assert os.fstat(fd).st_nlink == 0
        assert os.read(fd, 100) == b"linked"
    finally:
        os.close(fd)
