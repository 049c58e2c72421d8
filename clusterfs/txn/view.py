"""The membership view the commit cores are given (produced by the membership layer)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class View:
    """Who is in the cluster in one epoch, and which member coordinates commits.

    Epochs only grow. A member that was in no earlier view (a joiner) is given a replica
    caught up by snapshot before it appears here; every other member carries its own
    replica and commit log over from the view before.
    """

    epoch: int
    members: tuple[str, ...]
    leader: str

    def __post_init__(self) -> None:
        if self.leader not in self.members:
            raise ValueError(f"leader {self.leader!r} is not a member")
        if len(set(self.members)) != len(self.members):
            raise ValueError("duplicate member")

    def has(self, node: str) -> bool:
        return node in self.members
