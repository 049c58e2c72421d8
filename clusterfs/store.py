"""The node's LMDB replica of the namespace; the only module that touches LMDB.

Key layout (all integers big-endian, so LMDB's byte order is numeric order):

    db        key                                 value
    --------  ----------------------------------  ------------------------------------------
    inodes    ino u64                             INODE record (see `INODE` below)
    symlinks  ino u64                             symlink target bytes
    dentries  parent u64 + name                   DENTRY record: child ino u64, cookie u64
    cookies   parent u64 + cookie u64             name (readdir order and stable offsets)
    xattrs    ino u64 + name                      value bytes
    orphans   ino u64                             empty (nlink 0, waiting for the last close)
    disks     ino u64                             a shared disk's state (vhdshare; opaque here)
    log       first_seq u64                       a committed 2PC batch, encoded by the commit
                                                  driver (the last few, for catching up)
    prepared  first_seq u64                       a durably prepared, not yet applied batch
    meta      b"next_ino" / b"next_cookie" /      u64
              b"applied_seq"
              b"clean"                            b"1" while the replica is closed cleanly
              b"cluster_id"                       the block directory's cluster id
              b"view" / b"acceptor" / b"offline"  membership: the installed view, the Paxos
                                                  acceptor state, why the node is offline

A readdir cookie is handed out once per directory entry from one cluster-wide counter, so a
listing resumed after a cookie never repeats or skips an entry that survived in between.

Durability: LMDB itself never flushes (`sync=False`); the store flushes explicitly with
`fdatasync` after the write transactions that must be durable (`write()`), and not after
those whose content is durable elsewhere (`write(flush=False)`: applying a 2PC batch that
sits, flushed, in the prepared log of the same replica until the apply removes it). That
makes a commit round cost one device flush per node instead of two. The replica survives
kill -9 of the process at any moment (the page cache keeps every committed transaction). A
power loss loses at most the transactions since the last flush; LMDB's copy-on-write pages
keep the last flushed state intact, except if the loss hits during a flush that writes the
new meta page before the pages it points to — a narrow window that `metasync` ordering would
close at the price of a second flush per round, which we do not pay (see docs/commit-protocol.md).
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

U64 = struct.Struct(">Q")
# mode, uid, gid, nlink, rdev, size_bytes, parent, atime_ns, mtime_ns, ctime_ns
INODE = struct.Struct(">IIIIQQQqqq")
assert INODE.size == 64
DENTRY = struct.Struct(">QQ")
assert DENTRY.size == 16

MAP_SIZE_BYTES = 64 << 30  # address space only; the file grows as needed
_DB_NAMES = ("inodes", "symlinks", "dentries", "cookies", "xattrs", "orphans", "disks", "log",
             "prepared", "meta")
FIRST_COOKIE = 3  # 1 and 2 are the offsets after "." and ".."


@dataclass(slots=True)
class Inode:
    """One inode's replicated metadata. Regular files take size and times from their backing
    file; `size_bytes`, `atime_ns` and `mtime_ns` here serve the other types."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int = 0
    size_bytes: int = 0
    parent: int = 0  # directories only: the inode that ".." names
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    def pack(self) -> bytes:
        return INODE.pack(
            self.mode, self.uid, self.gid, self.nlink, self.rdev, self.size_bytes,
            self.parent, self.atime_ns, self.mtime_ns, self.ctime_ns,
        )

    @classmethod
    def unpack(cls, ino: int, raw: bytes) -> Inode:
        return cls(ino, *INODE.unpack(raw))


@dataclass(frozen=True, slots=True)
class Dentry:
    name: bytes
    ino: int
    cookie: int


def _u64(value: int) -> bytes:
    return U64.pack(value)


