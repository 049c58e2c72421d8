"""Where each node listens: one small file per node in the common block directory.

    BLOCKDIR/cluster/nodes/NAME    the node's HOST:PORT (written when the node starts)
    BLOCKDIR/cluster/witness       the two-node tie-break record (membership/witness.py)
    BLOCKDIR/cluster/snapshots/    replica copies for members too far behind the commit log
                                   (txn/driver.py; each removed once installed)

Every node shares the block directory by definition, so this is how the nodes find each
other's addresses from the names in a membership view. Node names are checked before they
become file names, so nothing here can escape the directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class RegistryError(Exception):
    """An invalid node name; the message is one line for the operator."""


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name.startswith(("cli-", "key-")):  # clients' identities
        raise RegistryError(f"invalid node name {name!r}: use up to 63 letters, digits, "
                            "'.', '_' or '-', starting with a letter or digit")
    return name


class Registry:
    def __init__(self, blockdir_root: Path) -> None:
        self.cluster_dir = blockdir_root / "cluster"
        self._nodes = self.cluster_dir / "nodes"
        self.snapshots_dir = self.cluster_dir / "snapshots"

    def register(self, name: str, address: str) -> None:
        self._nodes.mkdir(parents=True, exist_ok=True)
        path = self._nodes / check_name(name)
        tmp = self._nodes / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(address + "\n")
        os.replace(tmp, path)

    def address(self, name: str) -> str | None:
        try:
            return (self._nodes / check_name(name)).read_text().strip() or None
        except (OSError, RegistryError):
            return None
