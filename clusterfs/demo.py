"""`clusterfs demo`: format a block directory, mount a node, take a short tour, wait.

Until the cluster lands this is a single node; it grows into a 3-node cluster on loopback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MOUNT_TIMEOUT_S = 20.0


def _clusterfs() -> list[str]:
    return [sys.executable, "-m", "clusterfs.cli"]


def _say(text: str) -> None:
    print(text, flush=True)


def _tour(mnt: Path) -> None:
    _say(f"\n$ mkdir -p {mnt}/projects/demo && echo hello > {mnt}/projects/demo/hello.txt")
    (mnt / "projects" / "demo").mkdir(parents=True, exist_ok=True)
    (mnt / "projects" / "demo" / "hello.txt").write_text("hello from clusterfs\n")
    _say(f"$ cat {mnt}/projects/demo/hello.txt")
    _say((mnt / "projects" / "demo" / "hello.txt").read_text().rstrip())
    os.rename(mnt / "projects" / "demo" / "hello.txt", mnt / "projects" / "hello.txt")
    _say(f"$ mv .../demo/hello.txt {mnt}/projects/ && ls -l {mnt}/projects")
    for entry in sorted(os.scandir(mnt / "projects"), key=lambda e: e.name):
        st = entry.stat(follow_symlinks=False)
        _say(f"  {oct(st.st_mode)[-6:]}  {st.st_nlink}  {st.st_size:>6}  {entry.name}")


def _wait_for_mount(mnt: Path, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    while not os.path.ismount(mnt):
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("clusterfs demo: the node did not mount")
        time.sleep(0.05)


def run_demo(base: Path | None, wait: bool) -> int:
    base = Path(tempfile.mkdtemp(prefix="clusterfs-demo-")) if base is None else base
    blocks, mnt, state = base / "blocks", base / "mnt", base / "state-n1"
    mnt.mkdir(parents=True, exist_ok=True)
    if not (blocks / "clusterfs.format").exists():
        subprocess.run([*_clusterfs(), "format", str(blocks)], check=True)
    daemon = subprocess.Popen([*_clusterfs(), "mount", str(blocks), str(mnt), "--node", "n1",
                               "--state", str(state), "--listen", "127.0.0.1:7101", "-f"])
    try:
        _wait_for_mount(mnt, daemon)
        _say(f"node n1 is serving {blocks} on {mnt}")
        _tour(mnt)
        if wait:
            _say(f"\nThe file system stays mounted on {mnt}. Press Ctrl-C to stop.")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    _say("stopped")
    return 0
