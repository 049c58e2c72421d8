"""Permissions for non-root callers (a forked child switched to another uid/gid), as the
kernel enforces them on ext4: mode bits, sticky and setgid directories, ownership
changes, and clearing setuid/setgid on write, truncate and chown."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.util import as_user

pytestmark = [pytest.mark.mount, pytest.mark.usefixtures("root_only")]

ALICE = (1000, 1000)
BOB = (1001, 1001)
GROUP = 2000  # a group neither user belongs to


def _errno_as(who: tuple[int, int], func: Callable[..., Any], *args: object) -> int:
    try:
        as_user(*who, func, *args)
    except OSError as exc:
        return exc.errno or -1
    return 0


def _assert_errno_as(
    who: tuple[int, int], expected: int, func: Callable[..., Any], *args: object
) -> None:
    got = _errno_as(who, func, *args)
    name = getattr(func, "__name__", repr(func))
    assert got == expected, (
        f"uid {who[0]}: {name}{args!r}: expected {errno.errorcode.get(expected, expected)}, "
        f"got {errno.errorcode.get(got, 'success') if got else 'success'}"
    )


def _read(p: Path) -> bytes:
    return p.read_bytes()


def _write(p: Path, data: bytes) -> None:
    with open(p, "r+b") as f:
        f.write(data)


def _append(p: Path, data: bytes) -> None:
    with open(p, "ab") as f:
        f.write(data)


def _create(p: Path) -> tuple[int, int, int]:
    os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    st = os.lstat(p)
    return st.st_uid, st.st_gid, st.st_mode


def _mkdir(p: Path) -> tuple[int, int, int]:
    os.mkdir(p, 0o755)
    st = os.lstat(p)
    return st.st_uid, st.st_gid, st.st_mode


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def root_file(fs_root: Path) -> Path:
    p = fs_root / "rootfile"
    p.write_bytes(b"secret")
    return p


def test_read_0600_root_file(root_file: Path) -> None:
    os.chmod(root_file, 0o600)
    _assert_errno_as(ALICE, errno.EACCES, _read, root_file)
    _assert_errno_as(ALICE, errno.EACCES, _write, root_file, b"x")
    os.chmod(root_file, 0o644)
    assert as_user(*ALICE, _read, root_file) == b"secret"
    _assert_errno_as(ALICE, errno.EACCES, _write, root_file, b"x")
    os.chmod(root_file, 0o646)
    as_user(*ALICE, _write, root_file, b"X")
    assert root_file.read_bytes() == b"Xecret"


def test_group_bits(root_file: Path) -> None:
    os.chown(root_file, 0, ALICE[1])
    os.chmod(root_file, 0o640)
    assert as_user(*ALICE, _read, root_file) == b"secret"
    _assert_errno_as(BOB, errno.EACCES, _read, root_file)
    # owner bits win over group bits for the owner
    os.chown(root_file, ALICE[0], ALICE[1])
    os.chmod(root_file, 0o040)
    _assert_errno_as(ALICE, errno.EACCES, _read, root_file)


def test_create_in_root_dir(fs_root: Path) -> None:
    _assert_errno_as(ALICE, errno.EACCES, _create, fs_root / "x")
    _assert_errno_as(ALICE, errno.EACCES, _mkdir, fs_root / "x")
    _assert_errno_as(ALICE, errno.EACCES, os.symlink, "t", fs_root / "x")
    assert os.listdir(fs_root) == []
    open_dir = fs_root / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    uid, gid, mode = as_user(*ALICE, _create, open_dir / "f")
    assert (uid, gid, stat.S_IMODE(mode)) == (*ALICE, 0o644)
    uid, gid, mode = as_user(*ALICE, _mkdir, open_dir / "d")
    assert (uid, gid, stat.S_IMODE(mode)) == (*ALICE, 0o755)
    assert os.lstat(open_dir / "f").st_uid == ALICE[0]


def test_unlink_rename_need_dir_write(fs_root: Path) -> None:
    d = fs_root / "d"
    d.mkdir()
    (d / "f").write_bytes(b"")
    os.chmod(d / "f", 0o666)
    _assert_errno_as(ALICE, errno.EACCES, os.unlink, d / "f")
    _assert_errno_as(ALICE, errno.EACCES, os.rename, d / "f", d / "g")
    assert os.listdir(d) == ["f"]


def test_search_permission(fs_root: Path) -> None:
    d = fs_root / "private"
    d.mkdir()
    (d / "f").write_bytes(b"x")
    os.chmod(d / "f", 0o644)
    os.chmod(d, 0o700)
    _assert_errno_as(ALICE, errno.EACCES, os.lstat, d / "f")
    _assert_errno_as(ALICE, errno.EACCES, os.listdir, d)
    os.chmod(d, 0o711)  # search but not read
    assert as_user(*ALICE, _read, d / "f") == b"x"
    _assert_errno_as(ALICE, errno.EACCES, os.listdir, d)


def test_access_as_user(root_file: Path) -> None:
    os.chmod(root_file, 0o600)
    assert as_user(*ALICE, os.access, root_file, os.F_OK)
    assert not as_user(*ALICE, os.access, root_file, os.R_OK)
    os.chmod(root_file, 0o645)
    assert as_user(*ALICE, os.access, root_file, os.R_OK | os.X_OK)
    assert not as_user(*ALICE, os.access, root_file, os.W_OK)
    assert not as_user(*ALICE, os.access, root_file, os.R_OK | os.W_OK)


def test_sticky_directory(fs_root: Path) -> None:
    tmp = fs_root / "tmp"
    tmp.mkdir()
    os.chmod(tmp, 0o1777)
    as_user(*ALICE, _create, tmp / "alice")
    as_user(*BOB, _create, tmp / "bob")
    os.chmod(tmp / "alice", 0o666)
    _assert_errno_as(BOB, errno.EPERM, os.unlink, tmp / "alice")
    _assert_errno_as(BOB, errno.EPERM, os.rename, tmp / "alice", tmp / "stolen")
    _assert_errno_as(BOB, errno.EPERM, os.rename, tmp / "bob", tmp / "alice")
    assert sorted(os.listdir(tmp)) == ["alice", "bob"]
    as_user(*ALICE, os.unlink, tmp / "alice")
    as_user(*BOB, os.rename, tmp / "bob", tmp / "bob2")
    os.unlink(tmp / "bob2")  # root may
    assert os.listdir(tmp) == []
    # without the sticky bit anyone with write permission may unlink
    as_user(*ALICE, _create, tmp / "alice")
    os.chmod(tmp, 0o777)
    as_user(*BOB, os.unlink, tmp / "alice")


def test_setgid_directory(fs_root: Path) -> None:
    d = fs_root / "shared"
    d.mkdir()
    os.chown(d, 0, GROUP)
    os.chmod(d, 0o2777)
    assert _mode(d) == 0o2777
    uid, gid, _ = as_user(*ALICE, _create, d / "file")
    assert (uid, gid) == (ALICE[0], GROUP)
    uid, gid, mode = as_user(*ALICE, _mkdir, d / "sub")
    assert (uid, gid) == (ALICE[0], GROUP)
    assert mode & stat.S_ISGID, "a subdirectory of a setgid directory must be setgid"
    # root's files get the directory's group too, and the rule applies recursively
    assert _create(d / "rootfile")[1] == GROUP
    assert as_user(*ALICE, _create, d / "sub" / "deeper")[1] == GROUP
    os.mknod(d / "fifo", stat.S_IFIFO | 0o644)
    assert os.lstat(d / "fifo").st_gid == GROUP
    os.symlink("x", d / "sl")
    assert os.lstat(d / "sl").st_gid == GROUP
    # without setgid, the creator's group
    os.chmod(d, 0o777)
    assert as_user(*ALICE, _create, d / "plain")[1] == ALICE[1]


def _chown(p: Path, uid: int, gid: int) -> None:
    os.chown(p, uid, gid)


def _chmod(p: Path, mode: int) -> None:
    os.chmod(p, mode)


def test_chown_chmod_by_non_owner(root_file: Path) -> None:
    os.chmod(root_file, 0o666)
    _assert_errno_as(ALICE, errno.EPERM, _chown, root_file, ALICE[0], ALICE[1])
    _assert_errno_as(ALICE, errno.EPERM, _chown, root_file, -1, ALICE[1])
    _assert_errno_as(ALICE, errno.EPERM, _chmod, root_file, 0o777)
    st = os.lstat(root_file)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o666)


def test_chown_chmod_by_owner(root_file: Path) -> None:
    os.chown(root_file, *ALICE)
    as_user(*ALICE, _chmod, root_file, 0o600)
    assert _mode(root_file) == 0o600
    # an owner cannot give the file away, nor move it to a group they are not in
    _assert_errno_as(ALICE, errno.EPERM, _chown, root_file, BOB[0], -1)
    _assert_errno_as(ALICE, errno.EPERM, _chown, root_file, -1, GROUP)
    as_user(*ALICE, _chown, root_file, ALICE[0], ALICE[1])  # a no-op chown is allowed
    # setting setgid on a file whose group the owner is not in silently drops it
    os.chown(root_file, ALICE[0], GROUP)
    as_user(*ALICE, _chmod, root_file, 0o2755)
    assert _mode(root_file) == 0o755


def test_utime_by_non_owner(root_file: Path) -> None:
    os.chmod(root_file, 0o666)
    as_user(*ALICE, os.utime, root_file, None)  # "now" needs only write permission
    _assert_errno_as(ALICE, errno.EPERM, os.utime, root_file, (1, 1))
    os.chmod(root_file, 0o644)
    _assert_errno_as(ALICE, errno.EACCES, os.utime, root_file, None)


def test_write_by_non_root_clears_setuid_setgid(root_file: Path) -> None:
    os.chmod(root_file, 0o6777)
    as_user(*ALICE, _append, root_file, b"!")
    assert _mode(root_file) == 0o777
    assert root_file.read_bytes() == b"secret!"
    # setgid without group execute is kept when the writer is in the file's group
    os.chown(root_file, 0, ALICE[1])
    os.chmod(root_file, 0o6666)
    as_user(*ALICE, _append, root_file, b"?")
    assert _mode(root_file) == 0o2666


def test_write_by_non_member_clears_setgid_without_group_exec(root_file: Path) -> None:
    """Linux >= 6.2 (setattr_should_drop_sgid): a writer outside the file's group drops
    S_ISGID even without group execute."""
    os.chown(root_file, 0, ALICE[1])
    os.chmod(root_file, 0o2666)
    as_user(*BOB, _append, root_file, b"?")
    assert _mode(root_file) == 0o666


def test_truncate_by_non_root_clears_setuid(root_file: Path) -> None:
    os.chmod(root_file, 0o4777)
    as_user(*ALICE, os.truncate, root_file, 2)
    assert _mode(root_file) == 0o777
    assert root_file.read_bytes() == b"se"


def test_write_by_root_keeps_setuid(root_file: Path) -> None:
    os.chmod(root_file, 0o6777)
    _append(root_file, b"!")
    assert _mode(root_file) == 0o6777


def test_chown_by_root_clears_setuid_setgid(fs_root: Path, root_file: Path) -> None:
    os.chmod(root_file, 0o6755)
    os.chown(root_file, *ALICE)
    assert _mode(root_file) == 0o755
    # setgid without group execute is kept
    os.chmod(root_file, 0o6745)
    os.chown(root_file, *BOB)
    assert _mode(root_file) == 0o2745
    # directories keep their bits
    d = fs_root / "d"
    d.mkdir()
    os.chmod(d, 0o6755)
    os.chown(d, *ALICE)
    assert _mode(d) == 0o6755


def test_owner_chmod_and_write_own_file(fs_root: Path) -> None:
    d = fs_root / "home"
    d.mkdir()
    os.chown(d, *ALICE)
    as_user(*ALICE, _create, d / "mine")
    as_user(*ALICE, _chmod, d / "mine", 0o400)
    _assert_errno_as(ALICE, errno.EACCES, _write, d / "mine", b"x")
    as_user(*ALICE, _chmod, d / "mine", 0o600)
    as_user(*ALICE, _write, d / "mine", b"ok")
    assert (d / "mine").read_bytes() == b"ok"
    _assert_errno_as(BOB, errno.EACCES, _read, d / "mine")


def test_hard_link_protected(root_file: Path, fs_root: Path) -> None:
    open_dir = fs_root / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    os.chmod(root_file, 0o600)
    protected = Path("/proc/sys/fs/protected_hardlinks").read_text().strip() == "1"
    expected = errno.EPERM if protected else 0
    _assert_errno_as(ALICE, expected, os.link, root_file, open_dir / "link")
