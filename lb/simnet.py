"""Virtual time and a simulated network for the balancer simulation.

Why: the balancer cores are sans-IO, so a whole cluster of them can run in
one process on a virtual clock, deterministically (one seeded RNG, one event
heap with a tie-breaking sequence number). No sleeps, no sockets.

The network delivers every message after a base latency plus seeded jitter,
in order per (sender, receiver) pair as TCP or ZeroMQ would. A node can be
made slow (everything sent to it arrives `extra_s` later, i.e. it processes
its input late) or dead (everything sent to it is dropped).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

Callback = Callable[..., None]


class EventLoop:
    """A virtual clock and a heap of timed callbacks."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callback, tuple[Any, ...]]] = []
        self._seq = 0

    def at(self, when: float, callback: Callback, *args: Any) -> None:
        """Run `callback(*args)` at virtual time `when` (not before now)."""
        self._seq += 1
        heapq.heappush(self._heap, (max(when, self.now), self._seq, callback, args))

    def after(self, delay_s: float, callback: Callback, *args: Any) -> None:
        """Run `callback(*args)` `delay_s` from now."""
        self.at(self.now + delay_s, callback, *args)

    def run_until(self, until: float) -> None:
        """Run every event due up to and including `until`; the clock ends at `until`."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            when, _, callback, args = heapq.heappop(heap)
            self.now = when
            callback(*args)
        self.now = max(self.now, until)

    def pending(self) -> int:
        """Events not yet run."""
        return len(self._heap)


class Network:
    """Delivery with latency, jitter, FIFO per link, slow and dead endpoints."""

    def __init__(self, loop: EventLoop, rng: random.Random, latency_s: float,
                 jitter_s: float) -> None:
        self.loop = loop
        self.rng = rng
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self.slow: dict[str, float] = {}  # endpoint -> extra delay of its input
        self.dead: set[str] = set()
        self._last_arrival: dict[tuple[str, str], float] = {}
        self.sent = 0
        self.dropped = 0

    def arrival(self, src: str, dst: str) -> float:
        """When a message sent now from `src` to `dst` arrives."""
        delay = self.latency_s + self.rng.random() * self.jitter_s + self.slow.get(dst, 0.0)
        link = (src, dst)
        when = max(self.loop.now + delay, self._last_arrival.get(link, 0.0))
        self._last_arrival[link] = when
        return when

    def send(self, src: str, dst: str, callback: Callback, *args: Any) -> None:
        """Deliver by calling `callback(*args)` at arrival, unless `dst` is dead then."""
        self.sent += 1
        self.loop.at(self.arrival(src, dst), self._deliver, dst, callback, args)

    def _deliver(self, dst: str, callback: Callback, args: tuple[Any, ...]) -> None:
        if dst in self.dead:
            self.dropped += 1
            return
        callback(*args)
