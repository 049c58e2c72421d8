"""The two-node witness: the compare-and-swap of docs/membership.md on a real directory."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clusterfs.membership import witness
from clusterfs.membership.witness import Witness


def stored(directory: Path) -> dict[str, object]:
    return dict(json.loads((directory / "witness").read_text()))


def test_absent_record_is_granted_and_written(tmp_path: Path) -> None:
    assert Witness(tmp_path).claim(3, "a")
    assert stored(tmp_path) == {"epoch": 3, "node": "a"}


def test_the_directory_is_made_if_missing(tmp_path: Path) -> None:
    directory = tmp_path / "cluster"
    assert Witness(directory).claim(1, "a")
    assert stored(directory) == {"epoch": 1, "node": "a"}


def test_an_older_epoch_is_replaced(tmp_path: Path) -> None:
    assert Witness(tmp_path).claim(3, "a")
    assert Witness(tmp_path).claim(4, "b")
    assert stored(tmp_path) == {"epoch": 4, "node": "b"}


def test_the_same_claim_is_granted_again(tmp_path: Path) -> None:
    w = Witness(tmp_path)
    assert w.claim(3, "a")
    assert w.claim(3, "a")
    assert Witness(tmp_path).claim(3, "a")  # another instance (another node) reads the same
    assert stored(tmp_path) == {"epoch": 3, "node": "a"}


def test_the_same_epoch_for_another_node_is_refused(tmp_path: Path) -> None:
    assert Witness(tmp_path).claim(3, "a")
    assert not Witness(tmp_path).claim(3, "b")
    assert stored(tmp_path) == {"epoch": 3, "node": "a"}


def test_an_older_claim_is_refused_by_a_newer_record(tmp_path: Path) -> None:
    assert Witness(tmp_path).claim(5, "a")
    assert not Witness(tmp_path).claim(4, "a")
    assert not Witness(tmp_path).claim(4, "b")
    assert stored(tmp_path) == {"epoch": 5, "node": "a"}


def test_no_temporary_file_is_left_behind(tmp_path: Path) -> None:
    w = Witness(tmp_path)
    w.claim(1, "a")
    w.claim(1, "b")
    w.claim(0, "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["witness", "witness.lock"]


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold_lock(directory: Path, seconds: float) -> subprocess.Popen[str]:
    """Another claimant (a process: the lock is a POSIX record lock) in its
    read-decide-write, holding the lock for `seconds`."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory / "witness.lock"),
                               str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def _end(holder: subprocess.Popen[str], kill: bool = False) -> None:
    if kill:
        holder.kill()
    holder.wait()
    assert holder.stdout is not None
    holder.stdout.close()


def test_a_held_lock_refuses_after_the_timeout(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(witness, "LOCK_TIMEOUT_S", 0.2)
    holder = _hold_lock(tmp_path, 30)
    try:
        start_s = time.monotonic()
        assert not Witness(tmp_path).claim(1, "a")
        assert time.monotonic() - start_s >= 0.2
        assert not (tmp_path / "witness").exists()
    finally:
        _end(holder, kill=True)


def test_a_lock_released_within_the_timeout_lets_the_claim_through(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(witness, "LOCK_TIMEOUT_S", 5.0)
    holder = _hold_lock(tmp_path, 0.2)
    try:
        assert Witness(tmp_path).claim(2, "a")
    finally:
        _end(holder)
    assert stored(tmp_path) == {"epoch": 2, "node": "a"}


def test_a_claimant_killed_holding_the_lock_does_not_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(witness, "LOCK_TIMEOUT_S", 1.0)
    holder = _hold_lock(tmp_path, 30)
    _end(holder, kill=True)  # kill -9 in its read-decide-write: the kernel lets go
    assert Witness(tmp_path).claim(7, "b")
    assert stored(tmp_path) == {"epoch": 7, "node": "b"}


@pytest.mark.parametrize("content", [
    b"", b"{", b"not json", b"\xff\xfe\x00", b"[3, \"a\"]", b"{\"epoch\": 3}",
    b"{\"node\": \"a\"}", b"{\"epoch\": \"three\", \"node\": \"a\"}", b"null", b"42",
    b"{\"epoch\": null, \"node\": \"a\"}",
])
def test_a_corrupt_record_is_refused_without_raising(tmp_path: Path,
                                                     content: bytes) -> None:
    (tmp_path / "witness").write_bytes(content)
    assert Witness(tmp_path).claim(1, "a") is False
    assert (tmp_path / "witness").read_bytes() == content  # left for the operator to see


def test_an_unusable_directory_is_refused_without_raising(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert Witness(not_a_dir).claim(1, "a") is False


def test_concurrent_threads_grant_one_node_per_epoch(tmp_path: Path) -> None:
    nodes = [f"n{i}" for i in range(8)]
    results: dict[str, bool] = {}
    barrier = threading.Barrier(len(nodes))

    def claim(node: str) -> None:
        barrier.wait()
        results[node] = Witness(tmp_path).claim(9, node)

    threads = [threading.Thread(target=claim, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, granted in results.items() if granted]
    assert len(results) == len(nodes)
    assert len(winners) == 1
    assert stored(tmp_path) == {"epoch": 9, "node": winners[0]}


REPO = Path(__file__).resolve().parents[2]
CLAIMANT = """
import sys, time
from pathlib import Path
from clusterfs.membership.witness import Witness
directory, epoch, node, go = sys.argv[1:]
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.001)
print("granted" if Witness(Path(directory)).claim(int(epoch), node) else "refused", flush=True)
"""


def test_concurrent_processes_grant_one_node_per_epoch(tmp_path: Path) -> None:
    directory, go = tmp_path / "cluster", tmp_path / "go"
    nodes = ["a", "b", "c"]
    processes = [subprocess.Popen([sys.executable, "-c", CLAIMANT, str(directory), "4", n,
                                   str(go)], stdout=subprocess.PIPE, text=True, cwd=REPO)
                 for n in nodes]
    try:
        for p in processes:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        go.touch()  # every claimant is waiting: they claim together
        results = {n: p.communicate(timeout=30)[0].strip() for n, p in zip(nodes, processes,
                                                                          strict=True)}
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
    assert [p.returncode for p in processes] == [0] * len(nodes)
    winners = [n for n, result in results.items() if result == "granted"]
    assert len(winners) == 1, results
    assert sorted(results.values()) == ["granted", "refused", "refused"]
    assert stored(directory) == {"epoch": 4, "node": winners[0]}
