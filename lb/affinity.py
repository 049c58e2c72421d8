"""A node's own sessions and the affinity they give it.

A node has affinity to a key while it holds a live session for it, and for a
linger period after the last one closed (the client may come back and expect
its state). Affinity is also pinned briefly when the node has told the owner
"mine": the request that prompted the question may still be on its way here,
and must find the affinity that was promised.

Keys are indexed by bucket, so the balancer can tell when its last affinity
in a bucket ends (that is when it settles the bucket). Expiries sit in a heap
whose stale entries are skipped; `now` is always an argument.
"""

from __future__ import annotations

import heapq


class _Entry:
    __slots__ = ("bucket", "linger_until", "live")

    def __init__(self, bucket: int) -> None:
        self.bucket = bucket
        self.live = 0
        self.linger_until = float("-inf")


class AffinityTable:
    """Live and lingering sessions of one node, by key and by bucket."""

    def __init__(self, linger_s: float) -> None:
        self.linger_s = linger_s
        self._entries: dict[bytes, _Entry] = {}
        self._by_bucket: dict[int, set[bytes]] = {}
        self._sessions: dict[str, bytes] = {}
        self._expiries: list[tuple[float, bytes]] = []

    def has(self, key: bytes, now: float) -> bool:
        """True when this node has affinity to `key` at `now`."""
        entry = self._entries.get(key)
        return entry is not None and (entry.live > 0 or entry.linger_until > now)

    def open(self, key: bytes, bucket: int, session_id: str) -> None:
        """Record a new live session for `key` (revives lingering affinity)."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(bucket)
            self._by_bucket.setdefault(bucket, set()).add(key)
        entry.live += 1
        self._sessions[session_id] = key

    def close(self, session_id: str, now: float) -> bool:
        """End a session; the last one for its key starts the linger period.

        Returns False for an unknown session (already closed, or from before a restart).
        """
        key = self._sessions.pop(session_id, None)
        if key is None:
            return False
        entry = self._entries[key]
        entry.live -= 1
        if entry.live == 0:
            self._linger(key, entry, now + self.linger_s)
        return True

    def pin(self, key: bytes, until: float) -> None:
        """Keep existing affinity to `key` at least until `until`."""
        entry = self._entries.get(key)
        if entry is not None and entry.live == 0 and until > entry.linger_until:
            self._linger(key, entry, until)

    def _linger(self, key: bytes, entry: _Entry, until: float) -> None:
        entry.linger_until = until
        heapq.heappush(self._expiries, (until, key))

    def expire(self, now: float) -> set[int]:
        """Drop affinity that ended by `now`; returns buckets left with no affinity."""
        emptied: set[int] = set()
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            _, key = heapq.heappop(expiries)
            entry = self._entries.get(key)
            if entry is None or entry.live > 0 or entry.linger_until > now:
                continue
            del self._entries[key]
            keys = self._by_bucket[entry.bucket]
            keys.discard(key)
            if not keys:
                del self._by_bucket[entry.bucket]
                emptied.add(entry.bucket)
        return emptied

    def next_expiry(self) -> float | None:
        """When the earliest affinity may end, or None."""
        expiries = self._expiries
        while expiries:
            until, key = expiries[0]
            entry = self._entries.get(key)
            if entry is not None and entry.live == 0 and entry.linger_until == until:
                return until
            heapq.heappop(expiries)
        return None

    def holds_bucket(self, bucket: int) -> bool:
        """True when some key of `bucket` has (live or lingering) affinity here."""
        return bucket in self._by_bucket

    def buckets(self) -> set[int]:
        """Every bucket in which this node holds affinity."""
        return set(self._by_bucket)

    def session_count(self) -> int:
        """Live sessions held."""
        return len(self._sessions)

    def key_count(self) -> int:
        """Keys with live or lingering affinity."""
        return len(self._entries)
