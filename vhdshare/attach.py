"""`vhdshare attach`: a VM host serves shared disks of the cluster to its VMs over NBD or iSCSI.

    vhdshare attach --cluster HOST:PORT[,...] --credentials FILE --disk CLUSTER_PATH [...]
                    --initiator ID --nbd unix:SOCKET|HOST:PORT [-f]
    vhdshare attach ... --iscsi HOST:PORT [--target-name IQN] [-f]

Each `--disk` is checked first (attached through the cluster, READ CAPACITY), so a cluster
that cannot be reached or a path that is not a disk is one line on stderr and exit status
1, before anything listens. Then the front end serves until SIGTERM or SIGINT, which close
the listeners and the cluster sessions and remove the NBD socket. Without `-f` the command
returns once the disks are served, leaving a background process whose pid it prints.

NBD exports are named by the disks' cluster paths without the leading "/" (the first disk
is also the default export); all its clients act as the one `--initiator`. The iSCSI target
of a disk is `--target-name` or a name derived from its path (printed); each iSCSI
initiator's name is its own reservation identity.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from clusterfs.client import ROUTE_TIMEOUT_S
from clusterfs.memory import keep_freed_memory

_Parser = TypeVar("_Parser", bound=argparse.ArgumentParser)
IQN_PREFIX = "iqn.2026-11.org.clusterfs.vhdshare"
READY = b"ready\n"
log = logging.getLogger(__name__)


class AttachError(Exception):
    """The disks cannot be served; one line."""


def add_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    attach = commands.add_parser("attach", help="serve shared disks to this host's VMs "
                                 "(NBD or iSCSI)")
    attach.add_argument("--cluster", required=True, metavar="HOST:PORT[,...]",
                        help="one or more nodes of the cluster")
    attach.add_argument("--credentials", required=True, metavar="FILE",
                        help="the cluster's credentials or a client key")
    attach.add_argument("--disk", required=True, action="append", metavar="CLUSTER_PATH",
                        help="a disk's path in the cluster (repeat for several disks)")
    attach.add_argument("--initiator", metavar="ID",
                        help="this host's initiator id (NBD: the reservation identity)")
    front = attach.add_mutually_exclusive_group(required=True)
    front.add_argument("--nbd", metavar="unix:SOCKET|HOST:PORT", help="serve NBD here")
    front.add_argument("--iscsi", metavar="HOST:PORT", help="serve iSCSI here")
    attach.add_argument("--target-name", metavar="IQN",
                        help="the iSCSI target name (one disk only)")
    attach.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground (log to stderr)")
    attach.add_argument("--timeout", type=float, default=ROUTE_TIMEOUT_S, metavar="SECONDS",
                        help="give up finding a node of the cluster after this long")
    attach.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    attach.set_defaults(func=cmd_attach)


def target_name_for(path: str) -> str:
    """'/VMs/Disk 1.vhd' -> 'iqn.2026-11.org.clusterfs.vhdshare:vms.disk-1.vhd'."""
    words = re.sub(r"[^a-z0-9.:-]+", "-", path.lower().strip("/").replace("/", "."))
    return f"{IQN_PREFIX}:{words.strip('-') or 'disk'}"


def parse_endpoint(text: str) -> tuple[str, int] | str:
    """'unix:/run/x.sock' -> '/run/x.sock'; '127.0.0.1:10809' -> ('127.0.0.1', 10809)."""
    if text.startswith("unix:"):
        if not text[5:]:
            raise AttachError(f"{text}: no socket path")
        return text[5:]
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise AttachError(f"{text}: expected HOST:PORT or unix:SOCKET")
    return host.strip("[]"), int(port)


def cmd_attach(args: argparse.Namespace) -> int:
    if args.nbd and not args.initiator:
        raise AttachError("--nbd needs --initiator (the reservation identity of its clients)")
    if args.target_name and len(args.disk) > 1:
        raise AttachError("--target-name names one disk; leave it out for several")
    if len(set(args.disk)) != len(args.disk):
        raise AttachError("a disk is named twice")
    parse_endpoint(args.nbd or args.iscsi)
    if not args.foreground:
        return _in_background(args)
    logging.basicConfig(level=logging.WARNING, format="vhdshare: %(message)s")
    keep_freed_memory()  # every request moves up to 32 MiB (clusterfs.memory)
    try:
        trio.run(_serve, args)
    except BaseExceptionGroup as group:  # one failure, raised inside the nursery
        raise _only_leaf(group) from None
    return 0


def _only_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else group


def _in_background(args: argparse.Namespace) -> int:
    """Start this command again with -f, and return once it serves (or failed)."""
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "vhdshare.cli", *sys.argv[1:], "-f", "--ready-fd",
            str(write_fd)]
    with subprocess.Popen(argv, pass_fds=[write_fd], start_new_session=True,
                          stdin=subprocess.DEVNULL) as child:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as ready:
            if ready.read() == READY:
                print(f"vhdshare: attach running as pid {child.pid}")
                child.returncode = 0  # leave it running: Popen's exit must not wait
                return 0
        return child.wait() or 1


async def _serve(args: argparse.Namespace) -> None:
    from clusterfs.credentials import CredentialsError, load_credentials

    try:
        credentials = load_credentials(Path(args.credentials))
    except CredentialsError as exc:
        raise AttachError(str(exc)) from None
    cluster = [address.strip() for address in args.cluster.split(",") if address.strip()]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        backends = await _attach_all(nursery, cluster, credentials, args)
        endpoint = parse_endpoint(args.nbd or args.iscsi)
        async with _listeners(endpoint) as listeners:
            if args.nbd:
                await _start_nbd(nursery, listeners, backends, args)
            else:
                await _start_iscsi(nursery, listeners, backends, args)
            logging.getLogger().setLevel(logging.INFO)  # quiet until the disks are served
            log.info("serving %s over %s at %s", ", ".join(backends),
                     "NBD" if args.nbd else "iSCSI", args.nbd or args.iscsi)
            _report_ready(args.ready_fd)
            await trio.sleep_forever()


async def _attach_all(nursery: trio.Nursery, cluster: list[str], credentials: Any,
                      args: argparse.Namespace) -> dict[str, Any]:
    from vhdshare.cluster_backend import ClusterBackend
    from vhdshare.frontend import BackendError
    from vhdshare.nbd_disk import NbdDisk, NbdRequestError

    backends: dict[str, Any] = {}
    checker = args.initiator or f"vhdshare-attach:{os.uname().nodename}"
    for path in args.disk:
        backend = ClusterBackend(nursery, cluster, credentials, path, args.timeout)
        try:
            await backend.attach(checker)
            await NbdDisk.open(backend, checker)  # READ CAPACITY: it is a disk
        except (BackendError, NbdRequestError) as exc:
            raise AttachError(str(exc)) from None
        backends[path] = backend
    return backends


async def _start_nbd(nursery: trio.Nursery, listeners: Sequence[trio.abc.Listener[Any]],
                     backends: dict[str, Any], args: argparse.Namespace) -> None:
    from vhdshare.nbd_disk import NbdDisk
    from vhdshare.nbd_server import serve_nbd

    disks = {path: await NbdDisk.open(backend, args.initiator)
             for path, backend in backends.items()}
    await nursery.start(serve_nbd, listeners, disks)


async def _start_iscsi(nursery: trio.Nursery, listeners: Sequence[trio.abc.Listener[Any]],
                       backends: dict[str, Any], args: argparse.Namespace) -> None:
    from vhdshare.iscsi_server import serve_iscsi

    targets = {args.target_name or target_name_for(path): backend
               for path, backend in backends.items()}
    if len(targets) != len(backends):
        raise AttachError("two disks would have one iSCSI target name")
    await nursery.start(serve_iscsi, listeners, targets)
    for name, backend in targets.items():
        print(f"{backend.path}: iSCSI target {name}, LUN 0", flush=True)


@contextlib.asynccontextmanager
async def _listeners(endpoint: tuple[str, int] | str
                     ) -> AsyncIterator[list[trio.abc.Listener[Any]]]:
    if isinstance(endpoint, tuple):
        host, port = endpoint
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise AttachError(f"{host}:{port}: {exc.strerror}") from None
        yield list(listeners)
        return
    listener = await _unix_listener(endpoint)
    try:
        yield [listener]
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint)


async def _unix_listener(path: str) -> trio.SocketListener:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(path)
    except OSError as exc:
        sock.close()
        raise AttachError(f"{path}: {exc.strerror}") from None
    sock.listen(64)
    return trio.SocketListener(sock)


def _report_ready(ready_fd: int | None) -> None:
    if ready_fd is None:
        return
    os.write(ready_fd, READY)
    os.close(ready_fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (1, 2):  # the caller's terminal is not ours any more
        os.dup2(devnull, fd)
    os.close(devnull)


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping (%s)", signal.Signals(signum).name)
            scope.cancel()
            return
