#!/usr/bin/env python3
"""Benchmark of the lb balancer: tables, disruption, affinity, speed.

For N = 3, 8, 16, 64 members and S = 10,000 and 100,000 sessions it measures

- table balance: max / mean buckets per member;
- session balance: (max / mean sessions per member) divided by the value
  expected from uniform random assignment of S sessions to N members (normal
  approximation of the expected maximum of N binomial counts);
- disruption: share of buckets and of sessions whose owner changes when one
  member is removed (every member in turn) or one is added (four new names),
  divided by the minimum 1/N (remove) or 1/(N+1) (add). Buckets: the worst
  case. Sessions: the mean, because with S = 10,000 and N = 64 a single
  removal moves only ~156 sessions and its worst case over 64 removals is
  sampling noise (about +-0.1), not a property of the table;
- a rolling restart of every member in the simulation harness with S clients
  (at most --restart-clients, default 10,000, for run time): affinity
  violations and duplicate sessions (both must be 0);
- table build time (median of 3), lookups per second (affinity key to owner:
  CRC-32, modulo, list index), and the CPU time of one decision in steady state
  (every node's `on_request` for one request) and in transition (a moved key:
  the owner's question, the holder's answer, the owner's decision).

Usage: tools/bench_lb.py [--json] [--table-size PRIME] [--quick] [--restart-clients N]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lb.balancer import Action, Balancer, BalancerConfig, Send
from lb.hashing import AffinityMode, affinity_key, key_bucket
from lb.messages import SessionRequest
from lb.sim import SimConfig, Simulation, rolling_restart
from lb.table import DEFAULT_TABLE_SIZE, MaglevTable
from lb.view import View

SIZES = (3, 8, 16, 64)
SESSIONS = (10_000, 100_000)


def names(count: int) -> list[str]:
    return [f"node-{i:02d}" for i in range(count)]


def session_keys(count: int) -> list[bytes]:
    return [affinity_key(AffinityMode.CLIENT_ID, f"client-{i:06d}", "") for i in range(count)]


def expected_max_over_mean(sessions: int, members: int) -> float:
    """E[max]/mean of `members` binomial(sessions, 1/members) counts (normal approx.)."""
    if members == 1:
        return 1.0
    mean = sessions / members
    sd = math.sqrt(sessions * (1 / members) * (1 - 1 / members))
    steps, low, high = 4000, -10.0, 10.0
    width = (high - low) / steps
    total = 0.0
    for i in range(steps):
        x = low + (i + 0.5) * width
        pdf = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        total += x * members * pdf * cdf ** (members - 1) * width
    return (mean + sd * total) / mean


def median_time(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def moved_share(a: MaglevTable, b: MaglevTable, buckets: list[int]) -> tuple[float, float]:
    """(share of buckets, share of sessions) whose owner differs between tables."""
    a_owners, b_owners = a.owners(), b.owners()
    changed = [x != y for x, y in zip(a_owners, b_owners, strict=True)]
    return sum(changed) / a.size, sum(changed[b] for b in buckets) / len(buckets)


def disruption(count: int, size: int, buckets: list[int]) -> dict[str, float]:
    members = names(count)
    full = MaglevTable(members, size)
    remove = [moved_share(full, MaglevTable([m for m in members if m != gone], size), buckets)
              for gone in members]
    add = [moved_share(full, MaglevTable([*members, f"new-{k}"], size), buckets)
           for k in range(4)]
    return {
        "buckets_remove": max(r[0] for r in remove) * count,
        "sessions_remove": statistics.mean(r[1] for r in remove) * count,
        "buckets_add": max(a[0] for a in add) * (count + 1),
        "sessions_add": statistics.mean(a[1] for a in add) * (count + 1),
    }


def lookups_per_s(table: MaglevTable, keys: list[bytes]) -> float:
    owner_of_key = table.owner_of_key
    elapsed = median_time(lambda: [owner_of_key(k) for k in keys])
    return len(keys) / elapsed


@functools.lru_cache(maxsize=8)
def rolling_restart_check(count: int, sessions: int, size: int) -> tuple[int, int, int]:
    """(violations, duplicates, requests) over a rolling restart with `sessions` clients."""
    config = SimConfig(
        nodes=count, clients=sessions, seed=count,
        balancer=BalancerConfig(table_size=size, linger_s=30.0),
        hold_s=(20.0, 90.0), idle_s=(1.0, 10.0), long_idle_s=(30.0, 60.0),
        long_idle_share=0.1, track_requests=False, per_node_jitter=False)
    sim = Simulation(config)
    sim.start_clients(spread_s=5.0)
    sim.run_for(10.0)
    step_s = max(0.2, 30.0 / count)
    rolling_restart(sim, step_s, step_s)
    sim.run_for(10.0)
    return sim.metrics.violations, sim.metrics.duplicates, sim.metrics.requests


def _deliver(nodes: dict[str, Balancer], actions: list[Action], now: float) -> int:
    """Deliver peer messages synchronously; returns the replies produced."""
    replies = 0
    while actions:
        action = actions.pop(0)
        if isinstance(action, Send):
            actions += nodes[action.to].on_peer(action.message, now)
        else:
            replies += 1
    return replies


def decision_us(count: int, size: int) -> tuple[float, float]:
    """CPU microseconds per request: whole cluster in steady state, moved key in transition."""
    config = BalancerConfig(table_size=size)
    members = names(count)
    nodes = {m: Balancer(m, config) for m in members}
    view = View.of(1, members)
    _deliver(nodes, [a for n in nodes.values() for a in n.install_view(view, 0.0)], 0.0)
    requests = [SessionRequest(f"r{i}", f"client-{i}", "10.0.0.1") for i in range(2000)]
    start = time.perf_counter()
    for request in requests:
        for node in nodes.values():
            node.on_request(request, 1.0)
    steady = (time.perf_counter() - start) / len(requests) * 1e6
    bigger = View.of(2, [*members, "node-new"])
    nodes["node-new"] = Balancer("node-new", config)
    new_table = bigger.table(size)
    old_table = view.table(size)
    moved = [r for r in requests
             if new_table.owner_of_key(_key(r)) != old_table.owner_of_key(_key(r))]
    installs = [a for n in nodes.values() for a in n.install_view(bigger, 2.0)]
    _deliver(nodes, installs, 2.0)
    start = time.perf_counter()
    for request in moved:
        owner = nodes[new_table.owner_of_key(_key(request))]
        _deliver(nodes, owner.on_request(request, 3.0), 3.0)
    transition = (time.perf_counter() - start) / max(1, len(moved)) * 1e6
    return steady, transition


def _key(request: SessionRequest) -> bytes:
    return affinity_key(AffinityMode.CLIENT_ID, request.client_id, request.client_addr)


def measure(size: int, sessions_list: tuple[int, ...],
            restart_cap: int) -> list[dict[str, float]]:
    rows = []
    for count in SIZES:
        members = names(count)
        build_s = median_time(lambda m=members: MaglevTable(m, size))  # type: ignore[misc]
        table = MaglevTable(members, size)
        slots = table.slot_counts().values()
        steady_us, transition_us = decision_us(count, size)
        for sessions in sessions_list:
            print(f"bench_lb: N={count} S={sessions}", file=sys.stderr, flush=True)
            keys = session_keys(sessions)
            buckets = [key_bucket(k, size) for k in keys]
            per_node = Counter(table.owner(b) for b in buckets)
            balance = max(per_node.values()) / (sessions / count)
            clients = min(sessions, restart_cap)
            violations, duplicates, requests = rolling_restart_check(count, clients, size)
            rows.append({
                "N": count, "S": sessions,
                "table_max_over_mean": max(slots) / statistics.mean(slots),
                "session_balance_over_random": balance / expected_max_over_mean(sessions, count),
                **disruption(count, size, buckets),
                "restart_clients": clients, "restart_requests": requests,
                "violations": violations, "duplicates": duplicates,
                "build_ms": build_s * 1e3,
                "lookups_per_s": lookups_per_s(table, keys),
                "decide_steady_us": steady_us, "decide_transition_us": transition_us,
            })
    return rows


def summary(rows: list[dict[str, float]], size: int) -> dict[str, object]:
    return {
        "table_size": size,
        "moved_over_min_remove": max(max(r["buckets_remove"], r["sessions_remove"]) for r in rows),
        "moved_over_min_add": max(max(r["buckets_add"], r["sessions_add"]) for r in rows),
        "violations": sum(int(r["violations"]) for r in rows),
        "duplicates": sum(int(r["duplicates"]) for r in rows),
        "build_ms": max(r["build_ms"] for r in rows),
        "lookups_per_s": min(r["lookups_per_s"] for r in rows),
        "rows": rows,
    }


COLUMNS = [
    ("N", "N", "{:.0f}"), ("S", "sessions", "{:.0f}"),
    ("table_max_over_mean", "slots max/mean", "{:.5f}"),
    ("session_balance_over_random", "sess bal/random", "{:.3f}"),
    ("buckets_remove", "rm buckets/min", "{:.3f}"), ("sessions_remove", "rm sess/min", "{:.3f}"),
    ("buckets_add", "add buckets/min", "{:.3f}"), ("sessions_add", "add sess/min", "{:.3f}"),
    ("restart_clients", "restart clients", "{:.0f}"),
    ("violations", "violations", "{:.0f}"), ("duplicates", "duplicates", "{:.0f}"),
    ("build_ms", "build ms", "{:.1f}"), ("lookups_per_s", "lookups/s", "{:,.0f}"),
    ("decide_steady_us", "decide us steady", "{:.1f}"),
    ("decide_transition_us", "decide us transition", "{:.1f}"),
]


def print_table(result: dict[str, object]) -> None:
    rows = result["rows"]
    assert isinstance(rows, list)
    print(f"lb benchmark, table size {result['table_size']}, not pinned")
    print("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|" + "|".join("---:" for _ in COLUMNS) + "|")
    for row in rows:
        print("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    for key in ("moved_over_min_remove", "moved_over_min_add", "violations", "duplicates",
                "build_ms", "lookups_per_s"):
        value = result[key]
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--table-size", type=int, default=DEFAULT_TABLE_SIZE,
                        help="prime number of buckets (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="10,000 sessions only")
    parser.add_argument("--restart-clients", type=int, default=10_000,
                        help="at most this many clients in the rolling-restart simulation "
                             "(default %(default)s; 100,000 at N = 64 takes many minutes)")
    args = parser.parse_args(argv)
    sessions = SESSIONS[:1] if args.quick else SESSIONS
    result = summary(measure(args.table_size, sessions, args.restart_clients), args.table_size)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
