"""Helpers for real-mount tests: a clusterfs mount fixture, run-as-user, libc calls.

In the manner of pyfuse3's own tests: start the daemon in the foreground, wait for the
mount while checking the daemon has not died, and clean up by PID even when a test
fails (unmount, wait for the PID, SIGKILL it if it did not exit). Nothing here ever
kills by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import pickle
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MOUNT_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 30.0

# Linux ABI constants not exposed by the os module.
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def clusterfs_command() -> list[str]:
    """The console script next to the running interpreter, else `python -m clusterfs.cli`."""
    script = Path(sys.executable).parent / "clusterfs"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "clusterfs.cli"]


def fuse_skip_reason() -> str | None:
    """Why real FUSE mounts cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "real-mount tests need root (the mount serves every user with allow_other)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (FUSE kernel module not loaded)"
    if shutil.which("fusermount3") is None and shutil.which("umount") is None:
        return "neither fusermount3 nor umount is installed"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _unescape_mount_field(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 3 < len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entries() -> list[tuple[str, str, str]]:
    """(source, mount point, fs type) for every line of /proc/self/mounts."""
    entries = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                entries.append((parts[0], _unescape_mount_field(parts[1]), parts[2]))
    return entries


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """True if MOUNTPOINT appears in /proc/self/mounts (works for a dead FUSE mount too,
    where os.path.ismount fails with ENOTCONN and says False)."""
    target = os.path.realpath(mountpoint)
    return any(mnt == target for _src, mnt, _type in mount_entries())


def fs_type(path: str | os.PathLike[str]) -> str:
    """The file system type of the mount holding PATH (longest mount-point prefix)."""
    real = os.path.realpath(path)
    best, best_type = "", "?"
    for _src, mnt, typ in mount_entries():
        prefix = mnt.rstrip("/") + "/"
        if (real == mnt or real.startswith(prefix) or mnt == "/") and len(mnt) >= len(best):
            best, best_type = mnt, typ
    return best_type


def unmount(mountpoint: str | os.PathLike[str], lazy: bool = False) -> bool:
    """Unmount with fusermount3 (umount as fallback). True if no longer mounted."""
    mnt = os.fspath(mountpoint)
    commands = []
    if shutil.which("fusermount3"):
        commands.append(["fusermount3", "-u", *(["-z"] if lazy else []), mnt])
    commands.append(["umount", *(["-l"] if lazy else []), mnt])
    for cmd in commands:
        if not is_mounted(mnt):
            return True
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return not is_mounted(mnt)


def pid_alive(pid: int) -> bool:
    """True while PID exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_pid_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


class MountError(AssertionError):
    """The daemon failed to mount, died, or did not exit cleanly."""


class ClusterfsMount:
    """One clusterfs node: a block dir, a state dir and a mount point under BASE.

    start() formats the block dir on first use and mounts in the foreground (-f) as a
    child process; stop() unmounts and waits for exit status 0; kill9() SIGKILLs the
    daemon and lazily unmounts the dead mount; remount() starts again on the same block
    and state dirs; cleanup() never raises and leaves no mount or process behind.
    """

    def __init__(self, base: str | os.PathLike[str], node: str = "n1") -> None:
        self.base = Path(base)
        self.node = node
        self.blockdir = self.base / "block"
        self.statedir = self.base / "state"
        self.mountpoint = self.base / "mnt"
        self.logfile = self.base / f"daemon-{node}.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        for d in (self.base, self.mountpoint):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)

    # -- lifecycle ------------------------------------------------------------------
    def format(self) -> None:
        self.blockdir.mkdir(parents=True, exist_ok=True)
        run_cli("format", str(self.blockdir), check=True)

    def mount_args(self) -> list[str]:
        return [
            *clusterfs_command(), "mount", str(self.blockdir), str(self.mountpoint),
            "--node", self.node, "--state", str(self.statedir),
            "--listen", f"127.0.0.1:{self.port}", "-f",
        ]

    def start(self) -> ClusterfsMount:
        if not (self.blockdir.exists() and any(self.blockdir.iterdir())):
            self.format()
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        with open(self.logfile, "ab") as log:
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(
                self.mount_args(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.wait_for_mount()
        return self

    def wait_for_mount(self, timeout_s: float = MOUNT_TIMEOUT_S) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if is_mounted(self.mountpoint) and os.path.ismount(self.mountpoint):
                return
            if self.proc.poll() is not None:
                raise MountError(
                    f"clusterfs mount exited with {self.proc.returncode} before the mount "
                    f"came up:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        raise MountError(f"mount point did not come up in {timeout_s} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """Unmount (as a user would), wait for the daemon; return its exit status."""
        assert self.proc is not None
        if not unmount(self.mountpoint):
            raise MountError(f"could not unmount {self.mountpoint}")
        return self.wait_exit(timeout_s)

    def terminate(self, sig: int = signal.SIGTERM, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """Stop the daemon with SIG (by PID); return its exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.wait_exit(timeout_s)

    def wait_exit(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        assert self.proc is not None
        status = wait_or_kill(self.proc, timeout_s)
        if status is None:
            raise MountError(
                f"daemon {self.proc.pid} did not exit within {timeout_s} s; killed it:\n"
                f"{self.log_tail()}"
            )
        return status

    def kill9(self, unmount_dead: bool = True) -> None:
        """SIGKILL the daemon by PID and reap it; then lazily unmount the dead mount
        (unless UNMOUNT_DEAD is false: call unmount_dead() later, e.g. once the processes
        that used the mount have seen ENOTCONN)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if unmount_dead:
            self.unmount_dead()

    def unmount_dead(self) -> None:
        if not unmount(self.mountpoint, lazy=True):
            raise MountError(f"could not unmount dead mount {self.mountpoint}")

    def remount(self) -> ClusterfsMount:
        if self.alive():
            self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Leave no mount and no daemon behind; never raises."""
        try:
            if is_mounted(self.mountpoint) and not unmount(self.mountpoint):
                unmount(self.mountpoint, lazy=True)
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        except Exception as exc:  # cleanup must go on; report on stderr
            print(f"ClusterfsMount.cleanup: {exc!r}", file=sys.stderr)

    # -- diagnostics ----------------------------------------------------------------
    def log_text(self, since_start: bool = False) -> str:
        try:
            with open(self.logfile, "rb") as f:
                if since_start:
                    f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_mark(self) -> int:
        try:
            return self.logfile.stat().st_size
        except FileNotFoundError:
            return 0

    def log_problems_since(self, offset: int) -> list[str]:
        """Traceback and ERROR/CRITICAL lines the daemon logged after byte OFFSET."""
        try:
            with open(self.logfile, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        markers = ("Traceback", "ERROR", "CRITICAL")
        return [line for line in text.splitlines() if any(m in line for m in markers)]

    def backing_files(self) -> list[Path]:
        """Regular files in the block directory's data area (the whole dir if no data/),
        less the node's spare backing files (made ahead for inode numbers not yet handed
        out; see clusterfs.spares)."""
        root = self.blockdir / "data"
        if not root.is_dir():
            root = self.blockdir
        files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        spares = self.spare_inos([p.name for p in files])
        return [p for p in files if p.name not in spares]

    def spare_inos(self, names: list[str]) -> set[str]:
        """The names among `names` that are spares: at or above the replica's next inode
        number, or (while a spare is being removed again) naming a non-regular inode.
        Read while the daemon runs: LMDB allows other readers."""
        from clusterfs.store import Store

        store = Store(self.statedir / "replica")
        try:
            with store.read() as view:
                next_ino = view.get_counter(b"next_ino")
                return {name for name in names if _is_spare(view, name, next_ino)}
        finally:
            store.close()

    def fsck(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return run_cli("fsck", str(self.blockdir), "--state", str(self.statedir), *extra)


def _is_spare(view: Any, name: str, next_ino: int) -> bool:
    try:
        ino = int(name, 16)
    except ValueError:
        return False
    if ino >= next_ino:
        return True
    inode = view.get_inode(ino)
    return inode is not None and not stat.S_ISREG(inode.mode)


def wait_or_kill(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """The exit status of PROC within TIMEOUT_S; None if it had to be SIGKILLed (by PID)."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def run_cli(
    *args: str, check: bool = False, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*clusterfs_command(), *args],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"clusterfs {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc


@contextlib.contextmanager
def mounted(base: str | os.PathLike[str], node: str = "n1") -> Iterator[ClusterfsMount]:
    """A started ClusterfsMount that is cleaned up (by PID) however the block exits."""
    m = ClusterfsMount(base, node)
    try:
        m.start()
        yield m
    finally:
        m.cleanup()


# -- running an operation as another user ---------------------------------------------
def as_user(uid: int, gid: int, func: Callable[..., Any], *args: Any) -> Any:
    """Run FUNC(*ARGS) in a forked child with real/effective/saved uid and gid switched
    (no supplementary groups). Returns its result; re-raises an OSError it raised with
    the same errno (other exceptions come back as AssertionError with the message)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        status = 0
        try:
            os.close(rfd)
            try:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                result: tuple[str, Any] = ("ok", func(*args))
            except OSError as exc:
                result = ("oserror", (exc.errno, str(exc)))
            except BaseException as exc:
                result = ("exception", repr(exc))
            try:
                data = pickle.dumps(result)
            except Exception as exc:
                data = pickle.dumps(("exception", f"unpicklable result: {exc!r}"))
            with os.fdopen(wfd, "wb") as w:
                w.write(data)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        data = r.read()
    _, wait_status = os.waitpid(pid, 0)
    if not data:
        raise AssertionError(f"as_user child failed (wait status {wait_status})")
    kind, value = pickle.loads(data)
    if kind == "ok":
        return value
    if kind == "oserror":
        code, message = value
        raise OSError(code, message)
    raise AssertionError(f"as_user child raised {value}")


# -- libc calls the os module lacks -------------------------------------------------------
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(rc: int, *paths: str | os.PathLike[str]) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), *[os.fspath(p) for p in paths[:1]])


def renameat2(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], flags: int
) -> None:
    rc = _libc.renameat2(
        AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)
    )
    _check(rc, src)


def utimensat(
    path: str | os.PathLike[str],
    atime: tuple[int, int],
    mtime: tuple[int, int],
    follow_symlinks: bool = True,
) -> None:
    """utimensat(2) with raw (sec, nsec) pairs, so UTIME_NOW / UTIME_OMIT can be passed."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    flags = 0 if follow_symlinks else 0x100  # AT_SYMLINK_NOFOLLOW
    rc = _libc.utimensat(AT_FDCWD, os.fsencode(path), times, ctypes.c_int(flags))
    _check(rc, path)


def errno_of(func: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """The errno FUNC raised, or 0 if it succeeded."""
    try:
        func(*args, **kwargs)
    except OSError as exc:
        return exc.errno or -1
    return 0


def errname(code: int) -> str:
    return errno.errorcode.get(code, str(code)) if code else "success"


def expect_errno(expected: int, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Assert FUNC(*ARGS) fails with errno EXPECTED (names both errnos when it does not)."""
    got = errno_of(func, *args, **kwargs)
    name = getattr(func, "__name__", repr(func))
    assert got == expected, f"{name}{args!r}: expected {errname(expected)}, got {errname(got)}"


_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "riscv64": 61, "ppc64le": 202, "s390x": 220}
_libc.syscall.restype = ctypes.c_long


