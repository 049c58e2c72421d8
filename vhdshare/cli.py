"""The `vhdshare` command line: one argparse subparser and one small function per command.

This is the error boundary of the CLI layer: any ImageError or OSError becomes
one line on stderr and exit status 1; usage mistakes exit with status 2.
Later commands (`attach`, `pr`) plug in as further subparsers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from vhdshare.attach import AttachError
from vhdshare.attach import add_parser as add_attach_parser
from vhdshare.blockimage import SECTOR_SIZE, ImageError, RawImage
from vhdshare.check import REPAIRABLE, REPAIRED, check_image
from vhdshare.convert import TARGET_TYPES, convert
from vhdshare.image import create_image, looks_like_vhd, open_image
from vhdshare.prcli import PrError
from vhdshare.prcli import add_parser as add_pr_parser

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


class CliError(Exception):
    """A user mistake found by the CLI itself."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_size(text: str) -> int:
    """'10G', '512M', '1.5G', '4096' -> bytes (binary units)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 10G, 512M, 1048576)")
    number, unit = match.groups()
    size_bytes = int(float(number) * _SIZE_UNITS[unit.upper()]) if "." in number \
        else int(number) * _SIZE_UNITS[unit.upper()]
    return size_bytes


def format_size(size_bytes: int) -> str:
    for unit in ("T", "G", "M", "K"):
        scale = _SIZE_UNITS[unit]
        if size_bytes >= scale:
            return f"{size_bytes / scale:.4g} {unit}iB"
    return f"{size_bytes} B"


def cmd_create(args: argparse.Namespace) -> int:
    create_image(args.path, args.size, args.type)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    facts = image_facts(args.path)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    for key, value in facts.items():
        if key == "geometry":
            value = f"{value['cylinders']}/{value['heads']}/{value['sectors_per_track']} (C/H/S)"
        elif key.endswith("_bytes") and isinstance(value, int):
            value = f"{format_size(value)} ({value} bytes)"
        print(f"{key.removesuffix('_bytes').replace('_', ' ')}: {value}")
    return 0


def image_facts(path: str) -> dict[str, Any]:
    if looks_like_vhd(path):
        with open_image(path) as image:
            return image.info()
    with RawImage(path) as raw:
        return {"path": path, "format": "raw", "virtual_size_bytes": raw.size_bytes}


def cmd_check(args: argparse.Namespace) -> int:
    problems = check_image(args.path, repair=args.repair)
    for problem in problems:
        print(problem)
    unrepaired = [p for p in problems if not p.endswith(REPAIRED)]
    if not problems:
        print(f"{args.path}: no problems found")
    elif not unrepaired:
        print(f"{args.path}: all problems repaired")
    elif any(p.endswith(REPAIRABLE) for p in unrepaired):
        print(f"{args.path}: {len(unrepaired)} problem(s); try --repair", file=sys.stderr)
    else:
        print(f"{args.path}: {len(unrepaired)} problem(s) that cannot be repaired safely "
              "(restore the image from a backup)", file=sys.stderr)
    return 1 if unrepaired else 0


def cmd_convert(args: argparse.Namespace) -> int:
    bar = ProgressBar() if sys.stderr.isatty() else None
    try:
        convert(args.src, args.dst, args.type, bar)
    finally:
        if bar is not None:
            bar.finish()
    return 0


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most once per percent."""

    def __init__(self, width: int = 40) -> None:
        self.width = width
        self.last_percent = -1

    def __call__(self, done_sectors: int, total_sectors: int) -> None:
        percent = 100 * done_sectors // max(total_sectors, 1)
        if percent == self.last_percent:
            return
        self.last_percent = percent
        filled = self.width * percent // 100
        done_text = format_size(done_sectors * SECTOR_SIZE)
        bar = "#" * filled + "-" * (self.width - filled)
        sys.stderr.write(f"\r[{bar}] {percent:3d}% {done_text}   ")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.last_percent >= 0:
            sys.stderr.write("\n")
            sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vhdshare", description="Virtual hard disks (VHD) shared by VMs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    create = commands.add_parser("create", help="create an empty VHD")
    create.add_argument("path")
    create.add_argument("--size", required=True, type=parse_size, help="e.g. 10G, 512M")
    create.add_argument("--type", choices=("fixed", "dynamic"), default="dynamic")
    create.set_defaults(func=cmd_create)
    info = commands.add_parser("info", help="show facts about an image")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)
    check = commands.add_parser("check", help="look for problems in a VHD")
    check.add_argument("path")
    check.add_argument("--repair", action="store_true", help="repair what is safe to repair")
    check.set_defaults(func=cmd_check)
    conv = commands.add_parser("convert", help="copy a disk to raw, fixed or dynamic (sparse)")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--type", choices=TARGET_TYPES, required=True)
    conv.set_defaults(func=cmd_convert)
    add_pr_parser(commands)
    add_attach_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ImageError, OSError, CliError, AttachError) as exc:
        print(f"vhdshare: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except PrError as exc:
        print(f"vhdshare: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("vhdshare: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":  # `vhdshare attach` starts itself again this way, in the background
    sys.exit(main())
