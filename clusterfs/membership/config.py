"""Timeouts of the membership core (all in seconds of the driver's clock).

Ordering that keeps rule 4 ("offline means offline"):
  heartbeat_interval_s  <  offline_timeout_s  <  suspect_timeout_s
A node cut off from its majority stops serving `offline_timeout_s` after it
last heard enough peers; the others begin removing it only at
`suspect_timeout_s`, so by the time the new view exists the cut-off node
already answers EIO (given clocks that run at roughly the same rate).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MembershipConfig:
    heartbeat_interval_s: float = 0.5
    offline_timeout_s: float = 2.5
    suspect_timeout_s: float = 3.0
    propose_timeout_s: float = 1.0
    join_retry_s: float = 1.0
    join_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval_s < self.offline_timeout_s:
            raise ValueError("need 0 < heartbeat_interval_s < offline_timeout_s")
        if not self.offline_timeout_s <= self.suspect_timeout_s:
            raise ValueError("need offline_timeout_s <= suspect_timeout_s")
        if self.propose_timeout_s <= 0 or self.join_retry_s <= 0:
            raise ValueError("timeouts must be positive")
