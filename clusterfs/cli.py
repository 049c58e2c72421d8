"""The `clusterfs` command line: format, mount, fsck, demo.

The CLI is the outermost error boundary: any expected failure is one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import trio

from clusterfs import clientcli, fsck, status
from clusterfs.blockdir import BlockDirError, format_blockdir, open_blockdir
from clusterfs.client import ClientError
from clusterfs.credentials import (
    CREDENTIALS_FILE,
    Credentials,
    CredentialsError,
    create_client_key,
    credentials_path,
    load_credentials,
    revoke_client_key,
)
from clusterfs.membership.driver import stored_view
from clusterfs.memory import keep_freed_memory
from clusterfs.node import NodeConfig, NodeError, open_replica, run
from clusterfs.status import StatusError
from clusterfs.store import Store

log = logging.getLogger("clusterfs")

LOCK_FILE = "lock"
PID_FILE = "clusterfs.pid"
LOG_FILE = "clusterfs.log"
PROGRESS_PREFIX = "progress: "  # a line from the starting daemon to show, not its verdict
LEAVE_TIMEOUT_S = 30.0


class UsageError(Exception):
    """A mistake of the operator's, reported as one line."""


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{text}: expected HOST:PORT")
    return host, int(port)


def lock_state_dir(state_dir: Path) -> int:
    """Hold the state directory for this process (and a daemon forked from it)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = _read_pid(state_dir)
        raise UsageError(f"{state_dir}: in use by a running node (pid {pid})") from None
    return fd


def _read_pid(state_dir: Path) -> str:
    try:
        return (state_dir / PID_FILE).read_text().strip()
    except OSError:
        return "unknown"


# -- format -------------------------------------------------------------------------------

def cmd_format(args: argparse.Namespace) -> int:
    blockdir = format_blockdir(Path(args.blockdir))
    print(f"formatted {blockdir.root} (cluster {blockdir.cluster_id})")
    return 0


# -- mount --------------------------------------------------------------------------------

def check_mount_args(args: argparse.Namespace) -> None:
    open_blockdir(Path(args.blockdir))
    mountpoint = Path(args.mountpoint)
    if not mountpoint.exists():
        raise UsageError(f"{mountpoint}: mount point does not exist")
    if not mountpoint.is_dir():
        raise UsageError(f"{mountpoint}: mount point is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint}: mount point is busy (already mounted)")
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing (load the fuse module: modprobe fuse)")
    parse_address(args.listen)
    if args.join:
        parse_address(args.join)


def _node_config(args: argparse.Namespace) -> NodeConfig:
    options = [o for opt in args.o for o in opt.split(",")]
    return NodeConfig(Path(args.blockdir).resolve(), Path(args.mountpoint).resolve(), args.node,
                      Path(args.state).resolve(), args.listen, args.join, options)


def _run_node(args: argparse.Namespace, ready: Callable[[], None]) -> None:
    config = _node_config(args)
    keep_freed_memory()  # disk commands move 1 MiB buffers (clusterfs.memory)
    (config.state_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    try:
        run(config, ready)
    finally:
        with contextlib.suppress(OSError):
            (config.state_dir / PID_FILE).unlink()


def cmd_mount(args: argparse.Namespace) -> int:
    check_mount_args(args)
    lock_state_dir(Path(args.state))
    if args.foreground:
        _setup_logging(args.verbose)
        _run_node(args, lambda: log.info("mounted %s on %s", args.blockdir, args.mountpoint))
        return 0
    return _daemonize(args)


def _daemonize(args: argparse.Namespace) -> int:
    """Fork; the parent returns once the child's mount is live (or with its one-line error),
    showing the child's progress lines (a long catch-up) meanwhile."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = _relay_progress(pipe)
        if message == "ok":
            return 0
        os.waitpid(pid, 0)
        raise UsageError(message or f"mount failed (see {Path(args.state) / LOG_FILE})")
    os.close(read_fd)
    os._exit(_daemon_child(args, write_fd))


