"""A cluster of sans-IO commit members over a lossy simulated network (Hypothesis).

Each simulated node has a `Member`, a tiny dict replica (a flat directory of names), an
applied log and a prepared store. The network delays, reorders, drops and duplicates
messages; the driver's durable writes and validations answer after a delay. Rules capture
creates and unlinks of a few names on random nodes (so creates race), let virtual time pass,
crash nodes, depose the leader behind its back (it keeps its old view: fencing) and move
leadership. The harness plays the membership layer: it installs views (delivered to each
node after its own delay) and honours `RemoveMember`.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import random
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from clusterfs import records
from clusterfs.records import AnyRecord
from clusterfs.txn import messages
from clusterfs.txn.actions import (
    Action,
    ApplyBatch,
    Discard,
    LogDurably,
    NeedSnapshot,
    RemoveMember,
    Reply,
    Send,
    Validate,
)
from clusterfs.txn.coordinator import CoordinatorConfig
from clusterfs.txn.member import Member
from clusterfs.txn.messages import Batch
from clusterfs.txn.participant import Participant, ParticipantConfig
from clusterfs.txn.view import View

NAMES = (b"a", b"b", b"c")
# A short log, so that restarted and lagging members also catch up by snapshot.
PARTICIPANT_CONFIG = ParticipantConfig(log_keep_batches=2, snapshot_gap_records=6)
Key = tuple[str, int]  # (origin node, request id)


class DictReplica:
    """The model file system: one directory of names."""

    def __init__(self) -> None:
        self.names: set[bytes] = set()

    @staticmethod
    def check(names: set[bytes], record: AnyRecord) -> int:
        """The errno the record gets on a replica holding `names`."""
        if isinstance(record, records.MakeNode):
            return errno.EEXIST if record.name in names else 0
        if isinstance(record, records.Unlink):
            return 0 if record.name in names else errno.ENOENT
        raise AssertionError(f"unexpected record {record!r}")

    @staticmethod
    def change(names: set[bytes], record: AnyRecord) -> None:
        if isinstance(record, records.MakeNode):
            names.add(record.name)
        elif isinstance(record, records.Unlink):
            names.discard(record.name)

    def validate(self, batch: tuple[AnyRecord, ...]) -> list[int]:
        trial = set(self.names)
        errnos = []
        for record in batch:
            code = self.check(trial, record)
            if not code:
                self.change(trial, record)
            errnos.append(code)
        return errnos

    def apply(self, record: AnyRecord) -> None:
        assert self.check(self.names, record) == 0, f"committed {record!r} fails to apply"
        self.change(self.names, record)


@dataclass
class SimNode:
    name: str
    member: Member
    replica: DictReplica = field(default_factory=DictReplica)
    applied: list[tuple[int, Key, AnyRecord]] = field(default_factory=list)
    prepared: dict[int, Batch] = field(default_factory=dict)
    batches: list[Batch] = field(default_factory=list)  # applied, for its restored log
    crashed: bool = False
    fail_next_log: bool = False


def record_for(name: bytes, create: bool, now_ns: int) -> AnyRecord:
    if create:
        return records.MakeNode(1, name, 0o100644, 0, 0, 0, now_ns)
    return records.Unlink(1, name, now_ns)


class Cluster:
    """The simulated network, drivers and membership oracle, in virtual time."""

    def __init__(self, size: int, rng: random.Random, drop_rate: float,
                 dup_rate: float) -> None:
        self.rng = rng
        self.drop_rate = drop_rate
        self.dup_rate = dup_rate
        self.now_s = 0.0
        self._events: list[tuple[float, int, object]] = []
        self._counter = itertools.count()
        self.config = CoordinatorConfig(resend_interval_s=0.1, prepare_timeout_s=1.0,
                                        ack_timeout_s=1.0, survey_timeout_s=1.0)
        self.nodes = {f"n{i}": SimNode(f"n{i}", Member(
            Participant(f"n{i}", config=PARTICIPANT_CONFIG), self.config)) for i in range(size)}
        self.view = View(1, tuple(self.nodes), "n0")
        self.captured: dict[Key, AnyRecord] = {}
        self.answers: dict[Key, int] = {}
        self.abandoned: set[Key] = set()  # requests of a node that crashed before answering
        self.seen: set[str] = set()  # message kinds sent, for statistics
        self.stalled = False
        self.isolated: dict[str, float] = {}  # node -> until when its messages are lost
        self.deaf: dict[str, float] = {}  # node -> until when decisions to it are lost
        for node in self.nodes.values():
            self._perform(node, node.member.on_view(self.view, self.now_s))

    # -- membership oracle ------------------------------------------------------------------

    def install(self, members: tuple[str, ...], leader: str, told: tuple[str, ...]) -> None:
        self.view = View(self.view.epoch + 1, members, leader)
        for name in told:
            self._schedule(self.rng.uniform(0.0, 0.05), ("view", name, self.view))

    def remove(self, node: str, tell: bool = True) -> bool:
        live = [m for m in self.view.members if not self.nodes[m].crashed]
        if node not in self.view.members:
            return False
        if live == [node]:
            self.stalled = True  # no member left to commit: the cluster stops
            return False
        members = tuple(m for m in self.view.members if m != node)
        leader = self.view.leader if self.view.leader != node else live_first(self, members)
        told = tuple(m for m in self.view.members if tell or m != node)
        self.install(members, leader, told)
        return True

    # -- drivers ----------------------------------------------------------------------------

    def _schedule(self, delay_s: float, event: object) -> None:
        heapq.heappush(self._events, (self.now_s + delay_s, next(self._counter), event))

    def _delay_s(self) -> float:
        return self.rng.choice((0.001, 0.005, 0.02, 0.08, 0.3))

    def send(self, sender: str, to: str, message: messages.AnyMessage) -> None:
        self.seen.add(type(message).__name__)
        if isinstance(message, messages.Prepare) and any(
                held.epoch != message.epoch for n in self.nodes.values()
                if (held := n.prepared.get(message.batch.first_seq)) is not None):
            self.seen.add("redrive")
        if isinstance(message, messages.Decide) and not message.commit:
            self.seen.add("Decide-abort")
        frame = messages.encode(message)
        if sender == to:  # delivered locally, never lost
            self._schedule(0.0005, ("msg", to, sender, frame))
            return
        if self.isolated.get(sender, 0.0) > self.now_s or self.isolated.get(to, 0.0) > self.now_s:
            return
        if isinstance(message, messages.Decide) and self.deaf.get(to, 0.0) > self.now_s:
            return
        if self.rng.random() < self.drop_rate:
            return
        copies = 2 if self.rng.random() < self.dup_rate else 1
        for _ in range(copies):
            self._schedule(self._delay_s(), ("msg", to, sender, frame))

    def capture(self, node_name: str, record: AnyRecord) -> None:
        node = self.nodes[node_name]
        request_id, actions = node.member.capture(record, self.now_s)
        self.captured[(node_name, request_id)] = record
        self._perform(node, actions)

    def _perform(self, node: SimNode, actions: list[Action]) -> None:
        for action in actions:
            if node.crashed:
                return
            self._perform_one(node, action)

    def _perform_one(self, node: SimNode, action: Action) -> None:
        if isinstance(action, Send):
            self.send(node.name, action.to, action.message)
        elif isinstance(action, LogDurably):
            batch = action.batch
            node.prepared = {s: b for s, b in node.prepared.items() if s < batch.first_seq}
            node.prepared[batch.first_seq] = batch
            ok = not node.fail_next_log
            node.fail_next_log = False
            event = ("logged", node.name, batch.epoch, batch.first_seq, ok)
            self._schedule(self._delay_s(), event)
        elif isinstance(action, Discard):
            node.prepared.pop(action.first_seq, None)
        elif isinstance(action, ApplyBatch):
            self._apply(node, action.batch)
        elif isinstance(action, Validate):
            errnos = node.replica.validate(action.records)
            answer = ("validated", node.name, action.epoch, action.first_seq, errnos)
            self._schedule(self._delay_s(), answer)
        elif isinstance(action, Reply):
            self._reply(node, action)
        elif isinstance(action, RemoveMember) and node.member.view == self.view:
            self.remove(action.node)  # only the current leader is heard
        elif isinstance(action, NeedSnapshot):
            self.seen.add("snapshot")
            self._schedule(self._delay_s(), ("snapshot", node.name, action.source))

    def _apply(self, node: SimNode, batch: Batch) -> None:
        expected = node.applied[-1][0] + 1 if node.applied else 1
        assert batch.first_seq == expected, f"{node.name} applies {batch.first_seq} at {expected}"
        for offset, entry in enumerate(batch.entries):
            node.replica.apply(entry.record)
            key = (entry.origin, entry.request_id)
            node.applied.append((batch.first_seq + offset, key, entry.record))
        node.prepared = {s: b for s, b in node.prepared.items() if s > batch.last_seq}
        node.batches.append(batch)

    def _install_snapshot(self, node: SimNode, source_name: str) -> list[Action]:
        """The driver's part: copy the source's replica as it is now (if it is up)."""
        source = self.nodes[source_name]
        participant = node.member.participant
        if source.crashed:
            return participant.snapshot_failed(self.now_s)
        copy_replica(source, node)
        kept = tuple(node.batches[-PARTICIPANT_CONFIG.log_keep_batches:])
        return participant.installed_snapshot(len(node.applied), kept, self.now_s)

    def restart(self, name: str, quick: bool = False) -> None:
        """A crashed node starts again from what it made durable. Still a member, it is
        back at once: in a new epoch, or (`quick`: restarted before the failure detector
        noticed) in the same epoch, told only its view; removed meanwhile, it re-joins, and
        the membership layer
        admits a joiner only once it has caught up with a member (`AdmitMember`): here, a
        copy of the most advanced live member's replica, made before the view includes it."""
        node = self.nodes[name]
        if name not in self.view.members:
            live = [self.nodes[m] for m in self.view.members if not self.nodes[m].crashed]
            if live:
                copy_replica(max(live, key=lambda n: len(n.applied)), node)
        applied_seq = len(node.applied)
        prepared = tuple(b for s, b in sorted(node.prepared.items()) if s > applied_seq)
        kept = tuple(node.batches[-PARTICIPANT_CONFIG.log_keep_batches:])
        first_id = 1 + max((rid for origin, rid in self.captured if origin == name), default=0)
        self.abandoned |= {key for key in self.captured
                           if key[0] == name and key not in self.answers}
        node.member = Member(Participant(name, applied_seq, prepared, kept, PARTICIPANT_CONFIG,
                                         first_request_id=first_id), self.config)
        node.crashed = False
        self.seen.add("restart")
        if quick and name in self.view.members and not self.nodes[self.view.leader].crashed:
            self.seen.add("quick restart")
            self._schedule(0.0, ("view", name, self.view))
            return
        members = self.view.members + (() if name in self.view.members else (name,))
        leader = self.view.leader if not self.nodes[self.view.leader].crashed else name
        self.install(members, leader, members)

    def _reply(self, node: SimNode, reply: Reply) -> None:
        key = (node.name, reply.request_id)
        assert key not in self.answers, f"{key} answered twice"
        self.answers[key] = reply.errno
        view = node.member.view
        if reply.errno == 0 and view is not None:  # success: applied on every member of
            for name in view.members:  # the view it was decided in (the replier's)
                assert key in {k for _, k, _ in self.nodes[name].applied}, \
                    f"{key} answered before {name} applied it"

    def _deliver(self, event: object) -> None:
        assert isinstance(event, tuple)
        kind, name = event[0], event[1]
        node = self.nodes[name]
        if node.crashed:
            return
        member, now_s = node.member, self.now_s
        if kind == "msg":
            actions = member.on_message(event[2], messages.decode(event[3]), now_s)
        elif kind == "logged":
            actions = member.logged(event[2], event[3], event[4], now_s, "disk full")
        elif kind == "validated":
            actions = member.validated(event[2], event[3], event[4], now_s)
        elif kind == "snapshot":
            actions = self._install_snapshot(node, event[2])
        else:
            actions = member.on_view(event[2], now_s)
        self._perform(node, actions)

    def run_for(self, duration_s: float) -> None:
        end_s = self.now_s + duration_s
        for _ in range(100_000):
            due = [(n.member.next_deadline_s(), n.name) for n in self.nodes.values()
                   if not n.crashed]
            ticks = [(t, name) for t, name in due if t is not None]
            tick = min(ticks, default=(float("inf"), ""))
            event_s = self._events[0][0] if self._events else float("inf")
            if min(tick[0], event_s) > end_s:
                break
            if event_s <= tick[0]:
                self.now_s, _, event = heapq.heappop(self._events)
                self._deliver(event)
            else:
                self.now_s = max(self.now_s, tick[0])
                node = self.nodes[tick[1]]
                self._perform(node, node.member.tick(self.now_s))
        else:
            raise AssertionError("simulation does not settle")
        self.now_s = end_s


