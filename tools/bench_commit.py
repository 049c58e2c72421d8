#!/usr/bin/env python3
"""The cost of one durable namespace commit, apart from FUSE.

Commits N single-record batches (renames, the cheapest change) into a fresh replica through
the same `commit_batch` the node uses, and prints wall time and CPU time per commit. The wall
time minus the CPU time is what the device flush costs: the floor under every metadata call
that must be durable when it returns (DESIGN.md rule 3).

Usage: python tools/bench_commit.py [--count N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import resource
import stat
import tempfile
import time
from pathlib import Path

from clusterfs import records as r
from clusterfs.blockdir import format_blockdir
from clusterfs.committer import commit_batch
from clusterfs.namespace import ROOT_INO
from clusterfs.node import open_replica


def _cpu_s() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--dir", default="/var/tmp", help="where the replica lives")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_commit-", dir=args.dir) as tmp:
        run(Path(tmp), args.count, args.dir)


def run(base: Path, count: int, where: str) -> None:
    store = open_replica(base / "state", format_blockdir(base / "blocks"))
    names = [f"f{i}".encode() for i in range(count)]
    commit_batch(store, [r.MakeNode(ROOT_INO, n, stat.S_IFIFO | 0o644, 0, 0, 0, 1)
                         for n in names])
    wall = time.perf_counter()
    user, system = _cpu_s()
    for i, name in enumerate(names):
        commit_batch(store, [r.Rename(ROOT_INO, name, ROOT_INO, b"g" + name, 0, i)])
    wall = time.perf_counter() - wall
    user2, system2 = _cpu_s()
    store.close()
    per = 1e6 / count
    print(f"command: python tools/bench_commit.py --count {count} --dir {where}")
    print(f"one durable commit (1 rename): wall {wall * per:.0f} us, "
          f"user CPU {(user2 - user) * per:.0f} us, system CPU {(system2 - system) * per:.0f} us")


if __name__ == "__main__":
    main()
