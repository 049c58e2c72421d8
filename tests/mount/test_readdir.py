"""readdir: listdir/scandir contents and types, and offsets that stay stable while the
directory changes (POSIX: an entry neither removed nor added during the listing is
returned exactly once). Checked against ext4."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from tests.util import expect_errno, getdents64

pytestmark = pytest.mark.mount

N_ENTRIES = 1500
DT_DIR, DT_REG, DT_LNK, DT_FIFO = 4, 8, 10, 1


def _name(i: int) -> str:
    # long-ish names so a listing takes many getdents buffers (and FUSE readdir calls)
    return f"entry-{i:05d}-" + "n" * 30


def _populate(d: Path, count: int) -> list[str]:
    names = [_name(i) for i in range(count)]
    for name in names:
        os.close(os.open(d / name, os.O_CREAT | os.O_WRONLY, 0o644))
    return names


def test_listdir_and_scandir_types(fs_root: Path) -> None:
    (fs_root / "file").write_bytes(b"x")
    (fs_root / "dir").mkdir()
    os.symlink("dir", fs_root / "link")
    os.mkfifo(fs_root / "fifo")
    assert sorted(os.listdir(fs_root)) == ["dir", "fifo", "file", "link"]
    entries = {e.name: e for e in os.scandir(fs_root)}
    assert set(entries) == {"dir", "fifo", "file", "link"}
    assert entries["dir"].is_dir(follow_symlinks=False)
    assert entries["file"].is_file(follow_symlinks=False)
    assert entries["link"].is_symlink()
    assert entries["link"].is_dir()  # following the symlink
    assert not entries["link"].is_dir(follow_symlinks=False)
    assert not entries["fifo"].is_file(follow_symlinks=False)
    for name, e in entries.items():
        assert e.inode() == os.lstat(fs_root / name).st_ino


def test_getdents_types_and_dots(fs_root: Path) -> None:
    (fs_root / "file").write_bytes(b"x")
    (fs_root / "dir").mkdir()
    os.symlink("dir", fs_root / "link")
    os.mkfifo(fs_root / "fifo")
    fd = os.open(fs_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        listing = []
        while batch := getdents64(fd):
            listing.extend(batch)
    finally:
        os.close(fd)
    names = [name for _ino, _off, _type, name in listing]
    assert len(names) == len(set(names)), f"duplicate entries: {names}"
    assert {n for n in names if n not in (".", "..")} == {"file", "dir", "link", "fifo"}
    types = {name: dtype for _ino, _off, dtype, name in listing}
    assert types["file"] == DT_REG
    assert types["dir"] == DT_DIR
    assert types["link"] == DT_LNK
    assert types["fifo"] == DT_FIFO
    for ino, _off, _type, name in listing:
        if name not in (".", ".."):
            assert ino == os.lstat(fs_root / name).st_ino


def test_empty_dir_and_errors(fs_root: Path) -> None:
    (fs_root / "d").mkdir()
    assert os.listdir(fs_root / "d") == []
    assert list(os.scandir(fs_root / "d")) == []
    (fs_root / "f").write_bytes(b"")
    expect_errno(errno.ENOTDIR, os.listdir, fs_root / "f")
    expect_errno(errno.ENOENT, os.listdir, fs_root / "missing")


def test_scandir_stable_while_directory_changes(fs_root: Path) -> None:
    names = _populate(fs_root, N_ENTRIES)
    rng = random.Random(7)
    deleted: set[str] = set()
    created: list[str] = []
    seen: list[str] = []
    checkpoints = {150, 500, 1000}
    with os.scandir(fs_root) as it:
        for entry in it:
            seen.append(entry.name)
            if len(seen) in checkpoints:
                # delete some entries already seen and some not yet seen, and add new ones
                survivors = [n for n in names if n not in deleted]
                for victim in rng.sample(survivors, 100):
                    os.unlink(fs_root / victim)
                    deleted.add(victim)
                for _ in range(100):
                    new = f"new-{len(created):05d}-" + "m" * 30
                    os.close(os.open(fs_root / new, os.O_CREAT | os.O_WRONLY, 0o644))
                    created.append(new)
    assert len(seen) > max(checkpoints), "listing ended before the changes were made"
    dups = sorted({n for n in seen if seen.count(n) > 1})
    assert not dups, f"{len(dups)} entries reported twice, e.g. {dups[:5]}"
    must_see = set(names) - deleted
    missing = sorted(must_see - set(seen))
    assert not missing, f"{len(missing)} surviving entries skipped, e.g. {missing[:5]}"
    unknown = set(seen) - set(names) - set(created)
    assert not unknown, f"entries that never existed: {sorted(unknown)[:5]}"
    assert sorted(os.listdir(fs_root)) == sorted(must_see | set(created))


def test_getdents_resume_from_offset_after_changes(fs_root: Path) -> None:
    """lseek to a d_off cookie (what telldir/seekdir and NFS re-export rely on) resumes
    right after that entry even when entries were removed and added in between."""
    names = _populate(fs_root, N_ENTRIES)
    fd = os.open(fs_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first: list[tuple[int, int, int, str]] = []
        while len(first) < 500:
            batch = getdents64(fd, 8192)
            assert batch, "directory ended early"
            first.extend(batch)
        cut = 400  # resume after the 500th entry, not at a batch boundary
        cookie = first[cut - 1][1]
        seen_before = {name for *_, name in first[:cut]}
        rng = random.Random(11)
        victims = set(rng.sample(names, 300))
        for victim in victims:
            os.unlink(fs_root / victim)
        created = [f"late-{i:04d}" for i in range(150)]
        for new in created:
            os.close(os.open(fs_root / new, os.O_CREAT | os.O_WRONLY, 0o644))
        os.lseek(fd, cookie, os.SEEK_SET)
        rest: list[str] = []
        while batch := getdents64(fd, 8192):
            rest.extend(name for *_, name in batch)
    finally:
        os.close(fd)
    assert len(rest) == len(set(rest)), "resumed listing reports an entry twice"
    again = sorted((seen_before - {".", ".."}) & set(rest))
    assert not again, f"{len(again)} entries before the cookie reported again: {again[:5]}"
    expected_after = set(names) - victims - seen_before
    missing = sorted(expected_after - set(rest))
    assert not missing, f"{len(missing)} surviving entries after the cookie skipped: {missing[:5]}"
