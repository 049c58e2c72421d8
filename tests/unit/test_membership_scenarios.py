"""Whole-cluster scenarios on the simulated network, in virtual time."""

from __future__ import annotations

from clusterfs.membership.config import MembershipConfig
from clusterfs.membership.events import MemberFailed
from clusterfs.membership.messages import Ballot, Heartbeat, Install, Leave, Prepare
from clusterfs.membership.sim import SimConfig, Simulation
from clusterfs.membership.view import View

TIMEOUTS = MembershipConfig()
REMOVAL_BOUND_S = TIMEOUTS.suspect_timeout_s + 2 * TIMEOUTS.propose_timeout_s


def healthy(sim: Simulation) -> None:
    assert sim.violations == []
    assert sim.split_brain() == []


def agreed(sim: Simulation) -> View:
    """The one view every live online node holds."""
    views = set(sim.views().values())
    assert len(views) == 1, views
    view = views.pop()
    assert view is not None
    return view


def first_install(sim: Simulation, epoch: int) -> float:
    return min(t for t, _, v in sim.installs if v.epoch == epoch)


def test_steady_cluster_keeps_its_view() -> None:
    sim = Simulation(["a", "b", "c"])
    sim.run_for(60.0)
    assert agreed(sim) == View(1, ("a", "b", "c"), "a")
    assert sim.offline_events == []
    healthy(sim)


def test_crashed_member_is_removed_within_the_timeout() -> None:
    sim = Simulation(["a", "b", "c"])
    sim.run_for(1.0)
    sim.crash("c")
    sim.run_for(10.0)
    assert agreed(sim) == View(2, ("a", "b"), "a")
    assert first_install(sim, 2) - 1.0 < REMOVAL_BOUND_S
    healthy(sim)


def test_leader_crash_elects_the_lowest_remaining_name() -> None:
    sim = Simulation(["a", "b", "c"])
    sim.run_for(1.0)
    sim.crash("a")
    sim.run_for(10.0)
    assert agreed(sim) == View(2, ("b", "c"), "b")
    healthy(sim)


def test_partition_two_one_majority_goes_on_minority_goes_offline() -> None:
    sim = Simulation(["a", "b", "c"])
    sim.run_for(1.0)
    sim.partition({"a", "b"}, {"c"})
    sim.run_for(10.0)
    assert sim.online() == ["a", "b"]
    assert agreed(sim) == View(2, ("a", "b"), "a")
    (when_s, node, reason), *_ = sim.offline_events
    assert node == "c" and "lost the majority" in reason
    assert when_s < first_install(sim, 2)  # offline before the others move on
    healthy(sim)


def test_offline_minority_stops_acting() -> None:
    sim = Simulation(["a", "b", "c"])
    sim.run_for(1.0)
    sim.partition({"a", "b"}, {"c"})
    sim.run_for(10.0)
    node_c = sim.nodes["c"]
    for event in [Heartbeat(1, "a"), Prepare(1, "b", Ballot(9, "b"))]:
        assert node_c.handle(event, sim.now_s) == []
    assert node_c.view == View(1, ("a", "b", "c"), "a")  # never installed anything later
    healthy(sim)


def test_minority_leader_is_deposed() -> None:
    sim = Simulation(["a", "b", "c"])
    sim.run_for(1.0)
    sim.partition({"a"}, {"b", "c"})
    sim.run_for(10.0)
    assert sim.online() == ["b", "c"]
    assert agreed(sim) == View(2, ("b", "c"), "b")
    healthy(sim)


def test_five_nodes_split_three_two() -> None:
    sim = Simulation(["a", "b", "c", "d", "e"])
    sim.run_for(1.0)
    sim.partition({"a", "d", "e"}, {"b", "c"})
    sim.run_for(10.0)
    assert sim.online() == ["a", "d", "e"]
    view = agreed(sim)  # b and c may be removed together or one after the other
    assert view.members == ("a", "d", "e") and view.leader == "a"
    assert {n for _, n, _ in sim.offline_events} == {"b", "c"}
    healthy(sim)


