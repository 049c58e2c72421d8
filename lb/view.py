"""Membership views as the balancer sees them.

A view is what the membership layer decided: an epoch number and the member
set. Epochs increase by one per change and every node installs the same views
in the same order, so a view determines one Maglev table, the same on every
node. A node that installs epoch e + 1 right after epoch e knows exactly which
buckets moved and who owned them before (its history); a node that skipped an
epoch, or just started, does not.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import msgspec

from lb.table import DEFAULT_TABLE_SIZE, MaglevTable, moved_buckets, table_for


class View(msgspec.Struct, frozen=True):
    """Epoch and sorted member names; build with `View.of`."""

    epoch: int
    members: tuple[str, ...]

    def __post_init__(self) -> None:
        if list(self.members) != sorted(set(self.members)):
            raise ValueError("view members must be sorted and unique")
        if not self.members:
            raise ValueError("a view needs at least one member")

    @classmethod
    def of(cls, epoch: int, members: Iterable[str]) -> View:
        """The view of `epoch` with `members` in any order."""
        return cls(epoch, tuple(sorted(set(members))))

    def table(self, size: int = DEFAULT_TABLE_SIZE) -> MaglevTable:
        """The view's Maglev table (built once per process and member set)."""
        return table_for(self.members, size)

    def follows(self, previous: View | None) -> bool:
        """True when this view directly succeeds `previous` (no epoch skipped)."""
        return previous is not None and self.epoch == previous.epoch + 1


class ViewChange(msgspec.Struct, frozen=True):
    """What changed between two consecutive views."""

    added: frozenset[str]
    removed: frozenset[str]
    moved_from: dict[str, frozenset[int]]  # previous owner -> buckets it lost


def view_change(old: View, new: View, size: int = DEFAULT_TABLE_SIZE) -> ViewChange:
    """The members added and removed, and the buckets that moved, from `old` to `new`.

    Cached per member-set pair: every node of a cluster simulated in one process
    shares one result, so treat it as read-only.
    """
    return _change(old.members, new.members, size)


@functools.lru_cache(maxsize=16)
def _change(old: tuple[str, ...], new: tuple[str, ...], size: int) -> ViewChange:
    moved: dict[str, set[int]] = {}
    for bucket, previous in moved_buckets(table_for(old, size), table_for(new, size)):
        moved.setdefault(previous, set()).add(bucket)
    return ViewChange(frozenset(set(new) - set(old)), frozenset(set(old) - set(new)),
                      {node: frozenset(buckets) for node, buckets in moved.items()})
