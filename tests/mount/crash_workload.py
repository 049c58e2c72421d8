"""A metadata-heavy workload for the kill -9 test, and the model that checks its result.

Run as `python -m tests.mount.crash_workload ROOT LOG SEED MAX_OPS`: it creates, renames,
links, unlinks and chmods files, directories and symlinks under ROOT, one operation at a
time, and appends to LOG a "begin" line before each operation and an "ok" line once the
call returned success. It stops at the first error (the daemon was killed), logging it.

`expected_trees(LOG)` replays the log: every "ok" operation must be in the file system;
the one operation that was begun but not acknowledged may or may not be.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# -- the model ----------------------------------------------------------------------


@dataclass
class Node:
    kind: str  # "dir" | "file" | "symlink"
    mode: int = 0
    content: bytes = b""
    target: str = ""


@dataclass
class Model:
    """Paths (relative, '/'-separated) to inode ids, and the inodes."""

    paths: dict[str, int] = field(default_factory=dict)
    nodes: dict[int, Node] = field(default_factory=dict)
    next_id: int = 1

    def copy(self) -> Model:
        nodes = {i: Node(n.kind, n.mode, n.content, n.target) for i, n in self.nodes.items()}
        return Model(dict(self.paths), nodes, self.next_id)

    def _new(self, path: str, node: Node) -> None:
        self.paths[path] = self.next_id
        self.nodes[self.next_id] = node
        self.next_id += 1

    def apply(self, op: dict[str, Any]) -> None:
        name = op["op"]
        if name == "mkdir":
            self._new(op["path"], Node("dir", op["mode"]))
        elif name == "create":
            self._new(op["path"], Node("file", op["mode"], bytes.fromhex(op["content"])))
        elif name == "symlink":
            self._new(op["path"], Node("symlink", 0o777, target=op["target"]))
        elif name == "link":
            self.paths[op["dst"]] = self.paths[op["src"]]
        elif name in ("unlink", "rmdir"):
            del self.paths[op["path"]]
        elif name == "chmod":
            self.nodes[self.paths[op["path"]]].mode = op["mode"]
        elif name == "rename":
            self._rename(op["src"], op["dst"])
        else:
            raise ValueError(f"unknown op {name}")

    def _rename(self, src: str, dst: str) -> None:
        if self.paths.get(dst) == self.paths[src]:
            return  # hard links to the same inode: nothing happens
        moved = {p: i for p, i in self.paths.items() if p == src or p.startswith(src + "/")}
        for p in moved:
            del self.paths[p]
        self.paths.pop(dst, None)
        for p, i in moved.items():
            self.paths[dst + p[len(src) :]] = i

    def kind(self, path: str) -> str:
        return self.nodes[self.paths[path]].kind

    def tree(self) -> Tree:
        groups: dict[int, set[str]] = {}
        entries: dict[str, tuple[Any, ...]] = {}
        for p, i in self.paths.items():
            n = self.nodes[i]
            if n.kind == "dir":
                entries[p] = ("dir", n.mode)
            elif n.kind == "file":
                entries[p] = ("file", n.mode, n.content)
                groups.setdefault(i, set()).add(p)
            else:
                entries[p] = ("symlink", n.target)
                groups.setdefault(i, set()).add(p)
        return Tree(entries, frozenset(frozenset(g) for g in groups.values()))


@dataclass(frozen=True)
class Tree:
    """What a directory tree looks like: entries, and which names share an inode."""

    entries: dict[str, tuple[Any, ...]]
    link_groups: frozenset[frozenset[str]]

    def diff(self, other: Tree, limit: int = 12) -> list[str]:
        out = []
        for p in sorted(set(self.entries) | set(other.entries)):
            a, b = self.entries.get(p), other.entries.get(p)
            if a != b:
                out.append(f"{p}: expected {_short(a)}, found {_short(b)}")
        if self.link_groups != other.link_groups:
            mine = {g for g in self.link_groups if len(g) > 1}
            theirs = {g for g in other.link_groups if len(g) > 1}
            out.append(
                f"hard-link groups differ: expected-only {sorted(map(sorted, mine - theirs))[:3]}"
                f", found-only {sorted(map(sorted, theirs - mine))[:3]}"
            )
        return out[:limit]


def _short(entry: tuple[Any, ...] | None) -> str:
    if entry is None:
        return "nothing"
    if entry[0] == "file":
        return f"file mode {entry[1]:o} {len(entry[2])} bytes"
    if entry[0] == "dir":
        return f"dir mode {entry[1]:o}"
    return f"symlink -> {entry[1]}"


def read_log(log: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, Any]]:
    """(acknowledged ops, the op begun but not acknowledged or None, the end record)."""
    done: list[dict[str, Any]] = []
    pending: dict[str, Any] | None = None
    end: dict[str, Any] = {}
    for line in log.read_text().splitlines():
        if not line.endswith("}"):
            continue  # a torn last line cannot happen (the worker is not killed), but be safe
        rec = json.loads(line)
        if rec["state"] == "begin":
            pending = rec
        elif rec["state"] == "ok":
            assert pending is not None and pending["seq"] == rec["seq"]
            done.append(pending)
            pending = None
        else:
            end = rec
    return done, pending, end


def expected_trees(log: Path) -> tuple[list[Tree], int]:
    """The trees the file system may show (without / with the unacknowledged op) and the
    number of acknowledged ops."""
    done, pending, _end = read_log(log)
    model = Model()
    for op in done:
        model.apply(op)
    candidates = [model.tree()]
    if pending is not None:
        after = model.copy()
        after.apply(pending)
        candidates.append(after.tree())
        if pending["op"] == "create":  # created, data not yet written
            empty = model.copy()
            empty.apply({**pending, "content": ""})
            candidates.append(empty.tree())
    return candidates, len(done)


# -- the workload -------------------------------------------------------------------
class Worker:
    def __init__(self, root: Path, log: Path, seed: int) -> None:
        self.root = root
        self.log = open(log, "a", buffering=1)  # noqa: SIM115 - closed in run()
        self.rng = random.Random(seed)
        self.model = Model()
        self.seq = 0
        self.counter = 0

    def _fresh(self, parent: str) -> str:
        self.counter += 1
        name = f"n{self.counter}"
        return f"{parent}/{name}" if parent else name

    def _pick(self, kinds: tuple[str, ...]) -> str | None:
        choices = sorted(p for p in self.model.paths if self.model.kind(p) in kinds)
        return self.rng.choice(choices) if choices else None

    def _dir(self) -> str:
        """A parent for a new entry: mostly an existing directory, sometimes the root."""
        if self.rng.random() < 0.2:
            return ""
        return self._pick(("dir",)) or ""

    def choose(self) -> dict[str, Any]:
        r = self.rng.random()
        m = self.model
        if r < 0.15 or len(m.paths) < 5:
            return {"op": "mkdir", "path": self._fresh(self._dir()), "mode": 0o755}
        if r < 0.45:
            content = self.rng.randbytes(self.rng.randrange(0, 3000)).hex()
            mode = self.rng.choice([0o644, 0o600, 0o755])
            return {"op": "create", "path": self._fresh(self._dir()), "mode": mode,
                    "content": content}
        if r < 0.5:
            return {"op": "symlink", "path": self._fresh(self._dir()), "target": f"t{r:.6f}"}
        if r < 0.58 and (src := self._pick(("file",))):
            return {"op": "link", "src": src, "dst": self._fresh(self._dir())}
        if r < 0.75 and (src := self._pick(("file", "symlink", "dir"))):
            return self._rename_op(src)
        if r < 0.9 and (victim := self._pick(("file", "symlink"))):
            return {"op": "unlink", "path": victim}
        if r < 0.95:
            empty = [p for p in m.paths if m.kind(p) == "dir"
                     and not any(q.startswith(p + "/") for q in m.paths)]
            if empty:
                return {"op": "rmdir", "path": self.rng.choice(sorted(empty))}
        if target := self._pick(("file", "dir")):
            mode = self.rng.choice([0o700, 0o755, 0o750, 0o640, 0o604])
            if m.kind(target) == "file":
                mode &= 0o666
            return {"op": "chmod", "path": target, "mode": mode}
        return {"op": "mkdir", "path": self._fresh(""), "mode": 0o755}

    def _rename_op(self, src: str) -> dict[str, Any]:
        m = self.model
        dirs = [p for p in m.paths if m.kind(p) == "dir"
                and p != src and not p.startswith(src + "/")]
        parent = self.rng.choice(sorted(dirs)) if dirs and self.rng.random() < 0.7 else ""
        dst = self._fresh(parent)
        if m.kind(src) == "file" and self.rng.random() < 0.3:
            victim = self._pick(("file",))
            if victim and victim != src:
                dst = victim  # replace an existing file
        return {"op": "rename", "src": src, "dst": dst}

    def perform(self, op: dict[str, Any]) -> None:
        p = lambda key: self.root / op[key]  # noqa: E731
        name = op["op"]
        if name == "mkdir":
            os.mkdir(p("path"), op["mode"])
        elif name == "create":
            fd = os.open(p("path"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, op["mode"])
            try:
                os.write(fd, bytes.fromhex(op["content"]))
            finally:
                os.close(fd)
        elif name == "symlink":
            os.symlink(op["target"], p("path"))
        elif name == "link":
            os.link(p("src"), p("dst"))
        elif name == "unlink":
            os.unlink(p("path"))
        elif name == "rmdir":
            os.rmdir(p("path"))
        elif name == "chmod":
            os.chmod(p("path"), op["mode"])
        elif name == "rename":
            os.rename(p("src"), p("dst"))

    def write(self, rec: dict[str, Any]) -> None:
        self.log.write(json.dumps(rec) + "\n")

    def run(self, max_ops: int) -> int:
        try:
            for _ in range(max_ops):
                op = self.choose()
                self.seq += 1
                self.write({**op, "state": "begin", "seq": self.seq})
                try:
                    self.perform(op)
                except OSError as exc:
                    self.write({"state": "error", "seq": self.seq, "errno": exc.errno,
                                "error": str(exc)})
                    return 1
                self.write({"state": "ok", "seq": self.seq})
                self.model.apply(op)
            self.write({"state": "done", "seq": self.seq})
            return 0
        finally:
            self.log.close()


def main(argv: list[str]) -> int:
    root, log, seed, max_ops = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3])
    return Worker(root, log, seed).run(max_ops)


# -- reading the file system back -----------------------------------------------------
def snapshot(root: Path) -> tuple[Tree, list[str]]:
    """The tree under ROOT and the consistency problems found while walking it: entries
    that cannot be stat'ed or read, and wrong link counts."""
    entries: dict[str, tuple[Any, ...]] = {}
    by_ino: dict[int, set[str]] = {}
    nlinks: dict[int, int] = {}
    problems: list[str] = []

    def walk(d: Path, rel: str) -> int:
        subdirs = 0
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            path = f"{rel}/{entry.name}" if rel else entry.name
            try:
                st = os.lstat(entry.path)
            except OSError as exc:
                problems.append(f"{path}: lstat failed: {errno.errorcode.get(exc.errno or 0)}")
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs += 1
                entries[path] = ("dir", stat.S_IMODE(st.st_mode))
                inner = walk(Path(entry.path), path)
                if st.st_nlink != 2 + inner:
                    problems.append(f"{path}/: nlink {st.st_nlink}, has {inner} subdirs")
                continue
            if stat.S_ISREG(st.st_mode):
                try:
                    content = Path(entry.path).read_bytes()
                except OSError as exc:
                    problems.append(f"{path}: read failed: {errno.errorcode.get(exc.errno or 0)}")
                    content = b"<unreadable>"
                if len(content) != st.st_size:
                    problems.append(f"{path}: st_size {st.st_size}, read {len(content)} bytes")
                entries[path] = ("file", stat.S_IMODE(st.st_mode), content)
            elif stat.S_ISLNK(st.st_mode):
                entries[path] = ("symlink", os.readlink(entry.path))
            else:
                problems.append(f"{path}: unexpected file type {stat.S_IFMT(st.st_mode):o}")
                continue
            by_ino.setdefault(st.st_ino, set()).add(path)
            nlinks[st.st_ino] = st.st_nlink
        return subdirs

    top = walk(root, "")
    root_nlink = os.lstat(root).st_nlink
    if root_nlink != 2 + top:
        problems.append(f"./: nlink {root_nlink}, has {top} subdirs")
    for ino, names in by_ino.items():
        if nlinks[ino] != len(names):
            problems.append(f"inode {ino} {sorted(names)}: nlink {nlinks[ino]}, {len(names)} names")
    return Tree(entries, frozenset(frozenset(g) for g in by_ino.values())), problems


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
