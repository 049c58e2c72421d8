"""Consistency check of a node's replica against the common block directory.

What it looks for: regular inodes without a backing file (a crash between a create's commit and
the file's creation), backing files without an inode (a crash between a purge and the file's
removal), unlinked inodes still waiting for their purge, entries that name a missing inode, and
link counts that disagree with the entries. The first three are repaired; the last two would
mean a bug in the apply function and are only reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field

from clusterfs import records
from clusterfs.blockdir import BlockDir
from clusterfs.committer import commit_batch
from clusterfs.store import Inode, Store

log = logging.getLogger(__name__)


@dataclass
class Report:
    missing_backing: list[int] = field(default_factory=list)
    orphan_backing: list[int] = field(default_factory=list)
    stray_paths: list[str] = field(default_factory=list)
    unpurged_inodes: list[int] = field(default_factory=list)
    dangling_entries: list[tuple[int, bytes, int]] = field(default_factory=list)
    bad_link_counts: list[tuple[int, int, int]] = field(default_factory=list)  # ino, has, should

    @property
    def clean(self) -> bool:
        return not any(vars(self).values())

    def lines(self) -> list[str]:
        out = [f"inode {ino}: backing file missing" for ino in self.missing_backing]
        out += [f"backing file {ino:x}: no inode" for ino in self.orphan_backing]
        out += [f"{path}: not a backing file" for path in self.stray_paths]
        out += [f"inode {ino}: unlinked, not yet purged" for ino in self.unpurged_inodes]
        out += [f"entry {name!r} in {parent}: inode {ino} missing"
                for parent, name, ino in self.dangling_entries]
        out += [f"inode {ino}: link count {has}, entries say {should}"
                for ino, has, should in self.bad_link_counts]
        return out


def check(store: Store, blockdir: BlockDir) -> Report:
    report = Report()
    inodes, next_ino = check_namespace(store, report)
    _check_backing(blockdir, inodes, next_ino, report)
    return report


def check_live(store: Store, blockdir: BlockDir) -> Report:
    """`check` while other nodes use the block directory: a file at or above the inode
    counter may be another node's new file (not applied here yet) or spare, so only files
    below it count as orphans. The replica must have caught up with the cluster."""
    report = Report()
    inodes, next_ino = check_namespace(store, report)
    _check_backing(blockdir, inodes, next_ino, report)
    report.orphan_backing = [ino for ino in report.orphan_backing if ino < next_ino]
    return report


def check_namespace(store: Store, report: Report) -> tuple[dict[int, Inode], int]:
    """The replica on its own: dangling entries, link counts, unpurged inodes."""
    with store.read() as view:
        inodes = {inode.ino: inode for inode in view.iter_inodes()}
        links: Counter[int] = Counter()
        for parent, entry in view.iter_dentries():
            if entry.ino not in inodes:
                report.dangling_entries.append((parent, entry.name, entry.ino))
                continue
            links[entry.ino] += 1
            if stat.S_ISDIR(inodes[entry.ino].mode):
                links[parent] += 1  # the child's ".."
        report.unpurged_inodes = sorted(view.orphans())
        next_ino = view.get_counter(b"next_ino")
    for ino, inode in inodes.items():
        expected = links[ino] + (1 if stat.S_ISDIR(inode.mode) and inode.nlink else 0)
        if stat.S_ISDIR(inode.mode) and ino == inode.parent:  # the root names itself
            expected = links[ino] + 2
        if inode.nlink != expected:
            report.bad_link_counts.append((ino, inode.nlink, expected))
    return inodes, next_ino


def _check_backing(blockdir: BlockDir, inodes: dict[int, Inode], next_ino: int,
                   report: Report) -> None:
    backing: dict[int, str] = {}
    for data_ino, path in blockdir.iter_data():
        if data_ino is None:
            report.stray_paths.append(path)
        else:
            backing[data_ino] = path
    regular = {ino for ino, inode in inodes.items() if stat.S_ISREG(inode.mode)}
    report.missing_backing = sorted(regular - backing.keys())
    spares = {ino for ino, path in backing.items() if ino >= next_ino and _empty(path)}
    report.orphan_backing = sorted(backing.keys() - regular - spares)


def repair(store: Store, blockdir: BlockDir, report: Report) -> None:
    """Fix what `check` found that can be fixed safely; the node must not be mounted."""
    for ino in report.missing_backing:
        blockdir.create_empty(ino)
    for ino in report.orphan_backing:
        blockdir.remove(ino)
    for path in report.stray_paths:
        _remove_stray(path)
    if report.unpurged_inodes:
        purge(store, blockdir, report.unpurged_inodes)


def purge(store: Store, blockdir: BlockDir, inos: list[int]) -> None:
    """Purge unlinked inodes, except those whose backing file another node still has open:
    that node purges them when it closes them (see `filesystem`)."""
    free = [ino for ino in inos if not _open_elsewhere(blockdir, ino)]
    outcomes = commit_batch(store, [records.Purge(ino) for ino in free])
    for outcome in outcomes:
        for inode in getattr(outcome, "purged", []):
            if stat.S_ISREG(inode.mode):
                blockdir.remove(inode.ino)


def _open_elsewhere(blockdir: BlockDir, ino: int) -> bool:
    try:
        return blockdir.is_held_elsewhere(ino)
    except OSError as exc:  # keep it: purging a file in use would lose its data
        log.warning("cannot tell whether inode %d is open elsewhere: %s", ino, exc)
        return True


def _remove_stray(path: str) -> None:
    """Remove a stray file; a stray directory is left for the operator (reported again)."""
    with contextlib.suppress(IsADirectoryError, PermissionError, FileNotFoundError):
        os.unlink(path)


def _empty(path: str) -> bool:
    """Spare backing files (see `spares`) are empty; data beyond the counter is an orphan."""
    try:
        return os.stat(path).st_size == 0
    except FileNotFoundError:
        return False
