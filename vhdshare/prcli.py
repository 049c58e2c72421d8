"""`vhdshare pr`: persistent reservations on a shared disk, for operators and fencing scripts.

    vhdshare pr --cluster HOST:PORT[,...] --credentials FILE --disk CLUSTER_PATH \
                --initiator ID ACTION [options]

One run attaches the disk for the initiator (`host.RemoteDisk`), sends one PERSISTENT
RESERVE IN or OUT command and detaches. The words and exit statuses are sg_persist's, so
that a fencing script written for sg_persist reads them unchanged: the PR IN actions print
sg_persist's lines, the PR OUT actions print nothing, a RESERVATION CONFLICT exits 24 and
any other failure exits 1 (one line on stderr); usage mistakes exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from vhdshare.initiator import TYPE_NAMES, Keys, ReservationInfo
from vhdshare.reservations import PrType

if TYPE_CHECKING:
    from vhdshare.host import RemoteDisk

RESERVATION_CONFLICT_EXIT = 24  # sg_persist's SG_LIB_CAT_RECONFLICT
MAX_KEY = (1 << 64) - 1
DEFAULT_TIMEOUT_S = 20.0  # a fencing script wants an answer soon
TYPE_WORDS = {"we": PrType.WRITE_EXCLUSIVE, "ea": PrType.EXCLUSIVE_ACCESS,
              "we-ro": PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
              "ea-ro": PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
              "we-ar": PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
              "ea-ar": PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS}
_Parser = TypeVar("_Parser", bound=argparse.ArgumentParser)
_KEY_RE = re.compile(r"(?:0[xX])?([0-9a-fA-F]+)")
_TYPES_HELP = "1|3|5|6|7|8 or we|ea|we-ro|ea-ro|we-ar|ea-ar"


class PrError(Exception):
    """A reservation command that failed; one line, with sg_persist's exit status."""

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


# -- parsing -------------------------------------------------------------------------------
def parse_key(text: str) -> int:
    """'0xA1' or 'a1' -> a reservation key: hex, with or without 0x, as sg_persist reads
    keys, so that a fencing script's keys mean the same here."""
    match = _KEY_RE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid key {text!r} (hex: 0xabc123 or abc123)")
    key = int(match.group(1), 16)
    if key > MAX_KEY:
        raise argparse.ArgumentTypeError(f"invalid key {text!r} (a key is 8 bytes)")
    return key


def parse_type(text: str) -> PrType:
    """'5', 'we-ro' -> PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY."""
    word = text.strip().lower()
    if word in TYPE_WORDS:
        return TYPE_WORDS[word]
    try:
        return PrType(int(word, 10))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid reservation type {text!r} (use {_TYPES_HELP})") from None


def add_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    pr = commands.add_parser("pr", help="persistent reservations on a shared disk "
                             "(like sg_persist)")
    pr.add_argument("--cluster", required=True, metavar="HOST:PORT[,...]",
                    help="one or more nodes of the cluster")
    pr.add_argument("--credentials", required=True, metavar="FILE",
                    help="the cluster's credentials (BLOCKDIR/cluster/credentials)")
    pr.add_argument("--disk", required=True, metavar="CLUSTER_PATH",
                    help="the disk's path in the cluster")
    pr.add_argument("--initiator", required=True, metavar="ID",
                    help="this VM host's initiator id (the one its attach uses)")
    pr.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                    help="give up finding a node of the cluster after this long "
                         f"(default {DEFAULT_TIMEOUT_S:g})")
    pr.set_defaults(func=cmd_pr)
    actions = pr.add_subparsers(dest="action", required=True, metavar="ACTION")
    register = _add_action(actions, "register", "register a key (--key 0 unregisters)",
                           key=True)
    register.add_argument("--old-key", type=parse_key, default=0, metavar="K",
                          help="the key registered now, if any")
    register.add_argument("--ignore-existing", action="store_true",
                          help="replace whatever key is registered now")
    register.add_argument("--aptpl", action="store_true",
                          help="activate persist through power loss")
    _add_action(actions, "reserve", "reserve the disk", key=True, pr_type=True)
    _add_action(actions, "release", "release the reservation", key=True, pr_type=True)
    _add_action(actions, "clear", "release the reservation and remove every key", key=True)
    preempt = _add_action(actions, "preempt", "remove another key (and its reservation)",
                          key=True, pr_type=True)
    preempt.add_argument("--preempt-key", required=True, type=parse_key, metavar="K",
                         help="the key to remove")
    preempt.add_argument("--abort", action="store_true", help="PREEMPT AND ABORT")
    _add_action(actions, "read-keys", "list the registered keys")
    _add_action(actions, "read-reservation", "show the reservation held")