class View:
    """Typed access to the replica inside one LMDB transaction (read-only or write)."""

    def __init__(self, txn: Any, dbs: dict[str, Any]) -> None:
        self._txn = txn
        self._db = dbs

    # -- inodes ---------------------------------------------------------------------------
    def get_inode(self, ino: int) -> Inode | None:
        raw = self._txn.get(_u64(ino), db=self._db["inodes"])
        return None if raw is None else Inode.unpack(ino, raw)

    def put_inode(self, inode: Inode) -> None:
        self._txn.put(_u64(inode.ino), inode.pack(), db=self._db["inodes"])

    def delete_inode(self, ino: int) -> None:
        key = _u64(ino)
        self._txn.delete(key, db=self._db["inodes"])
        self._txn.delete(key, db=self._db["symlinks"])
        self._txn.delete(key, db=self._db["orphans"])
        self._txn.delete(key, db=self._db["disks"])
        for name in self.list_xattrs(ino):
            self._txn.delete(key + name, db=self._db["xattrs"])

    def iter_inodes(self) -> Iterator[Inode]:
        cursor = self._txn.cursor(db=self._db["inodes"])
        for key, raw in cursor:
            yield Inode.unpack(U64.unpack(key)[0], raw)

    def get_symlink(self, ino: int) -> bytes | None:
        raw = self._txn.get(_u64(ino), db=self._db["symlinks"])
        return None if raw is None else bytes(raw)

    def put_symlink(self, ino: int, target: bytes) -> None:
        self._txn.put(_u64(ino), target, db=self._db["symlinks"])

    # -- orphans: unlinked inodes kept for open handles -------------------------------------
    def add_orphan(self, ino: int) -> None:
        self._txn.put(_u64(ino), b"", db=self._db["orphans"])

    def orphans(self) -> list[int]:
        cursor = self._txn.cursor(db=self._db["orphans"])
        return [U64.unpack(key)[0] for key in cursor.iternext(keys=True, values=False)]

    # -- directory entries ----------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> Dentry | None:
        raw = self._txn.get(_u64(parent) + name, db=self._db["dentries"])
        if raw is None:
            return None
        ino, cookie = DENTRY.unpack(raw)
        return Dentry(name, ino, cookie)

    def put_dentry(self, parent: int, name: bytes, ino: int) -> None:
        cookie = self.next_counter(b"next_cookie", FIRST_COOKIE)
        self._txn.put(_u64(parent) + name, DENTRY.pack(ino, cookie), db=self._db["dentries"])
        self._txn.put(_u64(parent) + _u64(cookie), name, db=self._db["cookies"])

    def delete_dentry(self, parent: int, entry: Dentry) -> None:
        self._txn.delete(_u64(parent) + entry.name, db=self._db["dentries"])
        self._txn.delete(_u64(parent) + _u64(entry.cookie), db=self._db["cookies"])

    def list_dir(self, parent: int, after_cookie: int, limit: int) -> list[Dentry]:
        """Up to `limit` entries of `parent` whose cookie is greater than `after_cookie`."""
        prefix = _u64(parent)
        cursor = self._txn.cursor(db=self._db["cookies"])
        entries: list[Dentry] = []
        if not cursor.set_range(prefix + _u64(after_cookie + 1)):
            return entries
        for key, name in cursor:
            if key[:8] != prefix or len(entries) >= limit:
                break
            dentry = self.lookup(parent, bytes(name))
            if dentry is not None:
                entries.append(dentry)
        return entries

    def iter_dentries(self) -> Iterator[tuple[int, Dentry]]:
        """Every (parent, entry) in the replica, for consistency checks."""
        cursor = self._txn.cursor(db=self._db["dentries"])
        for key, raw in cursor:
            ino, cookie = DENTRY.unpack(raw)
            yield U64.unpack(key[:8])[0], Dentry(bytes(key[8:]), ino, cookie)

    def dir_is_empty(self, parent: int) -> bool:
        return not self.list_dir(parent, 0, 1)

    # -- extended attributes --------------------------------------------------------------
    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        raw = self._txn.get(_u64(ino) + name, db=self._db["xattrs"])
        return None if raw is None else bytes(raw)

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._txn.put(_u64(ino) + name, value, db=self._db["xattrs"])

    def delete_xattr(self, ino: int, name: bytes) -> None:
        self._txn.delete(_u64(ino) + name, db=self._db["xattrs"])

    def list_xattrs(self, ino: int) -> list[bytes]:
        prefix = _u64(ino)
        cursor = self._txn.cursor(db=self._db["xattrs"])
        names: list[bytes] = []
        if not cursor.set_range(prefix):
            return names
        for key in cursor.iternext(keys=True, values=False):
            if key[:8] != prefix:
                break
            names.append(bytes(key[8:]))
        return names

    # -- shared disks -----------------------------------------------------------------------
    def get_disk_state(self, ino: int) -> bytes:
        """A shared disk's state; b"" for a file that never had one."""
        raw = self._txn.get(_u64(ino), db=self._db["disks"])
        return b"" if raw is None else bytes(raw)

    def put_disk_state(self, ino: int, state: bytes) -> None:
        if state:
            self._txn.put(_u64(ino), state, db=self._db["disks"])
        else:
            self._txn.delete(_u64(ino), db=self._db["disks"])

    # -- counters, sequence, log ----------------------------------------------------------
    def get_counter(self, key: bytes, default: int = 0) -> int:
        raw = self._txn.get(key, db=self._db["meta"])
        return default if raw is None else U64.unpack(raw)[0]

    def set_counter(self, key: bytes, value: int) -> None:
        self._txn.put(key, _u64(value), db=self._db["meta"])

    def next_counter(self, key: bytes, first: int) -> int:
        value = self.get_counter(key, first)
        self.set_counter(key, value + 1)
        return value

    def get_meta(self, key: bytes) -> bytes | None:
        raw = self._txn.get(key, db=self._db["meta"])
        return None if raw is None else bytes(raw)

    def put_meta(self, key: bytes, value: bytes) -> None:
        self._txn.put(key, value, db=self._db["meta"])

    def delete_meta(self, key: bytes) -> None:
        self._txn.delete(key, db=self._db["meta"])

    # -- the commit log: committed and prepared batches, as encoded by the commit driver --
    def append_log(self, first_seq: int, encoded: bytes, keep_batches: int) -> None:
        """Add a committed batch; drop the oldest beyond `keep_batches`."""
        db = self._db["log"]
        self._txn.put(_u64(first_seq), encoded, db=db)
        excess = self._txn.stat(db)["entries"] - keep_batches
        if excess > 0:
            cursor = self._txn.cursor(db=db)
            cursor.first()
            for _ in range(excess):
                cursor.delete()

    def log_tail(self, count: int) -> list[bytes]:
        """The last `count` committed batches, oldest first."""
        cursor = self._txn.cursor(db=self._db["log"])
        tail: list[bytes] = []
        if count > 0 and cursor.last():
            for _, value in cursor.iterprev():
                tail.append(bytes(value))
                if len(tail) == count:
                    break
        return tail[::-1]

    def put_prepared(self, first_seq: int, encoded: bytes) -> None:
        """Keep a prepared batch; it replaces every prepared batch from `first_seq` on."""
        self.delete_prepared_from(first_seq)
        self._txn.put(_u64(first_seq), encoded, db=self._db["prepared"])

    def delete_prepared(self, first_seq: int) -> None:
        self._txn.delete(_u64(first_seq), db=self._db["prepared"])

    def delete_prepared_from(self, first_seq: int) -> None:
        cursor = self._txn.cursor(db=self._db["prepared"])
        if cursor.set_range(_u64(first_seq)):
            while cursor.delete():
                pass

    def delete_prepared_through(self, last_seq: int) -> None:
        cursor = self._txn.cursor(db=self._db["prepared"])
        while cursor.first() and U64.unpack(cursor.key()[:8])[0] <= last_seq:
            cursor.delete()

    def prepared(self) -> list[bytes]:
        return [bytes(value) for _, value in self._txn.cursor(db=self._db["prepared"])]


