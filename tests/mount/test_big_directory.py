"""A directory of 100,000 entries lists in full through the mount.

The entries are committed through the namespace layer before mounting (as records, the way
the node itself would apply them) to keep the test fast; the listing goes through FUSE.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from clusterfs import records as r
from clusterfs.blockdir import open_blockdir
from clusterfs.committer import commit_batch
from clusterfs.namespace import ROOT_INO
from clusterfs.node import open_replica
from tests.util import ClusterfsMount

ENTRIES = 100_000
BATCH = 10_000


def _populate(mount: ClusterfsMount) -> None:
    blockdir = open_blockdir(mount.blockdir)
    store = open_replica(mount.statedir, blockdir)
    try:
        outcomes = commit_batch(store, [r.MakeDir(ROOT_INO, b"big", 0o755, 0, 0, 1)])
        big = outcomes[0].ino  # type: ignore[union-attr]
        for start in range(0, ENTRIES, BATCH):
            commit_batch(store, [
                r.MakeNode(big, f"entry-{i:06d}".encode(), stat.S_IFIFO | 0o644, 0, 0, 0, 2)
                for i in range(start, start + BATCH)
            ])
    finally:
        store.close()


@pytest.mark.mount
@pytest.mark.slow
def test_hundred_thousand_entries_list_in_full(fresh_base: Path) -> None:
    mount = ClusterfsMount(fresh_base)
    try:
        mount.format()
        _populate(mount)
        mount.start()
        names = os.listdir(mount.mountpoint / "big")
        assert len(names) == ENTRIES
        assert set(names) == {f"entry-{i:06d}" for i in range(ENTRIES)}
        assert os.stat(mount.mountpoint / "big" / "entry-099999").st_mode & stat.S_IFIFO
    finally:
        mount.cleanup()
