"""`keep_freed_memory`: after it, a process that allocates and frees 1 MiB buffers over and
over stops paying page faults for each (the front ends' and nodes' data path)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
from clusterfs.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
kept = []
def step(i):
    received = bytearray(1 << 20)  # a message in, copied with a header, a few in flight
    kept.append(bytes(received) + b"header")
    if len(kept) > 3:
        kept.pop(0)
for i in range(20):  # the heap grows to its working size first
    step(i)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(200):
    step(i)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_per_buffer(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          timeout=60, check=True)
    return int(done.stdout) / 200


def test_freed_buffers_are_reused_without_page_faults() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt is Linux's")
    assert faults_per_buffer("default") > 20  # glibc maps and unmaps some buffers anew
    assert faults_per_buffer("keep") < 2
