"""Views and the pure rules over them: majority, leader choice, the next view.

A view is one agreed membership: an epoch number, the sorted member names and
the leader (the one 2PC coordinator of that epoch). Every change makes epoch
+ 1; every node installs the same view for the same epoch (the view-change
protocol in `paxos.py` guarantees it), so these functions are deterministic:
the same inputs give the same view on every node.

Leader rule: the current leader stays leader while it is a member (no needless
coordinator hand-over); otherwise the lowest member name leads.

The field layout matches `clusterfs.txn.view.View(epoch, members, leader)`,
the commit layer's input; `to_commit_view` converts. This type is a msgspec
struct of its own because it also travels inside membership messages.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from clusterfs.txn.view import View as CommitView


class View(msgspec.Struct, frozen=True):
    """Epoch, sorted unique member names, and the leader (one of the members)."""

    epoch: int
    members: tuple[str, ...]
    leader: str

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a view needs at least one member")
        if list(self.members) != sorted(set(self.members)):
            raise ValueError("view members must be sorted and unique")
        if self.leader not in self.members:
            raise ValueError("the leader must be a member")
        if self.epoch < 1:
            raise ValueError("epochs start at 1")

    def majority(self) -> int:
        """How many members make a majority of this view."""
        return majority_of(len(self.members))


def majority_of(member_count: int) -> int:
    """The smallest number of members that is more than half of `member_count`."""
    return member_count // 2 + 1


def choose_leader(members: Iterable[str], current_leader: str | None) -> str:
    """Keep `current_leader` if it is still a member, else the lowest name."""
    names = sorted(set(members))
    if not names:
        raise ValueError("no members to lead")
    if current_leader is not None and current_leader in names:
        return current_leader
    return names[0]


def founding_view(node: str) -> View:
    """The first view of a cluster founded by `node`."""
    return View(epoch=1, members=(node,), leader=node)


def next_view(
    current: View, *, remove: Iterable[str] = (), add: Iterable[str] = ()
) -> View | None:
    """The successor of `current` without `remove` and with `add`.

    None when nothing changes or when nobody would be left.
    """
    members = (set(current.members) - set(remove)) | set(add)
    if not members or members == set(current.members):
        return None
    ordered = tuple(sorted(members))
    return View(current.epoch + 1, ordered, choose_leader(ordered, current.leader))


def to_commit_view(view: View) -> CommitView:
    """The same view as the commit layer's type."""
    return CommitView(epoch=view.epoch, members=view.members, leader=view.leader)
