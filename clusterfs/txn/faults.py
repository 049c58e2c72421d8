"""Crash points for tests: a node kills itself at a chosen step of the commit protocol.

`CLUSTERFS_TEST_CRASH_AT=KIND@N` makes the node SIGKILL itself instead of sending its N-th
message of type KIND to a peer (for example `Decide@1`: the leader has every vote and has
decided, and no member has heard the decision; `Prepare@2`: one member got the prepare).
Unset, it costs one comparison per message. Tests use it to check that a crash at every
step of the protocol loses no change that returned success and leaves no replicas apart
(the membership issue's acceptance); nothing else may set it.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "CLUSTERFS_TEST_CRASH_AT"
log = logging.getLogger(__name__)


class CrashPoint:
    def __init__(self, spec: str | None) -> None:
        self.kind = ""
        self._at = 0
        self._seen = 0
        if spec:
            kind, _, count = spec.partition("@")
            if not kind or not (count or "1").isdigit():
                log.warning("ignoring %s=%r: expected KIND@N, e.g. Decide@1", ENV, spec)
                return
            self.kind, self._at = kind, int(count or "1")

    def before_send(self, kind: str) -> None:
        if kind != self.kind:
            return
        self._seen += 1
        if self._seen == self._at:
            os.kill(os.getpid(), signal.SIGKILL)


def from_environment() -> CrashPoint:
    return CrashPoint(os.environ.get(ENV))
