"""Fixtures for real-mount tests.

`fs_root` yields a fresh, empty directory either on ext4 (the reference: every expected
errno, link count and time behaviour must hold there first) or inside a live clusterfs
mount. The clusterfs mount is shared by the session; after each test the fixture checks
that the daemon is still alive and logged no traceback or ERROR line, and restarts it
for the next test if it died. Tests that crash, remount or unmount use `fresh_mount`,
a mount of their own.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.util import ClusterfsMount, fs_type, fuse_skip_reason, is_mounted

REFERENCE_BASE = "/var/tmp"
_counter = itertools.count()


def _make_base(prefix: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=REFERENCE_BASE))
    os.chmod(base, 0o755)  # other uids must be able to reach the test dirs
    return base


def _remove_base(base: Path, mounts: list[ClusterfsMount]) -> None:
    if any(is_mounted(m.mountpoint) for m in mounts):
        raise AssertionError(f"refusing to remove {base}: a mount is still live under it")
    shutil.rmtree(base, ignore_errors=True)


def _skip_without_fuse() -> None:
    reason = fuse_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def root_only() -> None:
    """Tests that switch uid in a child process need root."""
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root")


@pytest.fixture(scope="session")
def ext4_base() -> Iterator[Path]:
    base = _make_base("clusterfs-ext4-ref-")
    if fs_type(base) != "ext4":
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"{REFERENCE_BASE} is {fs_type(base)}, not ext4: no reference to compare")
    yield base
    shutil.rmtree(base, ignore_errors=True)


class _SessionMount:
    """The clusterfs mount shared by the session, started on first use."""

    def __init__(self) -> None:
        self.base: Path | None = None
        self.mount: ClusterfsMount | None = None
        self.all_mounts: list[ClusterfsMount] = []
        self.start_error: str | None = None

    def get(self) -> ClusterfsMount:
        _skip_without_fuse()
        if self.start_error:
            pytest.fail(f"clusterfs session mount could not start: {self.start_error}")
        if self.mount is None or not self.mount.alive():
            if self.base is None:
                self.base = _make_base("clusterfs-mnt-")
            if self.mount is not None:
                self.mount.cleanup()
            self.mount = ClusterfsMount(self.base)
            self.all_mounts.append(self.mount)
            try:
                self.mount.start()
            except AssertionError as exc:
                self.start_error = str(exc)
                self.mount.cleanup()
                pytest.fail(f"clusterfs session mount could not start: {exc}")
        return self.mount

    def close(self) -> None:
        if self.mount is None:
            return
        rc = None
        try:
            if self.mount.alive():
                rc = self.mount.stop()
        finally:
            for m in self.all_mounts:
                m.cleanup()
            assert self.base is not None
            _remove_base(self.base, self.all_mounts)
        if rc not in (None, 0):
            raise AssertionError(f"clusterfs daemon exited {rc} at the end of the session")


@pytest.fixture(scope="session")
def clusterfs_session() -> Iterator[_SessionMount]:
    session = _SessionMount()
    yield session
    session.close()


@pytest.fixture(params=["ext4", "clusterfs"])
def fs_root(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh empty directory (mode 0755, owned by root) on ext4 or on clusterfs."""
    name = f"t{next(_counter):04d}"
    if request.param == "ext4":
        base: Path = request.getfixturevalue("ext4_base")
        root = base / name
        root.mkdir()
        os.chmod(root, 0o755)
        yield root
        shutil.rmtree(root, ignore_errors=True)
        return
    session: _SessionMount = request.getfixturevalue("clusterfs_session")
    mount = session.get()
    root = mount.mountpoint / name
    root.mkdir()
    os.chmod(root, 0o755)
    mark = mount.log_mark()
    yield root
    _check_daemon_after_test(mount, mark)


def _check_daemon_after_test(mount: ClusterfsMount, mark: int) -> None:
    if not mount.alive():
        pytest.fail(f"clusterfs daemon died during the test:\n{mount.log_tail()}")
    problems = mount.log_problems_since(mark)
    if problems:
        pytest.fail("clusterfs daemon logged errors during the test:\n" + "\n".join(problems))


@pytest.fixture
def fs_kind(request: pytest.FixtureRequest, fs_root: Path) -> str:
    """'ext4' or 'clusterfs': which file system fs_root is on."""
    kind: str = request.node.callspec.params["fs_root"]
    return kind


@pytest.fixture
def cfs(clusterfs_session: _SessionMount) -> Iterator[tuple[ClusterfsMount, Path]]:
    """The shared clusterfs mount and a fresh directory in it (clusterfs-only tests)."""
    mount = clusterfs_session.get()
    root = mount.mountpoint / f"c{next(_counter):04d}"
    root.mkdir()
    os.chmod(root, 0o755)
    mark = mount.log_mark()
    yield mount, root
    _check_daemon_after_test(mount, mark)


@pytest.fixture
def fresh_base() -> Iterator[Path]:
    """An empty 0755 directory under /var/tmp for a test's own block/state/mount dirs."""
    _skip_without_fuse()
    base = _make_base("clusterfs-own-")
    yield base
    # A test must clean its own mounts up; never delete through a live mount.
    if not any(is_mounted(p) for p in [base / "mnt", *base.glob("*/mnt"), *base.glob("mnt*")]):
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fresh_mount(fresh_base: Path) -> Iterator[ClusterfsMount]:
    """A clusterfs mount of the test's own (for crash/remount/shutdown tests).
    It is started; the test may stop, kill9 or remount it. Cleaned up by PID."""
    mount = ClusterfsMount(fresh_base)
    try:
        mount.start()
        yield mount
    finally:
        mount.cleanup()
