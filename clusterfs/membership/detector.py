"""Failure detection by heartbeat silence, in the driver's virtual time.

A peer is *heard* whenever a message of the current epoch arrives from it.
It is *suspected* once it has been silent for longer than the suspect timeout;
the node itself *has its majority* while itself plus the peers heard within
the offline timeout are a majority of the view. A new view starts every
peer's clock afresh at install time, so nobody is suspected for silence that
happened before it was a member.
"""

from __future__ import annotations

from collections.abc import Iterable


class FailureDetector:
    """When each peer of the current view was last heard."""

    def __init__(self, peers: Iterable[str], now_s: float) -> None:
        self.last_heard_s: dict[str, float] = dict.fromkeys(peers, now_s)

    def reset(self, peers: Iterable[str], now_s: float) -> None:
        """Track exactly `peers`; every clock restarts at `now_s`."""
        self.last_heard_s = dict.fromkeys(peers, now_s)

    def heard(self, peer: str, now_s: float) -> None:
        if peer in self.last_heard_s:
            self.last_heard_s[peer] = max(self.last_heard_s[peer], now_s)

    def silent_s(self, peer: str, now_s: float) -> float:
        return now_s - self.last_heard_s[peer]

    def silent_peers(self, now_s: float, timeout_s: float) -> set[str]:
        """Peers not heard for longer than `timeout_s`."""
        return {p for p in self.last_heard_s if self.silent_s(p, now_s) > timeout_s}

    def heard_peers(self, now_s: float, window_s: float) -> set[str]:
        """Peers heard within the last `window_s`."""
        return set(self.last_heard_s) - self.silent_peers(now_s, window_s)