def _add_action(actions: argparse._SubParsersAction[_Parser], name: str, help_text: str,
                *, key: bool = False, pr_type: bool = False) -> _Parser:
    action = actions.add_parser(name, help=help_text)
    if key:
        action.add_argument("--key", required=True, type=parse_key, metavar="K",
                            help="this initiator's reservation key (hex, as sg_persist)")
    if pr_type:
        action.add_argument("--type", dest="pr_type", required=True, type=parse_type,
                            metavar="T", help=_TYPES_HELP)
    return action


# -- running -------------------------------------------------------------------------------
def cmd_pr(args: argparse.Namespace) -> int:
    import trio

    from clusterfs.credentials import CredentialsError, load_credentials
    from vhdshare.host import DiskError, RemoteDisk, ScsiError
    from vhdshare.scsi import Status

    cluster = [address.strip() for address in args.cluster.split(",") if address.strip()]
    action = _ACTIONS[args.action]

    async def main() -> list[str]:
        async with RemoteDisk.attach(cluster, credentials, args.disk, args.initiator,
                                     route_timeout_s=args.timeout) as disk:
            return await action(disk, args)

    try:
        credentials = load_credentials(Path(args.credentials))
        lines = trio.run(main)
    except ScsiError as exc:
        conflict = exc.status == Status.RESERVATION_CONFLICT
        raise PrError(str(exc), RESERVATION_CONFLICT_EXIT if conflict else 1) from None
    except (DiskError, CredentialsError) as exc:
        raise PrError(str(exc)) from None
    for line in lines:
        print(line)
    return 0


async def _register(disk: RemoteDisk, args: argparse.Namespace) -> list[str]:
    await disk.register(args.key, args.old_key, ignore_existing=args.ignore_existing,
                        aptpl=args.aptpl)
    return []


async def _reserve(disk: RemoteDisk, args: argparse.Namespace) -> list[str]:
    await disk.reserve(args.key, args.pr_type)
    return []


async def _release(disk: RemoteDisk, args: argparse.Namespace) -> list[str]:
    await disk.release(args.key, args.pr_type)
    return []


async def _clear(disk: RemoteDisk, args: argparse.Namespace) -> list[str]:
    await disk.clear(args.key)
    return []


async def _preempt(disk: RemoteDisk, args: argparse.Namespace) -> list[str]:
    await disk.preempt(args.key, args.preempt_key, args.pr_type, abort=args.abort)
    return []


async def _read_keys(disk: RemoteDisk, args: argparse.Namespace) -> list[str]:
    return format_keys(await disk.read_keys())


async def _read_reservation(disk: RemoteDisk, args: argparse.Namespace) -> list[str]:
    return format_reservation(await disk.read_reservation())


_ACTIONS: dict[str, Callable[[RemoteDisk, argparse.Namespace], Awaitable[list[str]]]] = {
    "register": _register, "reserve": _reserve, "release": _release, "clear": _clear,
    "preempt": _preempt, "read-keys": _read_keys, "read-reservation": _read_reservation,
}


# -- sg_persist's words ----------------------------------------------------------------------
def format_keys(keys: Keys) -> list[str]:
    head = f"  PR generation={keys.generation:#x}, "
    count = len(keys.keys)
    if count == 0:
        return [head + "there are NO registered reservation keys"]
    follow = "1 registered reservation key follows:" if count == 1 \
        else f"{count} registered reservation keys follow:"
    return [head + follow, *(f"    {key:#x}" for key in keys.keys)]


def format_reservation(info: ReservationInfo) -> list[str]:
    head = f"  PR generation={info.generation:#x}, "
    held = info.reservation
    if held is None:
        return [head + "there is NO reservation held"]
    return [head + "Reservation follows:", f"    Key={held.key:#x}",
            f"    scope: LU_SCOPE,  type: {TYPE_NAMES[held.type]}"]
