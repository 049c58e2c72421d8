"""The composition root of one node: block directory, replica, committer, FUSE mount.

`run(config, ready)` mounts, calls `ready()` once the mount is live, serves until the file
system is unmounted or the process gets SIGTERM/SIGINT, and then shuts down cleanly: queued
records are committed, handles closed, unlinked inodes purged and the replica marked clean.
After an unclean stop (kill -9, power loss) the next start repairs what a crash can leave
behind between a commit and the block directory (see `fsck`).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from clusterfs import fsck
from clusterfs.blockdir import BlockDir, open_blockdir
from clusterfs.committer import LocalCommitter
from clusterfs.filesystem import FileSystem
from clusterfs.fuse_ops import Operations, mount_options
from clusterfs.namespace import initialise
from clusterfs.store import Store

log = logging.getLogger(__name__)

CLEAN = b"clean"
CLUSTER_ID = b"cluster_id"


class NodeError(Exception):
    """The node cannot start; the message is one line for the operator."""


@dataclass(frozen=True)
class NodeConfig:
    blockdir: Path
    mountpoint: Path
    name: str
    state_dir: Path
    listen: str
    options: list[str] = field(default_factory=list)


def replica_path(state_dir: Path) -> Path:
    return state_dir / "replica"


def open_replica(state_dir: Path, blockdir: BlockDir) -> Store:
    """Open (or found) this node's replica and check it belongs to this block directory."""
    store = Store(replica_path(state_dir))
    with store.write() as view:
        cluster_id = view.get_meta(CLUSTER_ID)
        if cluster_id is None:
            view.put_meta(CLUSTER_ID, blockdir.cluster_id.encode())
            view.put_meta(CLEAN, b"1")
            initialise(view, os.getuid(), os.getgid(), time.time_ns())
        elif cluster_id.decode() != blockdir.cluster_id:
            store.close()
            raise NodeError(f"{state_dir}: state belongs to another cluster")
    return store


def recover(store: Store, blockdir: BlockDir) -> None:
    """Before serving: purge unlinked inodes (nothing holds them after a restart) and, after
    an unclean stop, repair the block directory."""
    with store.read() as view:
        clean = view.get_meta(CLEAN) == b"1"
    report = fsck.check(store, blockdir) if not clean else fsck.Report(
        unpurged_inodes=_orphans(store))
    if not report.clean:
        for line in report.lines():
            log.warning("recovery: %s", line)
        fsck.repair(store, blockdir, report)
    _set_clean(store, False)


def _orphans(store: Store) -> list[int]:
    with store.read() as view:
        return view.orphans()


def _set_clean(store: Store, clean: bool) -> None:
    with store.write() as view:
        view.put_meta(CLEAN, b"1" if clean else b"0")


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def serve(config: NodeConfig, ready: Callable[[], None]) -> None:
    blockdir = open_blockdir(config.blockdir)
    store = open_replica(config.state_dir, blockdir)
    try:
        recover(store, blockdir)
        fs = FileSystem(store, blockdir)
        committer = LocalCommitter(store, fs.on_applied)
        fs.committer = committer
        options = mount_options(config.options, f"clusterfs:{config.blockdir}")
        pyfuse3.init(Operations(fs), str(config.mountpoint), options)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.run)
                await nursery.start(fs.remove_purged)
                await nursery.start(fs.spares.run)
                nursery.start_soon(_stop_on_signals)
                ready()
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            fs.close_all()
            committer.commit_queued()
            fs.remove_purged_now()
        fsck.purge(store, blockdir, _orphans(store))
        _set_clean(store, True)
    finally:
        store.close()
    log.info("node %s stopped cleanly", config.name)


def run(config: NodeConfig, ready: Callable[[], None]) -> None:
    trio.run(serve, config, ready)