def copy_replica(source: SimNode, node: SimNode) -> None:
    """What a snapshot does: `node` takes the source's applied state if it is further on."""
    if len(source.applied) > len(node.applied):
        node.applied = list(source.applied)
        node.replica = DictReplica()
        for _, _, record in node.applied:
            node.replica.apply(record)
        node.batches = list(source.batches)
        node.prepared = {s: b for s, b in node.prepared.items() if s > len(node.applied)}


def live_first(cluster: Cluster, members: tuple[str, ...]) -> str:
    return next(m for m in members if not cluster.nodes[m].crashed)


class CommitModel(RuleBasedStateMachine):
    """Random captures, time, faults and leader changes; checks docs/commit-protocol.md."""

    cluster: Cluster

    @initialize(size=st.integers(3, 5), seed=st.integers(0, 2**32 - 1),
                drop_rate=st.sampled_from([0.0, 0.05, 0.2]),
                dup_rate=st.sampled_from([0.0, 0.1]))
    def start(self, size: int, seed: int, drop_rate: float, dup_rate: float) -> None:
        self.cluster = Cluster(size, random.Random(seed), drop_rate, dup_rate)

    @rule(node=st.integers(0, 4), name=st.sampled_from(NAMES), create=st.booleans())
    def capture(self, node: int, name: bytes, create: bool) -> None:
        live = [n for n in self.cluster.nodes.values() if not n.crashed]
        if not live:
            return
        target = live[node % len(live)]
        self.cluster.capture(target.name, record_for(name, create, int(self.cluster.now_s * 1e9)))

    @rule(name=st.sampled_from(NAMES), a=st.integers(0, 4), b=st.integers(0, 4))
    def race_create(self, name: bytes, a: int, b: int) -> None:
        live = [n.name for n in self.cluster.nodes.values() if not n.crashed]
        for index in (a, b) if live else ():
            self.cluster.capture(live[index % len(live)], record_for(name, True, 0))

    @rule(duration_s=st.sampled_from([0.001, 0.01, 0.05, 0.2, 1.0, 3.0]))
    def run(self, duration_s: float) -> None:
        self.cluster.run_for(duration_s)

    def _live_members(self) -> list[str]:
        view = self.cluster.view
        return [m for m in view.members if not self.cluster.nodes[m].crashed
                and not self.cluster.nodes[m].fail_next_log]

    @precondition(lambda self: len(self._live_members()) >= 3)
    @rule(index=st.integers(0, 4), leader=st.booleans())
    def crash(self, index: int, leader: bool) -> None:
        """A node dies; when it led, the membership layer notices at once."""
        live = self._live_members()
        victim = self.cluster.view.leader if leader else live[index % len(live)]
        self.cluster.nodes[victim].crashed = True
        if victim == self.cluster.view.leader:
            self.cluster.remove(victim, tell=False)

    @precondition(lambda self: any(n.crashed for n in self.cluster.nodes.values()))
    @rule(index=st.integers(0, 4), quick=st.booleans())
    def restart(self, index: int, quick: bool) -> None:
        """A crashed node starts again from its durable state and re-joins."""
        crashed = [n.name for n in self.cluster.nodes.values() if n.crashed]
        self.cluster.restart(crashed[index % len(crashed)], quick)

    @precondition(lambda self: len(self._live_members()) >= 3)
    @rule()
    def depose_leader(self) -> None:
        """The leader is cut off and removed; it keeps its old view and goes on trying."""
        self.cluster.remove(self.cluster.view.leader, tell=False)

    @rule(index=st.integers(0, 4), duration_s=st.sampled_from([0.1, 0.5]))
    def isolate(self, index: int, duration_s: float) -> None:
        """Every message to or from one node is lost for a while (it falls behind)."""
        live = self._live_members()
        if not live:
            return
        self.cluster.isolated[live[index % len(live)]] = self.cluster.now_s + duration_s

    @rule(index=st.integers(0, 4), move_to=st.integers(0, 4))
    def lag_then_move_leader(self, index: int, move_to: int) -> None:
        """One member misses the decisions for a while and leadership moves meanwhile:
        the new leader finds it behind and has it catch up from the log."""
        live = self._live_members()
        if not live:
            return
        deaf = live[index % len(live)]
        self.cluster.deaf[deaf] = self.cluster.now_s + 0.6
        capturer = live[move_to % len(live)]
        self.cluster.capture(capturer, record_for(b"lag", True, 0))
        self.cluster.capture(capturer, records.Unlink(1, b"lag", 0))
        self.cluster.run_for(0.3)
        self.move_leader(move_to)

    @precondition(lambda self: len(self._live_members()) >= 3)
    @rule(index=st.integers(0, 4))
    def fail_log(self, index: int) -> None:
        """A node's next durable log fails: it votes no and is removed."""
        live = self._live_members()
        self.cluster.nodes[live[index % len(live)]].fail_next_log = True

    @rule(index=st.integers(0, 4))
    def move_leader(self, index: int) -> None:
        live = self._live_members()
        if not live:
            return
        view = self.cluster.view
        self.cluster.install(view.members, live[index % len(live)], view.members)

    @invariant()
    def replicas_agree(self) -> None:
        check_logs(self.cluster)

    def teardown(self) -> None:
        if not hasattr(self, "cluster"):
            return
        cluster = self.cluster
        cluster.drop_rate = cluster.dup_rate = 0.0
        cluster.run_for(30.0)
        check_logs(cluster)
        check_quiet(cluster)
        codes = set(cluster.answers.values())
        event(f"answers: {sorted(codes)}")
        event(f"epochs: {min(cluster.view.epoch, 4)}+")
        applied = max(len(n.applied) for n in cluster.nodes.values())
        event(f"records applied: {min(applied, 10) // 5 * 5}+")
        for kind in ("CatchUp", "LogEntries", "Refused", "redrive", "Decide-abort",
                     "snapshot", "restart", "quick restart"):
            event(f"{kind}: {kind in cluster.seen}")


