"""Whole-cluster scenarios in the simulation harness (virtual time, seeded)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lb.balancer import BalancerConfig
from lb.hashing import AffinityMode
from lb.sim import (
    SimConfig,
    Simulation,
    node_dies,
    rolling_add,
    rolling_remove,
    rolling_restart,
    slow_node,
)


def started(config: SimConfig | None = None) -> Simulation:
    sim = Simulation(config or SimConfig())
    sim.start_clients()
    sim.run_for(15.0)
    return sim


def check(sim: Simulation) -> None:
    """The properties every scenario keeps."""
    metrics = sim.metrics
    assert metrics.duplicates == 0
    assert metrics.violations == 0
    assert sim.multi_accepted() == []
    straddling = {rid for rid, epochs in metrics.request_epochs.items() if len(epochs) > 1}
    # A request nobody answered was in flight across a view change or met a dead or
    # slow node (the client retried); a busy plus a late accept needs a slow node.
    assert set(sim.unanswered()) <= straddling | metrics.troubled
    doubled = {rid for rid, replies in metrics.replies.items() if len(replies) > 1}
    assert doubled <= metrics.troubled
    assert metrics.accepts > metrics.requests // 2


def settles(sim: Simulation) -> None:
    """With the clients gone, every bucket settles and the balancers fall silent."""
    sim.stop_clients()
    sim.run_for(60.0)
    assert sim.is_steady()
    before = sim.metrics.peer_message_count()
    sim.run_for(30.0)
    assert sim.metrics.peer_message_count() == before


def test_steady_state_sends_no_balancer_messages_and_answers_once() -> None:
    sim = started()
    sim.run_for(1.0)  # let the first view's reports land
    assert sim.is_steady()
    before = sim.metrics.peer_message_count()
    requests = sim.metrics.requests
    sim.run_for(60.0)
    assert sim.metrics.requests > requests + 100
    assert sim.metrics.peer_message_count() == before
    assert sim.unanswered() == []
    assert all(len(replies) == 1 for replies in sim.metrics.replies.values())
    assert sim.metrics.busy == 0
    check(sim)


Scenario = Callable[[Simulation], None]
SCENARIOS: dict[str, Scenario] = {
    "rolling-add": lambda sim: rolling_add(sim, 3, 2.0),
    "rolling-remove": lambda sim: rolling_remove(sim, 2, 2.0),
    "rolling-restart": lambda sim: rolling_restart(sim, 1.0, 2.0),
    "node-dies": lambda sim: node_dies(sim, "node-01", 5.0),
    "slow-node": lambda sim: slow_node(sim, "node-02", 2.0, 15.0),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_keeps_the_properties(name: str) -> None:
    sim = started()
    SCENARIOS[name](sim)
    sim.run_for(10.0)
    check(sim)
    settles(sim)


def test_all_scenarios_in_a_row_with_quick_changes() -> None:
    sim = started(SimConfig(nodes=5, clients=80, seed=7))
    rolling_add(sim, 2, 0.3)  # faster than anything settles: buckets move twice
    rolling_restart(sim, 0.2, 0.3)
    node_dies(sim, "node-03", 3.0)
    slow_node(sim, "node-00", 1.5, 5.0)
    rolling_remove(sim, 3, 0.5)
    sim.run_for(10.0)
    check(sim)
    settles(sim)


def test_dead_node_sessions_are_lost_and_keys_move() -> None:
    sim = started()
    on_dead = [c for c in sim.clients if c.session_node == "node-01"]
    assert on_dead
    node_dies(sim, "node-01", 5.0)
    assert all(c.session_node != "node-01" for c in on_dead)
    check(sim)


def test_slow_node_causes_busy_not_duplicates() -> None:
    sim = started()
    rolling_add(sim, 1, 0.5)  # moved buckets: their holders must be asked
    slow_node(sim, "node-00", 2.0, 20.0)
    sim.run_for(5.0)
    assert sim.metrics.busy > 0
    check(sim)


@pytest.mark.parametrize("mode", [AffinityMode.ADDRESS, AffinityMode.NETWORK])
def test_address_and_network_affinity(mode: AffinityMode) -> None:
    balancer = BalancerConfig(table_size=4099, linger_s=20.0, affinity=mode)
    sim = started(SimConfig(balancer=balancer, clients_per_network=4, seed=3))
    rolling_add(sim, 1, 2.0)
    rolling_restart(sim, 1.0, 1.0)
    sim.run_for(10.0)
    check(sim)
    settles(sim)


def test_same_seed_same_run() -> None:
    runs = []
    for _ in range(2):
        sim = started(SimConfig(seed=11))
        rolling_add(sim, 1, 1.0)
        runs.append((sim.metrics.requests, sim.metrics.accepts,
                     dict(sim.metrics.peer_messages)))
    assert runs[0] == runs[1]