def getdents64(fd: int, bufsize: int = 4096) -> list[tuple[int, int, int, str]]:
    """One getdents64(2) call on a directory fd: [(d_ino, d_off, d_type, name)]; [] at end.

    Unlike os.scandir this exposes d_off, the cookie lseek() takes to resume after an entry.
    """
    nr = _SYS_GETDENTS64[os.uname().machine]
    buf = ctypes.create_string_buffer(bufsize)
    n = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(fd), buf, ctypes.c_size_t(bufsize))
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    raw = buf.raw[:n]
    out, pos = [], 0
    while pos < n:
        ino, off = int.from_bytes(raw[pos : pos + 8], sys.byteorder), int.from_bytes(
            raw[pos + 8 : pos + 16], sys.byteorder, signed=True
        )
        reclen = int.from_bytes(raw[pos + 16 : pos + 18], sys.byteorder)
        dtype = raw[pos + 18]
        name = os.fsdecode(raw[pos + 19 : pos + reclen].split(b"\0", 1)[0])
        out.append((ino, off, dtype, name))
        pos += reclen
    return out


def pids_serving(mountpoint: str | os.PathLike[str]) -> list[int]:
    """PIDs of `clusterfs mount ... MOUNTPOINT` processes (found by their command line,
    for a daemon that detached itself); never the caller."""
    target = os.fsencode(os.fspath(mountpoint))
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"mount" in argv and target in argv and any(b"clusterfs" in a for a in argv):
            pids.append(int(entry))
    return pids


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each PID (ones this test started) and wait until it is gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_pid_gone(pid, 10)


