"""`clusterfs client`: the file protocol from the command line, for hosts without a mount.

    clusterfs client --cluster HOST:PORT[,...] --credentials FILE \
                     ls|stat|cat|put|get|mkdir|rm|mv PATH...

Each run opens one session (lb picks the node), does its work and closes it. Paths are
cluster paths (absolute); `put` and `get` name one local file and one cluster path.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from clusterfs.client import Client
from clusterfs.credentials import load_credentials
from clusterfs.protocol.messages import MAX_IO_BYTES, Attrs

CHUNK_BYTES = min(1 << 20, MAX_IO_BYTES)
ACTIONS = ("ls", "stat", "cat", "put", "get", "mkdir", "rm", "mv")


class ClientUsageError(Exception):
    """A command line that cannot work; one line."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("client", help="file operations over the cluster protocol (no mount)")
    p.add_argument("--cluster", required=True, metavar="HOST:PORT[,...]",
                   help="one or more nodes of the cluster")
    p.add_argument("--credentials", required=True, metavar="FILE",
                   help="the cluster's credentials (BLOCKDIR/cluster/credentials)")
    p.add_argument("--id", dest="client_id", help="this client's id (lb affinity)")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_client)


def cmd_client(args: argparse.Namespace) -> int:
    import trio

    cluster = [address.strip() for address in args.cluster.split(",") if address.strip()]
    credentials = load_credentials(Path(args.credentials))
    action = _ACTIONS[args.action]

    async def main() -> None:
        async with Client(cluster, credentials, args.client_id) as client:
            await action(client, args.paths)

    trio.run(main)
    return 0


async def _ls(client: Client, paths: list[str]) -> None:
    for path in paths:
        attrs = await client.stat(path)
        if not stat.S_ISDIR(attrs.mode):
            print(path)
            continue
        if len(paths) > 1:
            print(f"{path}:")
        for entry in await client.listdir(path):
            print(entry.name + ("/" if stat.S_ISDIR(entry.mode) else ""))


async def _stat(client: Client, paths: list[str]) -> None:
    for path in paths:
        print(_describe(path, await client.stat(path)))


def _describe(path: str, attrs: Attrs) -> str:
    return (f"{path}: {stat.filemode(attrs.mode)} ino {attrs.ino} links {attrs.nlink} "
            f"uid {attrs.uid} gid {attrs.gid} size {attrs.size} mtime_ns {attrs.mtime_ns}")


async def _cat(client: Client, paths: list[str]) -> None:
    out = sys.stdout.buffer
    for path in paths:
        await _copy_out(client, path, out.write)
    out.flush()


async def _copy_out(client: Client, path: str, write: Callable[[bytes], object]) -> None:
    handle = await client.open(path, os.O_RDONLY)
    try:
        offset = 0
        while data := await client.read(handle, offset, CHUNK_BYTES):
            write(data)
            offset += len(data)
    finally:
        await client.close(handle)


async def _put(client: Client, paths: list[str]) -> None:
    local, remote = _two(paths, "put LOCAL_FILE CLUSTER_PATH")
    handle = await client.open(remote, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with open(local, "rb") as source:
            offset = 0
            while data := source.read(CHUNK_BYTES):
                await client.write(handle, offset, data)
                offset += len(data)
        await client.fsync(handle)
    finally:
        await client.close(handle)


async def _get(client: Client, paths: list[str]) -> None:
    remote, local = _two(paths, "get CLUSTER_PATH LOCAL_FILE")
    with open(local, "wb") as target:
        await _copy_out(client, remote, target.write)


async def _mkdir(client: Client, paths: list[str]) -> None:
    for path in paths:
        await client.mkdir(path)


async def _rm(client: Client, paths: list[str]) -> None:
    """Remove files, and directories if empty."""
    for path in paths:
        if stat.S_ISDIR((await client.stat(path)).mode):
            await client.rmdir(path)
        else:
            await client.unlink(path)


async def _mv(client: Client, paths: list[str]) -> None:
    old, new = _two(paths, "mv OLD_PATH NEW_PATH")
    await client.rename(old, new)


def _two(paths: list[str], usage: str) -> tuple[str, str]:
    if len(paths) != 2:
        raise ClientUsageError(f"usage: clusterfs client ... {usage}")
    return paths[0], paths[1]


_ACTIONS: dict[str, Callable[[Client, list[str]], Awaitable[None]]] = {
    "ls": _ls, "stat": _stat, "cat": _cat, "put": _put, "get": _get, "mkdir": _mkdir,
    "rm": _rm, "mv": _mv,
}
