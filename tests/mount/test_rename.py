"""rename and renameat2 (RENAME_NOREPLACE, RENAME_EXCHANGE), checked against ext4."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tests.util import RENAME_EXCHANGE, RENAME_NOREPLACE, expect_errno, renameat2

pytestmark = pytest.mark.mount


def test_rename_file(fs_root: Path) -> None:
    (fs_root / "a").write_bytes(b"A")
    ino = os.lstat(fs_root / "a").st_ino
    os.rename(fs_root / "a", fs_root / "b")
    expect_errno(errno.ENOENT, os.lstat, fs_root / "a")
    assert os.lstat(fs_root / "b").st_ino == ino
    assert (fs_root / "b").read_bytes() == b"A"
    assert os.listdir(fs_root) == ["b"]


def test_rename_replaces_file(fs_root: Path) -> None:
    (fs_root / "a").write_bytes(b"A")
    (fs_root / "b").write_bytes(b"B")
    ino_a = os.lstat(fs_root / "a").st_ino
    with open(fs_root / "b", "rb") as old:
        os.rename(fs_root / "a", fs_root / "b")
        assert os.fstat(old.fileno()).st_nlink == 0
        assert old.read() == b"B"  # replaced file stays readable while open
    assert os.lstat(fs_root / "b").st_ino == ino_a
    assert (fs_root / "b").read_bytes() == b"A"
    assert sorted(os.listdir(fs_root)) == ["b"]


def test_rename_replaces_hard_linked_file(fs_root: Path) -> None:
    (fs_root / "a").write_bytes(b"A")
    (fs_root / "b").write_bytes(b"B")
    os.link(fs_root / "b", fs_root / "b2")
    os.rename(fs_root / "a", fs_root / "b")
    assert os.lstat(fs_root / "b2").st_nlink == 1
    assert (fs_root / "b2").read_bytes() == b"B"


def test_rename_onto_own_hard_link_is_noop(fs_root: Path) -> None:
    (fs_root / "a").write_bytes(b"A")
    os.link(fs_root / "a", fs_root / "b")
    os.rename(fs_root / "a", fs_root / "b")  # POSIX: same inode, nothing happens
    assert sorted(os.listdir(fs_root)) == ["a", "b"]
    assert os.lstat(fs_root / "a").st_nlink == 2


def test_rename_to_self(fs_root: Path) -> None:
    (fs_root / "a").write_bytes(b"A")
    (fs_root / "d").mkdir()
    os.rename(fs_root / "a", fs_root / "a")
    os.rename(fs_root / "d", fs_root / "d")
    assert sorted(os.listdir(fs_root)) == ["a", "d"]
    assert os.lstat(fs_root).st_nlink == 3


def test_rename_dir_replaces_empty_dir(fs_root: Path) -> None:
    (fs_root / "src" / "child").mkdir(parents=True)
    (fs_root / "dst").mkdir()
    assert os.lstat(fs_root).st_nlink == 4
    ino = os.lstat(fs_root / "src").st_ino
    os.rename(fs_root / "src", fs_root / "dst")
    assert os.lstat(fs_root / "dst").st_ino == ino
    assert os.listdir(fs_root / "dst") == ["child"]
    assert os.lstat(fs_root).st_nlink == 3
    assert os.lstat(fs_root / "dst").st_nlink == 3


def test_rename_dir_onto_nonempty_dir(fs_root: Path) -> None:
    (fs_root / "src").mkdir()
    (fs_root / "dst").mkdir()
    (fs_root / "dst" / "f").write_bytes(b"")
    expect_errno(errno.ENOTEMPTY, os.rename, fs_root / "src", fs_root / "dst")
    (fs_root / "dst2" / "sub").mkdir(parents=True)
    expect_errno(errno.ENOTEMPTY, os.rename, fs_root / "src", fs_root / "dst2")
    assert sorted(os.listdir(fs_root)) == ["dst", "dst2", "src"]


def test_rename_type_mismatch(fs_root: Path) -> None:
    (fs_root / "f").write_bytes(b"")
    (fs_root / "d").mkdir()
    expect_errno(errno.EISDIR, os.rename, fs_root / "f", fs_root / "d")
    expect_errno(errno.ENOTDIR, os.rename, fs_root / "d", fs_root / "f")
    os.symlink("d", fs_root / "l")
    expect_errno(errno.ENOTDIR, os.rename, fs_root / "d", fs_root / "l")
    assert sorted(os.listdir(fs_root)) == ["d", "f", "l"]


def test_rename_missing_and_bad_parent(fs_root: Path) -> None:
    (fs_root / "f").write_bytes(b"")
    expect_errno(errno.ENOENT, os.rename, fs_root / "missing", fs_root / "x")
    expect_errno(errno.ENOENT, os.rename, fs_root / "f", fs_root / "nodir" / "x")
    expect_errno(errno.ENOTDIR, os.rename, fs_root / "f", fs_root / "f" / "x")


def test_rename_dir_across_parents(fs_root: Path) -> None:
    (fs_root / "p1" / "moving" / "inner").mkdir(parents=True)
    (fs_root / "p1" / "moving" / "file").write_bytes(b"in")
    (fs_root / "p2").mkdir()
    assert os.lstat(fs_root / "p1").st_nlink == 3
    assert os.lstat(fs_root / "p2").st_nlink == 2
    os.rename(fs_root / "p1" / "moving", fs_root / "p2" / "moved")
    assert os.lstat(fs_root / "p1").st_nlink == 2
    assert os.lstat(fs_root / "p2").st_nlink == 3
    assert os.lstat(fs_root / "p2" / "moved").st_nlink == 3
    assert os.stat(os.path.join(fs_root, "p2", "moved", "..")).st_ino == os.lstat(
        fs_root / "p2"
    ).st_ino
    assert (fs_root / "p2" / "moved" / "file").read_bytes() == b"in"
    assert os.listdir(fs_root / "p1") == []
    # a directory moved up and replacing an empty directory in another parent
    (fs_root / "p1" / "empty").mkdir()
    os.rename(fs_root / "p2" / "moved" / "inner", fs_root / "p1" / "empty")
    assert os.lstat(fs_root / "p1").st_nlink == 3
    assert os.lstat(fs_root / "p2" / "moved").st_nlink == 2


def test_rename_dir_into_own_subtree(fs_root: Path) -> None:
    (fs_root / "a" / "b" / "c").mkdir(parents=True)
    expect_errno(errno.EINVAL, os.rename, fs_root / "a", fs_root / "a" / "b" / "c" / "a")
    expect_errno(errno.EINVAL, os.rename, fs_root / "a", fs_root / "a" / "x")
    # replacing one's own (empty) descendant is also refused
    expect_errno(errno.EINVAL, os.rename, fs_root / "a" / "b", fs_root / "a" / "b" / "c")
    # ... and replacing an ancestor fails too (it is not empty)
    expect_errno(errno.ENOTEMPTY, os.rename, fs_root / "a" / "b" / "c", fs_root / "a")
    assert os.listdir(fs_root) == ["a"]
    assert os.listdir(fs_root / "a" / "b") == ["c"]


def test_rename_noreplace(fs_root: Path) -> None:
    (fs_root / "a").write_bytes(b"A")
    (fs_root / "b").write_bytes(b"B")
    (fs_root / "d").mkdir()
    expect_errno(errno.EEXIST, renameat2, fs_root / "a", fs_root / "b", RENAME_NOREPLACE)
    expect_errno(errno.EEXIST, renameat2, fs_root / "a", fs_root / "d", RENAME_NOREPLACE)
    assert (fs_root / "b").read_bytes() == b"B"
    renameat2(fs_root / "a", fs_root / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(fs_root)) == ["b", "c", "d"]
    assert (fs_root / "c").read_bytes() == b"A"


def test_rename_exchange_files(fs_root: Path) -> None:
    (fs_root / "a").write_bytes(b"A")
    (fs_root / "b").write_bytes(b"B")
    ino_a, ino_b = os.lstat(fs_root / "a").st_ino, os.lstat(fs_root / "b").st_ino
    renameat2(fs_root / "a", fs_root / "b", RENAME_EXCHANGE)
    assert (fs_root / "a").read_bytes() == b"B"
    assert (fs_root / "b").read_bytes() == b"A"
    assert os.lstat(fs_root / "a").st_ino == ino_b
    assert os.lstat(fs_root / "b").st_ino == ino_a


def test_rename_exchange_file_and_dir_across_parents(fs_root: Path) -> None:
    (fs_root / "p1").mkdir()
    (fs_root / "p2" / "dir" / "sub").mkdir(parents=True)
    (fs_root / "p1" / "file").write_bytes(b"F")
    assert os.lstat(fs_root / "p1").st_nlink == 2
    assert os.lstat(fs_root / "p2").st_nlink == 3
    renameat2(fs_root / "p1" / "file", fs_root / "p2" / "dir", RENAME_EXCHANGE)
    assert stat.S_ISDIR(os.lstat(fs_root / "p1" / "file").st_mode)
    assert os.listdir(fs_root / "p1" / "file") == ["sub"]
    assert (fs_root / "p2" / "dir").read_bytes() == b"F"
    assert os.lstat(fs_root / "p1").st_nlink == 3
    assert os.lstat(fs_root / "p2").st_nlink == 2
    parent = os.stat(os.path.join(fs_root, "p1", "file", "..")).st_ino
    assert parent == os.lstat(fs_root / "p1").st_ino


def test_rename_exchange_dirs(fs_root: Path) -> None:
    (fs_root / "x" / "a" / "a1").mkdir(parents=True)
    (fs_root / "y" / "b").mkdir(parents=True)
    renameat2(fs_root / "x" / "a", fs_root / "y" / "b", RENAME_EXCHANGE)
    assert os.listdir(fs_root / "y" / "b") == ["a1"]
    assert os.listdir(fs_root / "x" / "a") == []
    assert os.lstat(fs_root / "x").st_nlink == 3
    assert os.lstat(fs_root / "y").st_nlink == 3


def test_rename_exchange_errors(fs_root: Path) -> None:
    (fs_root / "a").write_bytes(b"A")
    (fs_root / "d" / "sub").mkdir(parents=True)
    expect_errno(errno.ENOENT, renameat2, fs_root / "a", fs_root / "missing", RENAME_EXCHANGE)
    expect_errno(errno.ENOENT, renameat2, fs_root / "missing", fs_root / "a", RENAME_EXCHANGE)
    expect_errno(errno.EINVAL, renameat2, fs_root / "d", fs_root / "d" / "sub", RENAME_EXCHANGE)
    expect_errno(
        errno.EINVAL, renameat2, fs_root / "a", fs_root / "d",
        RENAME_EXCHANGE | RENAME_NOREPLACE,
    )
    assert (fs_root / "a").read_bytes() == b"A"


def test_rename_symlink(fs_root: Path) -> None:
    os.symlink("target", fs_root / "l")
    os.rename(fs_root / "l", fs_root / "m")
    assert os.readlink(fs_root / "m") == "target"
    assert os.listdir(fs_root) == ["m"]
