"""The `vhdshare` command line."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("vhdshare: no commands yet", file=sys.stderr)
    return 2
