"""Simulation harness: N balancer nodes and many clients on a virtual network.

Why: the properties that matter (exactly one answer, no duplicate session, no
avoidable move, silence in steady state) are about the whole cluster over
time, while views change. The harness runs real `Balancer` cores, one per
node, over `simnet` and checks the properties against its own ground truth,
which it keeps independently of the cores:

- which node holds live sessions for which affinity key, and when each node's
  last session for a key closed (its affinity lingers `linger_s` from then);
- a *duplicate* is an accept for a key that another live member holds a live
  session for; a *violation* (avoidable move) is an accept for a key whose
  affinity another live member still has (live or lingering). Sessions on a
  node that left, restarted or died are lost; moving them is unavoidable.

Clients loop: connect (a request to every node), hold the session, close,
stay idle (mostly shorter than the linger period, so they come back to the
same node), connect again. "Busy" makes a client retry after the advised
delay; no answer within `answer_timeout_s` makes it retry with a new request.
The membership layer is modelled by `Simulation.set_members`: it installs the
same view on every node at the same instant. Scenarios: rolling add, rolling
remove, rolling restart, a node dying with sessions, a slow-but-alive node.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from lb.balancer import Action, Balancer, BalancerConfig, Reply
from lb.hashing import affinity_key
from lb.messages import PeerMessage, SessionAccept, SessionBusy, SessionClose, SessionRequest
from lb.simclient import SimClient
from lb.simnet import EventLoop, Network
from lb.view import View


def node_name(index: int) -> str:
    """The name of simulated node `index`."""
    return f"node-{index:02d}"


@dataclass
class SimConfig:
    """Shape of a simulation; times in virtual seconds."""

    nodes: int = 4
    clients: int = 60
    seed: int = 1
    balancer: BalancerConfig = field(
        default_factory=lambda: BalancerConfig(table_size=4099, linger_s=20.0))
    latency_s: float = 0.001
    jitter_s: float = 0.002
    hold_s: tuple[float, float] = (1.0, 8.0)
    idle_s: tuple[float, float] = (0.2, 6.0)
    long_idle_s: tuple[float, float] = (20.0, 40.0)  # away longer than the linger period
    long_idle_share: float = 0.2
    reconnect_s: tuple[float, float] = (0.05, 0.5)
    answer_timeout_s: float = 2.0
    detect_s: float = 1.5
    clients_per_network: int = 8
    track_requests: bool = True
    per_node_jitter: bool = True  # False: a request reaches all healthy nodes at once (faster)


@dataclass
class Metrics:
    """What the harness observed."""

    requests: int = 0
    accepts: int = 0
    busy: int = 0
    client_timeouts: int = 0
    duplicates: int = 0
    violations: int = 0
    peer_messages: Counter[str] = field(default_factory=Counter)
    replies: dict[str, list[str]] = field(default_factory=dict)
    request_epochs: dict[str, set[int]] = field(default_factory=dict)
    troubled: set[str] = field(default_factory=set)

    def peer_message_count(self) -> int:
        """Balancer messages between nodes so far."""
        return sum(self.peer_messages.values())


class _Holding:
    __slots__ = ("closed_at", "live")

    def __init__(self) -> None:
        self.live = 0
        self.closed_at = float("-inf")


class Simulation:
    """A cluster of balancers, clients, a network and ground truth."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.loop = EventLoop()
        self.net = Network(self.loop, self.rng, config.latency_s, config.jitter_s)
        self.metrics = Metrics()
        self.nodes: dict[str, Balancer] = {}
        self.incarnations: Counter[str] = Counter()
        self.view = View(0, ("(none)",))  # replaced by epoch 1 below
        self._tick_at: dict[str, float] = {}
        self._truth: dict[bytes, dict[str, _Holding]] = {}
        self._session_keys: dict[str, tuple[str, bytes]] = {}
        self.clients = [SimClient(self, i) for i in range(config.clients)]
        self.clients_stopped = False
        self.set_members([node_name(i) for i in range(config.nodes)])

    # -- running ----------------------------------------------------------------

    @property
    def now(self) -> float:
        """Virtual time."""
        return self.loop.now

    def start_clients(self, spread_s: float = 1.0) -> None:
        """Every client connects once, at a random time within `spread_s`."""
        for client in self.clients:
            self.loop.after(self.rng.random() * spread_s, client.connect)

    def stop_clients(self) -> None:
        """Clients finish their sessions and do not come back."""
        self.clients_stopped = True

    def idle_time(self) -> float:
        """How long a client stays away between sessions."""
        if self.rng.random() < self.config.long_idle_share:
            return self.delay(self.config.long_idle_s)
        return self.delay(self.config.idle_s)

    def run_for(self, duration_s: float) -> None:
        """Advance virtual time by `duration_s`."""
        self.loop.run_until(self.loop.now + duration_s)

    def key_of(self, client: SimClient) -> bytes:
        """The affinity key of a client under the configured mode."""
        return affinity_key(self.config.balancer.affinity, client.client_id, client.addr)

    def is_steady(self) -> bool:
        """True when every member's balancer is in steady state."""
        return all(self.nodes[m].is_steady() for m in self.view.members if m in self.nodes)

    # -- membership (the harness plays the membership layer) --------------------

    def set_members(self, members: list[str]) -> None:
        """Install the next view with `members` on every node, starting new ones."""
        view = View.of(self.view.epoch + 1, members)
        for member in view.members:
            if member not in self.nodes:
                self._start_node(member)
        self.view = view
        for name, balancer in list(self.nodes.items()):
            if name not in view.members:
                self._stop_node(name)
            elif name not in self.net.dead:
                self._handle(name, balancer.install_view(view, self.now))

    def _start_node(self, name: str) -> None:
        self.incarnations[name] += 1
        self.nodes[name] = Balancer(name, self.config.balancer, self.incarnations[name])
        self.net.dead.discard(name)

    def _stop_node(self, name: str) -> None:
        """A node leaves or its process ends: its sessions are lost."""
        del self.nodes[name]
        self._tick_at.pop(name, None)
        self._lose_sessions(name)

    def add_node(self) -> str:
        """Start the next unused node name and add it to the view."""
        index = 0
        while node_name(index) in self.view.members:
            index += 1
        self.set_members([*self.view.members, node_name(index)])
        return node_name(index)

    def remove_node(self, name: str) -> None:
        """Remove `name` from the view (graceful leave)."""
        self.set_members([m for m in self.view.members if m != name])

    def kill_node(self, name: str) -> None:
        """`name` dies now; the membership layer removes it `detect_s` later."""
        self.net.dead.add(name)
        self._lose_sessions(name)
        self.loop.after(self.config.detect_s, self.remove_node, name)

    def make_slow(self, name: str, extra_s: float) -> None:
        """Everything `name` receives arrives `extra_s` late (0 restores it)."""
        if extra_s:
            self.net.slow[name] = extra_s
        else:
            self.net.slow.pop(name, None)

    # -- node side ----------------------------------------------------------------

    def deliver_request(self, client: SimClient, request: SessionRequest) -> None:
        """A client's request goes to every node that exists."""
        self.metrics.requests += 1
        if self.config.track_requests:
            self.metrics.replies[request.request_id] = []
            self.metrics.request_epochs[request.request_id] = set()
            if self.net.slow or self.net.dead:
                self.metrics.troubled.add(request.request_id)
        if self.config.per_node_jitter:
            for name in self.nodes:
                self.net.send(client.client_id, name, self._on_request, name, request)
            return
        together = [name for name in self.nodes if name not in self.net.slow]
        self.loop.after(self.config.latency_s, self._on_request_all, together, request)
        for name in self.net.slow:
            self.net.send(client.client_id, name, self._on_request, name, request)

    def _on_request_all(self, names: list[str], request: SessionRequest) -> None:
        for name in names:
            if name not in self.net.dead:
                self._on_request(name, request)

    def _on_request(self, name: str, request: SessionRequest) -> None:
        balancer = self.nodes.get(name)
        if balancer is None:
            return
        if self.config.track_requests and balancer.view is not None:
            self.metrics.request_epochs[request.request_id].add(balancer.view.epoch)
        self._handle(name, balancer.on_request(request, self.now))

    def deliver_close(self, client: SimClient, node: str, session_id: str) -> None:
        """A client closes its session on `node`."""
        self.net.send(client.client_id, node, self._on_close, node, session_id)

    def _on_close(self, name: str, session_id: str) -> None:
        balancer = self.nodes.get(name)
        if balancer is None:
            return
        self._handle(name, balancer.on_close(SessionClose(session_id), self.now))
        holder = self._session_keys.pop(session_id, None)
        if holder is not None and holder[0] == name:
            holding = self._truth.get(holder[1], {}).get(name)
            if holding is not None:
                holding.live -= 1
                if holding.live == 0:
                    holding.closed_at = self.now

    def _on_peer(self, name: str, message: PeerMessage) -> None:
        balancer = self.nodes.get(name)
        if balancer is not None:
            self._handle(name, balancer.on_peer(message, self.now))

    def _on_tick(self, name: str, when: float) -> None:
        balancer = self.nodes.get(name)
        if balancer is None or self._tick_at.get(name) != when:
            return
        del self._tick_at[name]
        self._handle(name, balancer.tick(self.now))

    def _handle(self, name: str, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Reply):
                self._reply(name, action)
            else:
                self.metrics.peer_messages[type(action.message).__name__] += 1
                self.net.send(name, action.to, self._on_peer, action.to, action.message)
        balancer = self.nodes.get(name)
        deadline = balancer.next_deadline() if balancer is not None else None
        if deadline is not None and self._tick_at.get(name) != deadline:
            self._tick_at[name] = deadline
            self.loop.at(deadline, self._on_tick, name, deadline)

    def _reply(self, name: str, reply: Reply) -> None:
        message = reply.message
        if self.config.track_requests:
            self.metrics.replies.setdefault(message.request_id, []).append(
                "busy" if isinstance(message, SessionBusy) else name)
        if isinstance(message, SessionAccept):
            self.metrics.accepts += 1
            self._check_accept(name, reply, message)
        else:
            self.metrics.busy += 1
        client = self.clients[int(reply.client_id.rsplit("-", 1)[1])]
        self.net.send(name, client.client_id, client.on_reply, message)

    # -- ground truth -------------------------------------------------------------

    def _check_accept(self, name: str, reply: Reply, accept: SessionAccept) -> None:
        key = affinity_key(self.config.balancer.affinity, reply.client_id, reply.client_addr)
        holdings = self._truth.setdefault(key, {})
        linger_s = self.config.balancer.linger_s
        for other, holding in holdings.items():
            if other == name or other in self.net.dead or other not in self.view.members:
                continue
            if holding.live > 0:
                self.metrics.duplicates += 1
            elif holding.closed_at + linger_s > self.now:
                self.metrics.violations += 1
        holdings.setdefault(name, _Holding()).live += 1
        self._session_keys[accept.session_id] = (name, key)

    def _lose_sessions(self, name: str) -> None:
        for holdings in self._truth.values():
            holdings.pop(name, None)
        for client in self.clients:
            if client.session_node == name:
                self.loop.after(self.delay(self.config.reconnect_s), client.lost, name)

    def delay(self, bounds: tuple[float, float]) -> float:
        """A random delay within `bounds` (seconds)."""
        low, high = bounds
        return low + self.rng.random() * (high - low)

    def unanswered(self) -> list[str]:
        """Requests (sent at least `answer_timeout_s` ago) that got no reply at all."""
        return [rid for rid, replies in self.metrics.replies.items() if not replies]

    def multi_accepted(self) -> list[str]:
        """Requests accepted by more than one node (must be none)."""
        return [rid for rid, replies in self.metrics.replies.items()
                if len(set(replies) - {"busy"}) > 1]


