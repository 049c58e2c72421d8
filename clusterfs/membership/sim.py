"""An in-memory cluster of membership cores on a virtual clock, for tests.

Why: the cores are sans-IO, so a whole cluster runs in one process,
deterministically (one seeded RNG; one event heap ordered by time, then by a
sequence number). No sleeps, no sockets. The simulation plays the driver:
it ticks every node, carries messages (through encode/decode, so the wire
codec is exercised), plays the common-storage witness (an atomic
compare-and-swap), confirms catch-ups after `catchup_s`, and records what
happened so tests can check the safety invariants:

  * every view installed for an epoch is the same view (`views_by_epoch`);
  * an offline node never acts (any action from it is a `violation`);
  * during a partition, views beyond the one that may already have been
    decided before the cut are installed on at most one side.

Partitions are symmetric groups; a message is dropped when its ends are in
different groups at delivery time, or when either end has crashed. A crashed
node can be restarted from what its driver stored (Persist, InstallView,
GoOffline), as a real driver would after kill -9.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from clusterfs.membership.config import MembershipConfig
from clusterfs.membership.core import Membership
from clusterfs.membership.events import (
    AcceptorState,
    Action,
    AdmitMember,
    ClaimWitness,
    Event,
    GoOffline,
    InstallView,
    MemberCaughtUp,
    Persist,
    Rejoin,
    Send,
    Tick,
    WitnessResult,
)
from clusterfs.membership.messages import Message, decode, encode
from clusterfs.membership.view import View

Callback = Callable[[], None]


@dataclass
class _Episode:
    """One partition: its groups, the highest epoch before it, installs during it."""

    groups: list[frozenset[str]]
    base_epoch: int
    installs: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class SimConfig:
    seed: int = 0
    tick_s: float = 0.1
    min_latency_s: float = 0.002
    max_latency_s: float = 0.02
    drop_rate: float = 0.0
    catchup_s: float = 0.3
    witness_latency_s: float = 0.01
    membership: MembershipConfig = field(default_factory=MembershipConfig)


class Simulation:
    """Membership cores plus a simulated network, witness and catch-up."""

    def __init__(self, names: Iterable[str], config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.rng = random.Random(self.config.seed)
        self.now_s = 0.0
        self._heap: list[tuple[float, int, Callback]] = []
        self._seq = 0
        ordered = tuple(sorted(names))
        first = View(1, ordered, ordered[0])
        self.nodes: dict[str, Membership] = {}
        self.crashed: set[str] = set()
        self.groups: list[frozenset[str]] | None = None
        self.witness: tuple[int, str] | None = None
        self.views_by_epoch: dict[int, View] = {1: first}
        self.installs: list[tuple[float, str, View]] = []
        self.offline_events: list[tuple[float, str, str]] = []
        self.violations: list[str] = []
        self.episodes: list[_Episode] = []
        self.messages_sent = 0
        # What each node's driver wrote durably: for restarts after a crash.
        self.stored_views: dict[str, View | None] = {}
        self.stored_acceptors: dict[str, AcceptorState] = {}
        self.stored_offline: set[str] = set()
        for name in ordered:
            self.add_node(name, first)

    # ------------------------------------------------------------ the clock

    def at(self, when_s: float, callback: Callback) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(when_s, self.now_s), self._seq, callback))

    def run_for(self, duration_s: float) -> None:
        self.run_until(self.now_s + duration_s)

    def run_until(self, until_s: float) -> None:
        while self._heap and self._heap[0][0] <= until_s:
            when_s, _, callback = heapq.heappop(self._heap)
            self.now_s = when_s
            callback()
        self.now_s = max(self.now_s, until_s)

    # ------------------------------------------------------------ the nodes

    def add_node(self, name: str, view: View | None) -> Membership:
        """A node with `view` (or none: a fresh node that will be told to join)."""
        self.stored_views[name] = view
        return self._start(Membership(name, view, self.now_s, self.config.membership))

    def _start(self, node: Membership) -> Membership:
        self.nodes[node.name] = node
        self.crashed.discard(node.name)
        offset_s = self.rng.uniform(0, self.config.tick_s)
        self.at(self.now_s + offset_s, lambda: self._tick(node))
        return node

    def _tick(self, node: Membership) -> None:
        if node.name in self.crashed or self.nodes[node.name] is not node:
            return  # crashed, or replaced by a restart
        self.deliver(node.name, Tick())
        self.at(self.now_s + self.config.tick_s, lambda: self._tick(node))

    def restart(self, name: str) -> None:
        """Start a crashed node again from what its driver had stored."""
        if name not in self.crashed:
            return
        node = Membership(
            name,
            self.stored_views.get(name),
            self.now_s,
            self.config.membership,
            acceptor_state=self.stored_acceptors.get(name),
            online=name not in self.stored_offline,
        )
        self._start(node)

    def deliver(self, name: str, event: Event) -> None:
        """Hand `event` to node `name` now and perform its actions."""
        if name in self.crashed:
            return
        node = self.nodes[name]
        was_offline = node.state == "offline"
        actions = node.handle(event, self.now_s)
        if was_offline and actions and not isinstance(event, Rejoin):
            self.violations.append(f"{name} acted while offline: {actions}")
        for action in actions:
            self._perform(name, action)

    def _perform(self, name: str, action: Action) -> None:
        if isinstance(action, Send):
            self._send(name, action.to, action.message)
        elif isinstance(action, Persist):
            self.stored_acceptors[name] = action.state
        elif isinstance(action, InstallView):
            self.stored_views[name] = action.view
            self.stored_offline.discard(name)
            self._installed(name, action.view)
        elif isinstance(action, AdmitMember):
            joiner = action.node
            self.at(self.now_s + self.config.catchup_s,
                    lambda: self.deliver(name, MemberCaughtUp(joiner)))
        elif isinstance(action, ClaimWitness):
            self._claim_witness(name, action)
        elif isinstance(action, GoOffline):
            self.stored_offline.add(name)
            self.offline_events.append((self.now_s, name, action.reason))

    def _send(self, sender: str, to: str, message: Message) -> None:
        self.messages_sent += 1
        data = encode(message)
        if self.rng.random() < self.config.drop_rate:
            return
        delay_s = self.rng.uniform(self.config.min_latency_s, self.config.max_latency_s)
        self.at(self.now_s + delay_s, lambda: self._arrive(sender, to, data))

    def _arrive(self, sender: str, to: str, data: bytes) -> None:
        if to not in self.nodes or sender in self.crashed or not self.connected(sender, to):
            return
        self.deliver(to, decode(data))

    def _claim_witness(self, name: str, claim: ClaimWitness) -> None:
        """The compare-and-swap the driver must provide (see docs/membership.md)."""
        held = self.witness
        granted = held is None or held[0] < claim.epoch or held == (claim.epoch, claim.node)
        if granted:
            self.witness = (claim.epoch, claim.node)
        result = WitnessResult(claim.epoch, granted)
        self.at(self.now_s + self.config.witness_latency_s, lambda: self.deliver(name, result))

    # -------------------------------------------------------------- faults

    def crash(self, name: str) -> None:
        self.crashed.add(name)

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut the network into `groups`; nodes not named form one more group."""
        sets = [frozenset(g) for g in groups]
        rest = frozenset(self.nodes) - frozenset().union(*sets)
        if rest:
            sets.append(rest)
        self.groups = sets
        self.episodes.append(_Episode(sets, max(self.views_by_epoch)))

    def heal(self) -> None:
        self.groups = None

    def connected(self, a: str, b: str) -> bool:
        if self.groups is None:
            return True
        return any(a in group and b in group for group in self.groups)

    def rejoin(self, name: str, contacts: Iterable[str] | None = None) -> None:
        """Tell node `name` to (re-)join through `contacts` (default: everyone else)."""
        others = [n for n in self.nodes if n != name]
        chosen = tuple(contacts) if contacts is not None else tuple(sorted(others))
        self.deliver(name, Rejoin(chosen, f"{name}:7000"))

    # ---------------------------------------------------------- observation

    def _installed(self, name: str, view: View) -> None:
        self.installs.append((self.now_s, name, view))
        known = self.views_by_epoch.setdefault(view.epoch, view)
        if known != view:
            self.violations.append(f"{name} installed {view}, others {known}")
        if self.groups is not None and self.episodes:
            self.episodes[-1].installs.append((name, view.epoch))

    def split_brain(self) -> list[str]:
        """Partitions in which more than one side installed views past the grace epoch."""
        found = []
        for episode in self.episodes:
            sides = {
                index
                for name, epoch in episode.installs
                if epoch > episode.base_epoch + 1
                for index, group in enumerate(episode.groups)
                if name in group
            }
            if len(sides) > 1:
                found.append(f"partition {episode.groups}: sides {sorted(sides)} moved on")
        return found

    def online(self) -> list[str]:
        return sorted(n for n, node in self.nodes.items()
                      if node.online and n not in self.crashed)

    def views(self) -> dict[str, View | None]:
        """The installed view of every live online node."""
        return {n: self.nodes[n].view for n in self.online()}
