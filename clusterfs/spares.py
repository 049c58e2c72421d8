"""Spare backing files: made ahead of time for the inode numbers the cluster hands out next.

Creating a file in the block directory right after the replica's flush is slow on a
journalling file system (the create waits for the journal commit that the flush started), and
a create must not return before its backing file exists. Inode numbers are handed out in
order, so the node makes empty backing files for the next few numbers in a worker thread,
in batches, while it is otherwise idle; a create then only opens its file. A spare whose
number went to a directory or symlink is removed again; `fsck` counts files at or above the
replica's next inode number as spares, not orphans.

Every node keeps spares for the same numbers in the one block directory (making one that
exists already is harmless). When a number goes to a regular file, the capturing node takes
the spare as the new backing file and the others only stop counting it; when it goes to any
other inode, every node removes the file at that number (a second removal finds nothing).
"""

from __future__ import annotations

import logging
import os
import stat

import trio

from clusterfs.blockdir import BlockDir
from clusterfs.store import Store

log = logging.getLogger(__name__)

SPARES_TARGET = 64  # spare files kept ahead of the inode counter
SPARES_LOW = 16  # refill when fewer are left


class Spares:
    def __init__(self, store: Store, blockdir: BlockDir) -> None:
        self._store = store
        self._blockdir = blockdir
        self._inos: set[int] = set()
        self._wanted = trio.Event()

    def take(self, ino: int, now_ns: int) -> int:
        """An fd on the (empty) backing file of the new regular inode `ino`, created at
        `now_ns` (a spare's times are those of the create, not of the spare)."""
        self._inos.discard(ino)
        # Also a spare the worker thread made but has not adopted yet: it exists already.
        fd = self._blockdir.create(ino)
        if os.fstat(fd).st_size:  # a file left by a replica that lost its last batch
            os.ftruncate(fd, 0)
        os.utime(fd, ns=(now_ns, now_ns))
        self._maybe_refill()
        return fd

    def claimed(self, ino: int) -> None:
        """Another node took the spare `ino` as a new regular file's backing file."""
        self._inos.discard(ino)
        self._maybe_refill()

    def discard(self, ino: int) -> bool:
        """`ino` went to an inode without a backing file; True if it was a spare here."""
        if ino not in self._inos:
            return False
        self._inos.discard(ino)
        self._maybe_refill()
        return True

    def _maybe_refill(self) -> None:
        if len(self._inos) < SPARES_LOW:
            self._wanted.set()

    def _next_ino(self) -> int:
        with self._store.read() as view:
            return view.get_counter(b"next_ino")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._wanted.set()
        task_status.started()
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            first = self._next_ino()
            wanted = [ino for ino in range(first, first + SPARES_TARGET) if ino not in self._inos]
            try:
                await trio.to_thread.run_sync(self._make, wanted)
            except OSError as exc:
                log.warning("cannot make spare backing files: %s", exc)
                continue
            self._adopt(wanted)

    def _make(self, inos: list[int]) -> None:
        for ino in inos:
            self._blockdir.create_empty(ino)

    def _adopt(self, made: list[int]) -> None:
        """Keep the spares still ahead of the counter; remove any whose number went to an
        inode without a backing file while they were being made."""
        next_ino = self._next_ino()
        self._inos.update(ino for ino in made if ino >= next_ino)
        with self._store.read() as view:
            taken = {ino: view.get_inode(ino) for ino in made if ino < next_ino}
        for ino, inode in taken.items():
            if inode is None or not stat.S_ISREG(inode.mode):
                self._blockdir.remove(ino)
