"""Races between nodes resolve as on one machine, hundreds of rounds each: two (or three)
threads, each working through a different node's mount, are released by one barrier so
that their calls reach the cluster at the same moment.

- O_CREAT|O_EXCL of one name on two nodes: exactly one success and one EEXIST;
- `mkdir -p` of one deep tree from all three nodes: one tree, each level exactly once;
- rename onto a name another node is creating: one consistent state everywhere, and with
  RENAME_NOREPLACE exactly one winner;
- rmdir of a directory another node is creating in: the rmdir wins (the create gets
  ENOENT) or the create wins (the rmdir gets ENOTEMPTY), never both;

and after every round all nodes agree on the result (same names, same inode numbers).
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.conftest import Cluster
from tests.util import (
    RENAME_NOREPLACE,
    Together,
    errname,
    errno_of,
    renameat2,
    tree_diff,
    tree_state,
)

pytestmark = [pytest.mark.mount, pytest.mark.slow]

ROUNDS = 200

PAIRS = [(0, 1), (1, 2), (2, 0), (1, 0), (2, 1), (0, 2)]


@pytest.fixture
def together() -> Iterator[Together]:
    with Together(3) as t:
        yield t


def _create_excl(path: Path, data: bytes = b"") -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        if data:
            os.write(fd, data)
    finally:
        os.close(fd)


def _agree(cluster: Cluster, rel: str, context: str) -> dict[str, tuple[object, ...]]:
    """Every node shows the same tree under REL (names, types, modes, inode numbers, link
    counts, sizes); returns it."""
    trees = [tree_state(cluster.mnt(i) / rel) for i in range(len(cluster))]
    for i in range(1, len(cluster)):
        assert trees[i] == trees[0], (
            f"{context}: n1 and n{i + 1} disagree:\n" + "\n".join(tree_diff(trees[0], trees[i])))
    return trees[0]


def test_exclusive_create_of_one_name_on_two_nodes(
    shared_cluster: Cluster, croot: str, together: Together
) -> None:
    c = shared_cluster
    wins = [0, 0, 0]
    for rnd in range(ROUNDS):
        a, b = PAIRS[rnd % len(PAIRS)]
        name = f"x{rnd}"
        path_a, path_b = c.mnt(a) / croot / name, c.mnt(b) / croot / name
        results = together.run(
            functools.partial(_create_excl, path_a, b"A"),
            functools.partial(_create_excl, path_b, b"B"),
        )
        assert sorted(results) == [0, errno.EEXIST], (
            f"round {rnd} (n{a + 1} vs n{b + 1}): got {[errname(e) for e in results]}")
        winner = a if results[0] == 0 else b
        wins[winner] += 1
        expected = b"A" if winner == a else b"B"
        inos = set()
        for i in range(3):
            path = c.mnt(i) / croot / name
            assert path.read_bytes() == expected, f"round {rnd}: n{i + 1} reads another file"
            inos.add(os.lstat(path).st_ino)
        assert len(inos) == 1, f"round {rnd}: inode numbers differ: {inos}"
    tree = _agree(c, croot, "after all rounds")
    assert sorted(tree) == sorted(f"x{rnd}" for rnd in range(ROUNDS))


def test_makedirs_of_one_tree_from_three_nodes(
    shared_cluster: Cluster, croot: str, together: Together
) -> None:
    c = shared_cluster
    levels = ["a", "b", "c"]
    for rnd in range(ROUNDS):
        rel = os.path.join(f"m{rnd}", *levels)
        results = together.run(
            *[functools.partial(os.makedirs, c.mnt(i) / croot / rel, 0o755, exist_ok=True)
              for i in range(3)]
        )
        assert results == [0, 0, 0], (
            f"round {rnd}: makedirs gave {[errname(e) for e in results]}")
        inos = []
        for i in range(3):
            d = c.mnt(i) / croot / f"m{rnd}"
            inos.append([os.lstat(d).st_ino])
            for level in levels:
                listing = os.listdir(d)
                assert listing == [level], f"round {rnd}: {d} on n{i + 1} holds {listing}"
                d = d / level
                inos[-1].append(os.lstat(d).st_ino)
            assert os.listdir(d) == []
        assert inos[0] == inos[1] == inos[2], f"round {rnd}: inode numbers differ: {inos}"
    tree = _agree(c, croot, "after all rounds")
    assert len(tree) == ROUNDS * (1 + len(levels))
    assert all(stat.S_ISDIR(entry[0]) for entry in tree.values())  # type: ignore[arg-type]


def test_rename_onto_a_name_being_created(
    shared_cluster: Cluster, croot: str, together: Together
) -> None:
    """Even rounds: rename(2), which replaces; odd rounds: RENAME_NOREPLACE, which gives
    the name to exactly one of the two."""
    c = shared_cluster
    outcomes: dict[str, int] = {}
    for rnd in range(ROUNDS):
        noreplace = rnd % 2 == 1
        a, b = PAIRS[rnd % len(PAIRS)]
        d = f"r{rnd}"
        os.mkdir(c.mnt(a) / croot / d)
        (c.mnt(a) / croot / d / "src").write_bytes(b"renamed")
        src_ino = os.lstat(c.mnt(a) / croot / d / "src").st_ino
        for i in range(3):  # every node has looked the names up
            assert os.listdir(c.mnt(i) / croot / d) == ["src"]

        def do_rename(a: int = a, d: str = d, noreplace: bool = noreplace) -> None:
            src, dst = c.mnt(a) / croot / d / "src", c.mnt(a) / croot / d / "dst"
            if noreplace:
                renameat2(src, dst, RENAME_NOREPLACE)
            else:
                os.rename(src, dst)

        def do_create(b: int = b, d: str = d) -> None:
            _create_excl(c.mnt(b) / croot / d / "dst", b"created")

        r_rename, r_create = together.run(do_rename, do_create)
        key = (f"{'noreplace' if noreplace else 'rename'}={errname(r_rename)} "
               f"create={errname(r_create)}")
        outcomes[key] = outcomes.get(key, 0) + 1
        tree = _agree(c, os.path.join(croot, d), f"round {rnd} ({key})")
        dst_data = (c.mnt(b) / croot / d / "dst").read_bytes()
        if noreplace:
            # Exactly one of the two gets the name.
            assert sorted([r_rename, r_create]) == [0, errno.EEXIST], f"round {rnd}: {key}"
            if r_rename == 0:
                assert sorted(tree) == ["dst"] and tree["dst"][2] == src_ino, f"round {rnd}"
                assert dst_data == b"renamed"
            else:
                assert sorted(tree) == ["dst", "src"] and tree["src"][2] == src_ino, (
                    f"round {rnd}: {tree}")
                assert dst_data == b"created"
        else:
            # The rename always succeeds and ends holding the name; the create succeeded
            # only if it came first (its file was then replaced by the rename).
            assert r_rename == 0 and r_create in (0, errno.EEXIST), f"round {rnd}: {key}"
            assert sorted(tree) == ["dst"], f"round {rnd}: {sorted(tree)}"
            assert tree["dst"][2] == src_ino and dst_data == b"renamed", f"round {rnd}"
        for i in range(3):
            assert (c.mnt(i) / croot / d / "dst").read_bytes() == dst_data, f"round {rnd}"
    print(f"outcomes: {outcomes}")


def test_rmdir_races_a_create_inside(
    shared_cluster: Cluster, croot: str, together: Together
) -> None:
    """Even rounds create a file in the directory, odd rounds a subdirectory."""
    c = shared_cluster
    outcomes: dict[str, int] = {}
    for rnd in range(ROUNDS):
        a, b = PAIRS[rnd % len(PAIRS)]
        kind = "dir" if rnd % 2 else "file"
        d = f"d{rnd}"
        os.mkdir(c.mnt(b) / croot / d)
        for i in range(3):  # every node has the directory cached
            assert os.listdir(c.mnt(i) / croot / d) == []

        def do_create(b: int = b, d: str = d, kind: str = kind) -> None:
            target = c.mnt(b) / croot / d / "child"
            if kind == "dir":
                os.mkdir(target)
            else:
                _create_excl(target)

        def do_rmdir(a: int = a, d: str = d) -> None:
            os.rmdir(c.mnt(a) / croot / d)

        r_rmdir, r_create = together.run(do_rmdir, do_create)
        key = f"rmdir={errname(r_rmdir)} create-{kind}={errname(r_create)}"
        outcomes[key] = outcomes.get(key, 0) + 1
        if r_rmdir == 0:
            assert r_create == errno.ENOENT, f"round {rnd}: both succeeded or odd errno: {key}"
            for i in range(3):
                assert errno_of(os.lstat, c.mnt(i) / croot / d) == errno.ENOENT, (
                    f"round {rnd}: rmdir succeeded but {d} is still there on n{i + 1}")
        else:
            assert (r_rmdir, r_create) == (errno.ENOTEMPTY, 0), f"round {rnd}: {key}"
            tree = _agree(c, os.path.join(croot, d), f"round {rnd} ({key})")
            assert list(tree) == ["child"], f"round {rnd}: {tree}"
            assert stat.S_ISDIR(tree["child"][0]) == (kind == "dir")  # type: ignore[arg-type]
    _agree(c, croot, "after all rounds")
    print(f"outcomes: {outcomes}")
