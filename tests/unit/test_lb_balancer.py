"""The balancer core, driven by hand: messages delivered synchronously, time given."""

from __future__ import annotations

from collections.abc import Iterable

from lb.balancer import Action, Balancer, BalancerConfig, Reply, Send
from lb.hashing import AffinityMode, affinity_key, key_bucket
from lb.messages import (
    AffinityAnswer,
    AffinityQuery,
    HolderReport,
    SessionAccept,
    SessionBusy,
    SessionClose,
    SessionRequest,
    Settle,
)
from lb.table import table_for
from lb.view import View

SIZE = 1021
CONFIG = BalancerConfig(table_size=SIZE, linger_s=10.0, query_timeout_s=0.5, pin_s=2.0)


class Cluster:
    """Balancers plus a mailbox; `flush` delivers peer messages until quiet."""

    def __init__(self, names: Iterable[str], config: BalancerConfig = CONFIG) -> None:
        self.config = config
        self.nodes = {name: Balancer(name, config) for name in names}
        self.epoch = 0
        self.mailbox: list[Send] = []
        self.sent: list[Send] = []
        self.replies: list[Reply] = []
        self.down: set[str] = set()
        self.install(sorted(self.nodes), 0.0)
        self.flush(0.0)
        self.sent.clear()

    def install(self, members: list[str], now: float) -> None:
        self.epoch += 1
        view = View.of(self.epoch, members)
        for name in members:
            self.nodes.setdefault(name, Balancer(name, self.config))
        for node in self.nodes.values():
            self.take(node.install_view(view, now))

    def take(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.mailbox.append(action)
                self.sent.append(action)
            else:
                self.replies.append(action)

    def flush(self, now: float) -> None:
        while self.mailbox:
            send = self.mailbox.pop(0)
            if send.to not in self.down:
                self.take(self.nodes[send.to].on_peer(send.message, now))

    def request(self, client: str, now: float, rid: str = "r") -> list[Reply]:
        start = len(self.replies)
        request = SessionRequest(rid, client, "10.0.0.1")
        for name, node in self.nodes.items():
            if name not in self.down:
                self.take(node.on_request(request, now))
        self.flush(now)
        return self.replies[start:]

    def tick(self, now: float) -> list[Reply]:
        start = len(self.replies)
        for name, node in self.nodes.items():
            if name not in self.down:
                self.take(node.tick(now))
        self.flush(now)
        return self.replies[start:]


def owner(members: Iterable[str], client: str) -> str:
    key = affinity_key(AffinityMode.CLIENT_ID, client, "")
    return table_for(tuple(sorted(members)), SIZE).owner_of_key(key)


def bucket(client: str) -> int:
    return key_bucket(affinity_key(AffinityMode.CLIENT_ID, client, ""), SIZE)


def moving_client(before: list[str], after: list[str], src: str, dst: str) -> str:
    """A client id whose owner is `src` in `before` and `dst` in `after`."""
    for i in range(100_000):
        client = f"c{i}"
        if owner(before, client) == src and owner(after, client) == dst:
            return client
    raise AssertionError("no such client")


def accepted_by(replies: list[Reply]) -> list[str]:
    return [r.message.node for r in replies if isinstance(r.message, SessionAccept)]


def test_steady_state_one_answer_and_no_messages() -> None:
    cluster = Cluster(["a", "b", "c"])
    for i in range(50):
        client = f"client-{i}"
        assert accepted_by(cluster.request(client, 1.0, f"r{i}")) == [owner("abc", client)]
    assert cluster.sent == []
    assert all(node.is_steady() for node in cluster.nodes.values())


def test_moved_key_with_affinity_stays_and_only_the_authority_is_asked() -> None:
    cluster = Cluster(["a", "b", "c"])
    client = moving_client(["a", "b", "c"], ["a", "b", "c", "d"], "a", "d")
    assert accepted_by(cluster.request(client, 1.0, "r1")) == ["a"]
    cluster.install(["a", "b", "c", "d"], 2.0)
    cluster.flush(2.0)
    cluster.sent.clear()
    assert accepted_by(cluster.request(client, 3.0, "r2")) == ["a"]
    queries = [(s.to, s.message.asker) for s in cluster.sent
               if isinstance(s.message, AffinityQuery)]
    assert queries == [("a", "d")]


def test_moved_key_without_affinity_goes_to_the_new_owner() -> None:
    cluster = Cluster(["a", "b", "c"])
    holder = moving_client(["a", "b", "c"], ["a", "b", "c", "d"], "a", "d")
    cluster.request(holder, 1.0, "r0")  # keeps the bucket held by "a"
    client = next(f"x{i}" for i in range(1_000_000) if bucket(f"x{i}") == bucket(holder))
    cluster.install(["a", "b", "c", "d"], 2.0)
    cluster.flush(2.0)
    cluster.sent.clear()
    assert accepted_by(cluster.request(client, 3.0, "r1")) == ["d"]
    assert [(s.to, type(s.message)) for s in cluster.sent] == [
        ("a", AffinityQuery), ("d", AffinityAnswer)]


def test_report_settles_buckets_nobody_holds() -> None:
    cluster = Cluster(["a", "b", "c"])
    client = moving_client(["a", "b", "c"], ["a", "b", "c", "d"], "a", "d")
    cluster.install(["a", "b", "c", "d"], 2.0)
    reports = [s for s in cluster.mailbox if isinstance(s.message, HolderReport)]
    assert len(reports) == 4 * 3
    cluster.flush(2.0)
    cluster.sent.clear()
    assert accepted_by(cluster.request(client, 3.0)) == ["d"]
    assert cluster.sent == []
    assert all(node.is_steady() for node in cluster.nodes.values())


def test_silent_authority_gives_busy_then_its_removal_frees_the_key() -> None:
    cluster = Cluster(["a", "b", "c"])
    client = moving_client(["a", "b", "c"], ["a", "b", "c", "d"], "a", "d")
    cluster.request(client, 1.0, "r1")
    cluster.install(["a", "b", "c", "d"], 2.0)
    cluster.flush(2.0)
    cluster.down.add("a")
    assert cluster.request(client, 3.0, "r2") == []
    assert cluster.nodes["d"].next_deadline() == 3.5
    replies = cluster.tick(3.5)
    assert [type(r.message) for r in replies] == [SessionBusy]
    assert replies[0].message.node == "d"
    cluster.install(["b", "c", "d"], 4.0)
    cluster.flush(4.0)
    assert accepted_by(cluster.request(client, 5.0, "r3")) == ["d"]


def test_removal_while_waiting_lets_the_owner_accept() -> None:
    cluster = Cluster(["a", "b", "c"])
    client = moving_client(["a", "b", "c"], ["a", "b", "c", "d"], "a", "d")
    cluster.request(client, 1.0, "r1")
    cluster.install(["a", "b", "c", "d"], 2.0)
    cluster.flush(2.0)
    cluster.down.add("a")
    cluster.request(client, 3.0, "r2")
    cluster.install(["b", "c", "d"], 3.1)
    assert accepted_by(cluster.replies[-1:]) == ["d"]


def test_linger_keeps_affinity_a_reconnect_revives_it_and_it_expires() -> None:
    cluster = Cluster(["a", "b", "c"])
    client = moving_client(["a", "b", "c"], ["a", "b", "c", "d"], "a", "d")
    (reply,) = cluster.request(client, 1.0, "r1")
    cluster.install(["a", "b", "c", "d"], 2.0)
    cluster.flush(2.0)
    assert isinstance(reply.message, SessionAccept)
    cluster.nodes["a"].on_close(SessionClose(reply.message.session_id), 3.0)
    (again,) = cluster.request(client, 12.0, "r2")  # within 10 s of the close: revived
    assert isinstance(again.message, SessionAccept) and again.message.node == "a"
    cluster.nodes["a"].on_close(SessionClose(again.message.session_id), 13.0)
    assert cluster.nodes["a"].next_deadline() == 23.0
    cluster.sent.clear()
    cluster.tick(23.0)
    settles = [s for s in cluster.sent if isinstance(s.message, Settle)]
    assert sorted(s.to for s in settles) == ["b", "c", "d"]
    assert all(node.is_steady() for node in cluster.nodes.values())
    cluster.sent.clear()
    assert accepted_by(cluster.request(client, 24.0, "r3")) == ["d"]
    assert cluster.sent == []


def test_mine_answer_pins_affinity_for_the_request_in_flight() -> None:
    cluster = Cluster(["a", "b", "c"])
    client = moving_client(["a", "b", "c"], ["a", "b", "c", "d"], "a", "d")
    (reply,) = cluster.request(client, 1.0, "r1")
    cluster.install(["a", "b", "c", "d"], 2.0)
    cluster.flush(2.0)
    cluster.nodes["a"].on_close(SessionClose(reply.message.session_id), 2.0)  # type: ignore[union-attr]
    request = SessionRequest("r2", client, "10.0.0.1")
    cluster.take(cluster.nodes["d"].on_request(request, 11.9))  # asks "a" just in time
    cluster.flush(11.9)
    assert cluster.replies[-1].message.request_id == "r1"  # d stayed silent
    cluster.take(cluster.nodes["a"].on_request(request, 12.5))  # arrives after the linger
    assert accepted_by(cluster.replies[-1:]) == ["a"]


def test_no_history_falls_back_to_asking_everybody() -> None:
    cluster = Cluster(["a", "b", "c"])
    fresh = Balancer("d", CONFIG)
    client = moving_client(["a", "b", "c"], ["a", "b", "c", "d"], "a", "d")
    cluster.nodes["d"] = fresh
    cluster.epoch = 5  # d joins at an epoch it has no history for
    cluster.install(["a", "b", "c", "d"], 2.0)
    cluster.mailbox.clear()  # the reports are lost
    cluster.sent.clear()
    cluster.request(client, 3.0)
    asked = sorted(s.to for s in cluster.sent if isinstance(s.message, AffinityQuery))
    assert asked == ["a", "b", "c"]
    assert accepted_by(cluster.replies[-1:]) == ["d"]


def test_reports_from_the_next_epoch_wait_for_the_view() -> None:
    node = Balancer("a", CONFIG)
    node.install_view(View.of(1, ["a", "b"]), 0.0)
    node.on_peer(HolderReport(1, "b", []), 0.0)
    assert node.is_steady()
    node.install_view(View.of(3, ["a", "b"]), 1.0)  # skipped epoch 2: no history
    assert not node.holders.is_settled()
    node.on_peer(HolderReport(4, "b", []), 1.0)
    node.on_peer(HolderReport(2, "b", []), 1.0)  # too old: ignored
    assert not node.holders.is_settled()
    node.install_view(View.of(4, ["a", "b"]), 2.0)
    assert node.is_steady()


def test_older_decision_yields_to_a_newer_owner() -> None:
    config = CONFIG
    node = Balancer("a", config)
    node.install_view(View.of(1, ["a", "b"]), 0.0)
    node.install_view(View.of(3, ["a", "b"]), 0.0)  # no history: asks "b" about everything
    client = next(f"c{i}" for i in range(1000) if owner("ab", f"c{i}") == "a")
    actions = node.on_request(SessionRequest("r1", client, "x"), 1.0)
    assert [type(a) for a in actions] == [Send]
    key = affinity_key(AffinityMode.CLIENT_ID, client, "")
    older = AffinityQuery(2, "b", 9, key, 0)
    assert node.on_peer(older, 1.1) == []  # deferred until "a" decides
    newer = AffinityQuery(4, "b", 10, key, 0)
    answers = node.on_peer(newer, 1.2)  # "a" gives up; both questions answered "not mine"
    assert [(a.message.query_id, a.message.mine) for a in answers
            if isinstance(a, Send) and isinstance(a.message, AffinityAnswer)
            ] == [(9, False), (10, False)]
    assert node.pending_count() == 0


def test_a_node_outside_the_view_is_silent() -> None:
    cluster = Cluster(["a", "b"])
    cluster.install(["b"], 1.0)
    assert not cluster.nodes["a"].active
    assert accepted_by(cluster.request("anyone", 2.0)) == ["b"]
    assert cluster.nodes["a"].on_peer(Settle(2, "b", [1]), 2.0) == []
    assert cluster.nodes["a"].tick(3.0) == []
    assert cluster.nodes["a"].install_view(View.of(1, ["a"]), 3.0) == []  # stale epoch


def test_network_affinity_keeps_a_slash_24_together() -> None:
    config = BalancerConfig(table_size=SIZE, affinity=AffinityMode.NETWORK)
    cluster = Cluster(["a", "b", "c"], config)
    winners = set()
    for host in range(1, 40):
        start = len(cluster.replies)
        request = SessionRequest(f"r{host}", f"client-{host}", f"192.0.2.{host}")
        for node in cluster.nodes.values():
            cluster.take(node.on_request(request, 1.0))
        replies = cluster.replies[start:]
        assert len(replies) == 1
        winners.update(accepted_by(replies))
    assert len(winners) == 1
    assert cluster.sent == []