# -- multi-node helpers (tests/cluster) ------------------------------------------------------
class Together:
    """Runs callables at the same moment, round after round, in long-lived threads: each
    call waits at a barrier with the others, so they reach the file system together."""

    BARRIER_TIMEOUT_S = 30.0
    RESULT_TIMEOUT_S = 60.0

    def __init__(self, threads: int) -> None:
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "together")

    def run(self, *funcs: Callable[[], Any]) -> list[int]:
        """Call every FUNC at once; the errno each raised (0 for success)."""
        import threading

        barrier = threading.Barrier(len(funcs))

        def call(func: Callable[[], Any]) -> int:
            barrier.wait(self.BARRIER_TIMEOUT_S)
            return errno_of(func)

        futures = [self._pool.submit(call, func) for func in funcs]
        return [f.result(timeout=self.RESULT_TIMEOUT_S) for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Together:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def entry_state(path: str | os.PathLike[str], with_data: bool = True) -> tuple[Any, ...]:
    """What one directory entry looks like through a mount: type, mode, inode number, link
    count (not for directories), and with WITH_DATA the size of a regular file, the target
    of a symlink."""
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    nlink = 0 if stat.S_ISDIR(st.st_mode) else st.st_nlink
    extra: Any = None
    if stat.S_ISLNK(st.st_mode):
        extra = os.readlink(path)
    elif with_data and stat.S_ISREG(st.st_mode):
        extra = st.st_size
    return (kind, stat.S_IMODE(st.st_mode), st.st_ino, nlink, extra)


def tree_state(root: str | os.PathLike[str], with_data: bool = True) -> dict[str, tuple[Any, ...]]:
    """entry_state of everything under ROOT, by path relative to ROOT (symlinks are not
    followed)."""
    out: dict[str, tuple[Any, ...]] = {}
    base = os.fspath(root)
    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, dirnames, filenames in os.walk(base, onerror=fail):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, base)] = entry_state(path, with_data)
    return out


def tree_diff(a: dict[str, Any], b: dict[str, Any], limit: int = 20) -> list[str]:
    """Lines naming the paths where two tree_state results differ."""
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            lines.append(f"{key}: {a.get(key, 'missing')} != {b.get(key, 'missing')}")
    return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])