REPLICATED_DBS = ("inodes", "symlinks", "dentries", "cookies", "xattrs", "orphans", "disks")
REPLICATED_META = (b"next_ino", b"next_cookie", b"applied_seq")
CLUSTER_ID = b"cluster_id"
SNAPSHOT_CHUNK_ENTRIES = 50_000  # entries copied between two progress reports

SnapshotProgress = Callable[[int, int], None]  # (entries copied, entries in all)


class SnapshotError(Exception):
    """A snapshot that is not a replica of this cluster; the message is one line."""


class Store:
    """The LMDB environment of one node's replica."""

    def __init__(self, path: Path, durable: bool = True) -> None:
        """`durable=False` skips the device flushes: for tests and simulations only."""
        self._durable = durable
        path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(
            str(path), map_size=MAP_SIZE_BYTES, max_dbs=len(_DB_NAMES), sync=False,
            metasync=False, max_readers=1024,
        )
        with self._env.begin(write=True) as txn:
            self._dbs = {name: self._env.open_db(name.encode(), txn=txn) for name in _DB_NAMES}

    @contextmanager
    def read(self) -> Iterator[View]:
        with self._env.begin(buffers=False) as txn:
            yield View(txn, self._dbs)

    @contextmanager
    def write(self, flush: bool = True) -> Iterator[View]:
        """A write transaction; commits when the block ends without an exception, then
        flushes the replica to the device unless `flush` is False (see Durability)."""
        with self._env.begin(write=True) as txn:
            yield View(txn, self._dbs)
        if flush and self._durable:
            self._env.sync(True)

    @contextmanager
    def scratch(self) -> Iterator[View]:
        """A write transaction that is always rolled back (to try records out)."""
        txn = self._env.begin(write=True)
        try:
            yield View(txn, self._dbs)
        finally:
            txn.abort()

    @contextmanager
    def savepoint(self, view: View) -> Iterator[View]:
        """A nested write transaction inside `view`'s: aborted alone if the block raises."""
        with self._env.begin(write=True, parent=view._txn) as child:
            yield View(child, self._dbs)

    def sync(self) -> None:
        """Flush everything committed so far (safe to call from a worker thread)."""
        self._env.sync(True)

    def copy_snapshot(self, directory: Path) -> int:
        """Write a consistent, compacted copy of the replica into `directory` (made here;
        it must not exist) and return the applied sequence that the copy holds."""
        directory.mkdir()
        with self._env.begin() as txn:
            applied = txn.get(b"applied_seq", db=self._dbs["meta"])
            self._env.copy(str(directory), compact=True, txn=txn)
        return 0 if applied is None else U64.unpack(applied)[0]

    def install_snapshot(self, directory: Path, cluster_id: bytes,
                         progress: SnapshotProgress | None = None) -> tuple[int, list[bytes]]:
        """Replace the replicated state (namespace, counters, commit log) by that of the
        snapshot in `directory`, in one flushed transaction, and drop the prepared batches
        that the snapshot holds; this node's own metadata (view, acceptor state, cluster id)
        and its prepared batches after the snapshot stay. Returns the snapshot's applied
        sequence and its commit log (encoded batches, oldest first)."""
        source = lmdb.open(str(directory), readonly=True, lock=False, max_dbs=len(_DB_NAMES))
        try:
            with source.begin(buffers=False) as src:  # copies: 8x faster here than buffers
                src_dbs = {name: source.open_db(name.encode(), txn=src, create=False)
                           for name in _DB_NAMES}
                stored_id = src.get(CLUSTER_ID, db=src_dbs["meta"])
                if stored_id is None or bytes(stored_id) != cluster_id:
                    raise SnapshotError(f"{directory} is not a replica of this cluster")
                applied = src.get(b"applied_seq", db=src_dbs["meta"])
                applied_seq = 0 if applied is None else U64.unpack(applied)[0]
                with self._env.begin(write=True) as txn:
                    self._copy_dbs(src, src_dbs, txn, progress)
                    for key in REPLICATED_META:
                        value = src.get(key, db=src_dbs["meta"])
                        if value is None:
                            txn.delete(key, db=self._dbs["meta"])
                        else:
                            txn.put(key, value, db=self._dbs["meta"])
                    View(txn, self._dbs).delete_prepared_through(applied_seq)
                log = [bytes(value) for _, value in src.cursor(db=src_dbs["log"])]
        finally:
            source.close()
        if self._durable:
            self._env.sync(True)
        return applied_seq, log

    def _copy_dbs(self, src: Any, src_dbs: dict[str, Any], txn: Any,
                  progress: SnapshotProgress | None) -> None:
        names = (*REPLICATED_DBS, "log")
        total = sum(src.stat(src_dbs[name])["entries"] for name in names)
        copied = 0
        for name in names:
            txn.drop(self._dbs[name], delete=False)
        for name in names:
            items = src.cursor(db=src_dbs[name]).iternext()
            target = txn.cursor(db=self._dbs[name])
            while chunk := list(itertools.islice(items, SNAPSHOT_CHUNK_ENTRIES)):
                target.putmulti(chunk, append=True)
                copied += len(chunk)
                if progress is not None:
                    progress(copied, total)

    def digest(self) -> str:
        """A hash of the replicated state: equal on replicas that applied the same records."""
        h = hashlib.sha256()
        with self._env.begin(buffers=False) as txn:
            for name in REPLICATED_DBS:
                h.update(name.encode())
                for key, value in txn.cursor(db=self._dbs[name]):
                    h.update(U64.pack(len(key)) + key + U64.pack(len(value)) + value)
            for key in REPLICATED_META:
                h.update(key + (txn.get(key, b"", db=self._dbs["meta"])))
        return h.hexdigest()

    def close(self) -> None:
        self._env.close()
