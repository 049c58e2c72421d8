"""The `ops` tests' rig: a FileSystem on a temporary replica and block directory, with the
local committer (one node, no network) and the purge task running."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from clusterfs.blockdir import BlockDir, format_blockdir
from clusterfs.committer import LocalCommitter
from clusterfs.filesystem import FileSystem
from clusterfs.node import open_replica
from clusterfs.store import Store


class Rig:
    def __init__(self, fs: FileSystem, store: Store, blockdir: BlockDir) -> None:
        self.fs, self.store, self.blockdir = fs, store, blockdir

    def backing_files(self) -> set[int]:
        return {ino for ino, _ in self.blockdir.iter_backing()}


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    blockdir = format_blockdir(tmp_path / "blocks")
    store = open_replica(tmp_path / "state", blockdir)
    fs = FileSystem(store, blockdir)
    committer = LocalCommitter(store, fs.on_applied)
    fs.committer = committer
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        await nursery.start(fs.remove_purged)
        yield Rig(fs, store, blockdir)
        fs.close_all()
        nursery.cancel_scope.cancel()
    store.close()