def test_heal_then_rejoin() -> None:
    sim = Simulation(["a", "b", "c", "d", "e"])
    sim.run_for(1.0)
    sim.partition({"a", "b", "c"}, {"d", "e"})
    sim.run_for(10.0)
    sim.heal()
    sim.run_for(2.0)
    assert sim.online() == ["a", "b", "c"]  # healing alone brings nobody back
    sim.rejoin("d")
    sim.rejoin("e")
    sim.run_for(5.0)
    assert sim.online() == ["a", "b", "c", "d", "e"]
    assert agreed(sim).members == ("a", "b", "c", "d", "e")
    healthy(sim)


def test_two_nodes_partitioned_exactly_one_side_continues_via_the_witness() -> None:
    for seed in range(10):
        sim = Simulation(["a", "b"], SimConfig(seed=seed))
        sim.run_for(1.0)
        sim.partition({"a"}, {"b"})
        sim.run_for(10.0)
        assert len(sim.online()) == 1
        survivor = sim.online()[0]
        assert sim.witness == (1, survivor)
        assert agreed(sim) == View(2, (survivor,), survivor)
        (_, loser, reason), = sim.offline_events
        assert loser != survivor and "witness" in reason
        healthy(sim)


def test_two_nodes_one_crashes_the_other_continues() -> None:
    sim = Simulation(["a", "b"])
    sim.run_for(1.0)
    sim.crash("a")
    sim.run_for(10.0)
    assert sim.online() == ["b"]
    assert agreed(sim) == View(2, ("b",), "b")
    healthy(sim)


def test_two_nodes_heal_and_rejoin_then_split_again() -> None:
    sim = Simulation(["a", "b"])
    sim.run_for(1.0)
    sim.partition({"a"}, {"b"})
    sim.run_for(10.0)
    sim.heal()
    loser = ({"a", "b"} - set(sim.online())).pop()
    sim.rejoin(loser)
    sim.run_for(5.0)
    assert agreed(sim) == View(3, ("a", "b"), sim.online()[0] if loser == "b" else "b")
    sim.partition({"a"}, {"b"})
    sim.run_for(10.0)
    assert len(sim.online()) == 1
    assert sim.witness is not None and sim.witness[0] == 3
    healthy(sim)


def test_joins_grow_a_founded_cluster_one_view_at_a_time() -> None:
    sim = Simulation(["a"])
    for name in ["b", "c", "d"]:
        sim.add_node(name, None)
        sim.rejoin(name, ["a"])
    sim.run_for(5.0)
    view = agreed(sim)
    assert view.members == ("a", "b", "c", "d") and view.leader == "a"
    assert sorted(v.epoch for _, n, v in sim.installs if n == "a") == list(range(2, view.epoch + 1))
    healthy(sim)


def test_join_through_a_non_leader_is_forwarded() -> None:
    sim = Simulation(["a", "b", "c"])
    sim.add_node("d", None)
    sim.rejoin("d", ["c"])
    sim.run_for(5.0)
    assert agreed(sim).members == ("a", "b", "c", "d")
    healthy(sim)


def test_graceful_leave() -> None:
    sim = Simulation(["a", "b", "c"])
    sim.run_for(1.0)
    sim.deliver("b", Leave("b"))
    sim.run_for(3.0)
    assert agreed(sim) == View(2, ("a", "c"), "a")
    assert [(n, r) for _, n, r in sim.offline_events] == [("b", "left the cluster in epoch 2")]
    healthy(sim)


def test_leader_leaves_and_hands_over() -> None:
    sim = Simulation(["a", "b", "c"])
    sim.run_for(1.0)
    sim.deliver("a", Leave("a"))
    sim.run_for(3.0)
    assert agreed(sim) == View(2, ("b", "c"), "b")
    healthy(sim)