def check_logs(cluster: Cluster) -> None:
    """Same records in the same order everywhere, none twice, no refused one anywhere."""
    logs = [node.applied for node in cluster.nodes.values()]
    longest = max(logs, key=len)
    refused = {key for key, code in cluster.answers.items() if code and code != errno.EIO}
    for log in logs:
        assert log == longest[:len(log)], "replicas diverge"
        keys = [key for _, key, _ in log]
        assert len(set(keys)) == len(keys), "a record applied twice"
        assert not refused & set(keys), "a refused record was applied"
        assert [seq for seq, _, _ in log] == list(range(1, len(log) + 1))


def check_quiet(cluster: Cluster) -> None:
    """Once quiet: members are identical, equal a replay of the log, and answered all."""
    members = [cluster.nodes[m] for m in cluster.view.members if not cluster.nodes[m].crashed]
    reference = members[0]
    model = DictReplica()
    for _, _, record in reference.applied:
        model.apply(record)
    for node in members:
        assert node.applied == reference.applied, f"{node.name} differs after quiet"
        assert node.replica.names == model.names
        assert cluster.stalled or not node.member.participant.pending_requests(), \
            describe(cluster)
        assert cluster.stalled or node.member.participant.serving, f"{node.name} not serving"
    applied = {key for _, key, _ in reference.applied}
    for key, code in cluster.answers.items():
        if code == 0:
            assert key in applied, f"{key} succeeded but is not applied"
    if cluster.stalled:
        return
    for key in cluster.captured:
        if key[0] in {m.name for m in members} and key not in cluster.abandoned:
            assert key in cluster.answers, f"{key} never answered"


CommitModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("TXN_EXAMPLES", "250")), stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.generate] if os.environ.get("TXN_NOSHRINK") else list(Phase))
TestCommitModel = CommitModel.TestCase


def describe(cluster: Cluster) -> str:
    """The state of every node, for failure messages."""
    lines = [f"view {cluster.view}"]
    for node in cluster.nodes.values():
        part = node.member.participant
        coord = node.member.coordinator
        lines.append(
            f"{node.name} crashed={node.crashed} view={part.view} applied={part.applied_seq}"
            f" ready={part._ready_epoch}/{part._ready_through_seq}"
            f" requests={part._requests} prepared={sorted(part.prepared)}"
            f" coordinator={coord and (coord.phase, coord._wait, coord._round, coord._queue)}")
    return "\n".join(lines)