def _relay_progress(pipe: BinaryIO) -> str:
    """Print the child's `progress` lines to stderr; return its final message."""
    for raw in pipe:
        line = raw.decode(errors="replace").rstrip("\n")
        if line.startswith(PROGRESS_PREFIX):
            print(line.removeprefix(PROGRESS_PREFIX), file=sys.stderr, flush=True)
        else:
            return line.strip()
    return ""


class _ProgressToPipe(logging.Handler):
    """Forwards the node's progress lines to the waiting parent until the mount is live."""

    def __init__(self, write_fd: int) -> None:
        super().__init__(logging.INFO)
        self.write_fd: int | None = write_fd
        self.guard = threading.Lock()  # progress comes from worker threads

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage().replace("\n", " ")
        with self.guard, contextlib.suppress(OSError):
            if self.write_fd is not None:
                os.write(self.write_fd, f"{PROGRESS_PREFIX}{line}\n".encode())


def _daemon_child(args: argparse.Namespace, write_fd: int) -> int:
    os.setsid()
    log_path = Path(args.state).resolve() / LOG_FILE
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    _setup_logging(args.verbose)
    to_parent = _ProgressToPipe(write_fd)
    logging.getLogger("clusterfs.progress").addHandler(to_parent)

    def ready() -> None:
        with to_parent.guard:  # no progress line may go to a closed (or reused) fd
            to_parent.write_fd = None
            os.write(write_fd, b"ok\n")
            os.close(write_fd)

    try:
        _run_node(args, ready)
        return 0
    except Exception as exc:
        log.exception("node failed")
        with contextlib.suppress(OSError):
            os.write(write_fd, f"{exc}\n".encode())
        return 1


# -- fsck ---------------------------------------------------------------------------------

def cmd_fsck(args: argparse.Namespace) -> int:
    blockdir = open_blockdir(Path(args.blockdir))
    state_dir = Path(args.state)
    if not (state_dir / "replica").exists():
        raise UsageError(f"{state_dir}: no replica here")
    lock_fd = lock_state_dir(state_dir)
    store = open_replica(state_dir, blockdir)
    try:
        report = fsck.check(store, blockdir)
        for line in report.lines():
            print(line)
        if report.clean:
            print("clean")
            return 0
        if not args.repair:
            print("problems found; run again with --repair to fix what can be fixed")
            return 1
        _refuse_repair_of_a_member(store, state_dir)
        fsck.repair(store, blockdir, report)
        print("repaired")
        return 0
    finally:
        store.close()
        os.close(lock_fd)


def _refuse_repair_of_a_member(store: Store, state_dir: Path) -> None:
    """Repairs change this replica alone and take what it does not know for damage: on a
    member of a cluster of several nodes, whose replica may be behind the others, that
    would remove files made since, and purge inodes on one replica only. Such a node
    repairs the block directory itself once it has started and caught up."""
    view = stored_view(store)
    if view is not None and len(view.members) > 1:
        raise UsageError(
            f"{state_dir}: not repaired: this node is one of {len(view.members)} members "
            f"({', '.join(view.members)}) and its replica may be behind theirs; start it "
            "(it repairs the block directory once it has caught up)")


# -- status, leave ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Target:
    address: str
    credentials: Credentials


def _target(args: argparse.Namespace) -> _Target:
    """The node to ask and the credentials to ask it with."""
    given = load_credentials(Path(args.credentials)) if args.credentials else None
    if getattr(args, "connect", None):
        parse_address(args.connect)
        if given is None:
            raise UsageError("--connect needs the cluster's credentials: add --credentials "
                             f"BLOCKDIR/{CREDENTIALS_FILE}")
        return _Target(str(args.connect), given)
    if not args.mountpoint:
        raise UsageError("give a MOUNTPOINT or --connect HOST:PORT")
    node = status.node_of_mount(Path(args.mountpoint))
    return _Target(node.address, given or load_credentials(credentials_path(node.blockdir)))