def test_stale_epoch_messages_are_ignored_and_answered_with_the_view() -> None:
    sim = Simulation(["a", "b", "c"])
    sim.run_for(1.0)
    sim.crash("c")
    sim.run_for(10.0)
    current = agreed(sim)
    node_a = sim.nodes["a"]
    before = node_a.acceptor.state()
    actions = node_a.handle(Prepare(1, "c", Ballot(99, "c")), sim.now_s)
    assert [a.message for a in actions if hasattr(a, "message")] == [
        Install(current.epoch, "a", current)
    ]
    assert node_a.acceptor.state() == before and node_a.view == current
    healthy(sim)


def test_lossy_network_still_converges() -> None:
    sim = Simulation(["a", "b", "c", "d", "e"], SimConfig(seed=3, drop_rate=0.05))
    sim.run_for(2.0)
    sim.crash("b")
    sim.run_for(15.0)
    assert agreed(sim).members == ("a", "c", "d", "e")
    healthy(sim)


def test_commit_layer_failure_report_removes_a_member() -> None:
    sim = Simulation(["a", "b", "c"])
    sim.run_for(1.0)
    sim.deliver("a", MemberFailed("c", "missed the prepare deadline"))
    sim.run_for(2.0)
    assert agreed(sim) == View(2, ("a", "b"), "a")
    removed = [(n, r) for _, n, r in sim.offline_events]
    assert removed == [("c", "removed from the cluster in epoch 2")]
    healthy(sim)


def test_quick_restart_keeps_the_member() -> None:
    sim = Simulation(["a", "b", "c"])
    sim.run_for(1.0)
    sim.crash("b")
    sim.run_for(1.0)
    sim.restart("b")
    sim.run_for(10.0)
    assert sim.online() == ["a", "b", "c"]
    assert agreed(sim) == View(1, ("a", "b", "c"), "a")
    healthy(sim)


def test_restart_after_removal_learns_it_and_can_rejoin() -> None:
    sim = Simulation(["a", "b", "c"])
    sim.run_for(1.0)
    sim.crash("c")
    sim.run_for(10.0)
    sim.restart("c")
    sim.run_for(2.0)
    assert sim.online() == ["a", "b"]
    assert sim.offline_events[-1][1:] == ("c", "removed from the cluster in epoch 2")
    sim.rejoin("c")
    sim.run_for(5.0)
    assert agreed(sim) == View(3, ("a", "b", "c"), "a")
    healthy(sim)


def test_restart_of_an_offline_node_stays_offline() -> None:
    sim = Simulation(["a", "b", "c"])
    sim.run_for(1.0)
    sim.partition({"a", "b"}, {"c"})
    sim.run_for(2.8)  # c is offline, the others have not removed it yet
    assert sim.online() == ["a", "b"]
    sim.crash("c")
    sim.heal()
    sim.restart("c")
    sim.run_for(10.0)
    assert sim.online() == ["a", "b"]
    assert agreed(sim) == View(2, ("a", "b"), "a")
    healthy(sim)


def test_leadership_follows_the_rule_through_a_leave_and_a_crash() -> None:
    sim = Simulation(["a", "b", "c", "d"])
    sim.run_for(1.0)
    sim.deliver("a", Leave("a"))
    sim.run_for(2.0)
    assert agreed(sim) == View(2, ("b", "c", "d"), "b")
    sim.add_node("a", None)
    sim.rejoin("a", ["c"])
    sim.run_for(3.0)
    assert agreed(sim) == View(3, ("a", "b", "c", "d"), "b")  # the leader stays
    sim.crash("b")
    sim.run_for(10.0)
    assert agreed(sim) == View(4, ("a", "c", "d"), "a")  # then the lowest name
    healthy(sim)


def test_same_seed_same_history() -> None:
    def history(seed: int) -> list[tuple[float, str, View]]:
        sim = Simulation(["a", "b", "c", "d", "e"], SimConfig(seed=seed, drop_rate=0.05))
        sim.run_for(1.0)
        sim.partition({"a", "b"}, {"c", "d", "e"})
        sim.run_for(10.0)
        return sim.installs

    assert history(7) == history(7)
