"""The two-node tie-break: a compare-and-swap record on the common storage.

docs/membership.md gives the rule: `claim(epoch, node)` is granted if the stored record is
absent or older, or already says `(epoch, node)`; refused otherwise. The read-decide-write
is serialised across nodes by a POSIX record lock (`lockf`) on a lock file next to the
record: local file systems and NFSv4 honour it across hosts, and the kernel (or the NFS
server's lease) releases it when a claimant dies, so a crash never leaves a stale lock.
The record is replaced atomically (write a temporary file, fsync, rename, fsync the
directory) before the claim is granted. Any error or a lock that cannot be had in time
counts as refused: going offline is always safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 2.0
LOCK_RETRY_S = 0.01
_THREADS = threading.Lock()


class Witness:
    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._record = directory / "witness"
        self._lock = directory / "witness.lock"

    def claim(self, epoch: int, node: str) -> bool:
        try:
            self._dir.mkdir(exist_ok=True)
            with self._locked():
                stored = self._read()
                if stored is None or stored[0] < epoch:
                    self._write(epoch, node)
                    return True
                return stored == (epoch, node)
        except (OSError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            log.warning("witness claim for epoch %d failed: %s", epoch, exc)
            return False

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A POSIX lock excludes other processes, not this one's threads.
        with _THREADS, self._locked_file():
            yield

    @contextlib.contextmanager
    def _locked_file(self) -> Iterator[None]:
        fd = os.open(self._lock, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            deadline_s = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except (BlockingIOError, PermissionError):  # held by another claimant
                    if time.monotonic() > deadline_s:
                        raise TimeoutError("witness lock is held") from None
                    time.sleep(LOCK_RETRY_S)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> tuple[int, str] | None:
        try:
            data = json.loads(self._record.read_text())
        except FileNotFoundError:
            return None
        return int(data["epoch"]), str(data["node"])

    def _write(self, epoch: int, node: str) -> None:
        tmp = self._dir / f"witness.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"epoch": epoch, "node": node}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._record)
        fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