# -- scenarios --------------------------------------------------------------------

def rolling_add(sim: Simulation, count: int, interval_s: float) -> None:
    """Add `count` nodes, one every `interval_s`."""
    for _ in range(count):
        sim.add_node()
        sim.run_for(interval_s)


def rolling_remove(sim: Simulation, count: int, interval_s: float) -> None:
    """Remove `count` nodes (highest names first), one every `interval_s`."""
    for _ in range(count):
        sim.remove_node(sim.view.members[-1])
        sim.run_for(interval_s)


def rolling_restart(sim: Simulation, down_s: float, interval_s: float) -> None:
    """Restart every member in turn: leave, `down_s` later rejoin with no state."""
    for name in list(sim.view.members):
        sim.remove_node(name)
        sim.run_for(down_s)
        sim.set_members([*sim.view.members, name])
        sim.run_for(interval_s)


def node_dies(sim: Simulation, name: str, after_s: float) -> None:
    """`name` dies holding sessions; `after_s` later it restarts and rejoins."""
    sim.kill_node(name)
    sim.run_for(after_s)
    sim.set_members([*sim.view.members, name])


def slow_node(sim: Simulation, name: str, extra_s: float, duration_s: float) -> None:
    """`name` stays a member but processes its input `extra_s` late for `duration_s`."""
    sim.make_slow(name, extra_s)
    sim.run_for(duration_s)
    sim.make_slow(name, 0.0)