def cmd_status(args: argparse.Namespace) -> int:
    target = _target(args)
    nodes = trio.run(status.cluster_status, target.address, target.credentials)
    print(status.render_json(nodes) if args.json else status.render_table(nodes))
    return 0


def cmd_leave(args: argparse.Namespace) -> int:
    target = _target(args)
    reply = trio.run(status.ask, target.address, status.LeaveRequest(), target.credentials)
    assert isinstance(reply, status.LeaveReply)
    deadline_s = time.monotonic() + LEAVE_TIMEOUT_S
    while _alive(reply.pid) and os.path.ismount(args.mountpoint):
        if time.monotonic() > deadline_s:
            raise UsageError(f"node (pid {reply.pid}) did not leave within {LEAVE_TIMEOUT_S:g} s")
        time.sleep(0.1)
    print(f"left the cluster; {args.mountpoint} unmounted")
    return 0


def cmd_client_key(args: argparse.Namespace) -> int:
    blockdir = open_blockdir(Path(args.blockdir)).root
    if args.revoke:
        revoke_client_key(blockdir, args.name)
        print(f"client key {args.name} revoked (new connections are refused)")
        return 0
    if not args.file:
        raise UsageError("give the FILE to write the new key to (or --revoke)")
    create_client_key(blockdir, args.name, Path(args.file))
    print(f"client key {args.name} written to {args.file}; use it with --credentials")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- demo ---------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from clusterfs.demo import run_demo

    return run_demo(Path(args.dir) if args.dir else None, wait=not args.no_wait)


# -- wiring -------------------------------------------------------------------------------

def _setup_logging(verbose: bool) -> None:
    """Log to stderr (the daemon's stderr is its log file in the state directory)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clusterfs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("format", help="initialise the common block directory")
    p.add_argument("blockdir")
    p.set_defaults(func=cmd_format)

    p = sub.add_parser("mount", help="start this node and mount")
    p.add_argument("blockdir")
    p.add_argument("mountpoint")
    p.add_argument("--node", required=True, help="this node's name")
    p.add_argument("--state", required=True, help="this node's state directory")
    p.add_argument("--listen", required=True, help="HOST:PORT for the cluster protocol")
    p.add_argument("--join", help="HOST:PORT of a running member: join its cluster")
    p.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-o", action="append", default=[], help="extra FUSE mount options")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("status", help="members, epoch, leader, applied sequence, digests")
    p.add_argument("mountpoint", nargs="?")
    p.add_argument("--connect", metavar="HOST:PORT", help="ask the node listening there")
    p.add_argument("--json", action="store_true")
    _credentials_option(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("leave", help="leave the cluster gracefully and unmount")
    p.add_argument("mountpoint")
    _credentials_option(p)
    p.set_defaults(func=cmd_leave)

    p = sub.add_parser("fsck", help="check (and repair) a stopped node against the block dir")
    p.add_argument("blockdir")
    p.add_argument("--state", required=True)
    p.add_argument("--repair", action="store_true")
    p.set_defaults(func=cmd_fsck)

    clientcli.add_parser(sub)

    p = sub.add_parser("client-key", help="make (or --revoke) a file protocol client's key")
    p.add_argument("blockdir")
    p.add_argument("name", help="the client's name in the cluster")
    p.add_argument("file", nargs="?", help="where to write the new key (mode 0600)")
    p.add_argument("--revoke", action="store_true", help="refuse the key from now on")
    p.set_defaults(func=cmd_client_key)

    p = sub.add_parser("demo", help="a 3-node cluster on loopback with a short tour")
    p.add_argument("dir", nargs="?")
    p.add_argument("--no-wait", action="store_true", help="stop after the tour")
    p.set_defaults(func=cmd_demo)
    return parser


def _credentials_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--credentials", metavar="FILE",
                   help=f"the cluster's credentials (default: BLOCKDIR/{CREDENTIALS_FILE} "
                        "of the mount)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (UsageError, BlockDirError, CredentialsError, NodeError, StatusError, ClientError,
            clientcli.ClientUsageError) as exc:
        print(f"clusterfs: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"clusterfs: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
