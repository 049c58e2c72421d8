"""One node's commit machinery: its participant and, while it leads, the coordinator.

The driver feeds a `Member` everything that happens — a view change, a message from a peer
(or from this node itself), a local capture, the answers to `LogDurably` and `Validate`,
and `tick(now_s)` at `next_deadline_s()` — and performs the actions it returns, in order.
Messages for the coordinator (Forward, Vote, Ack, Report) are routed to it; all others to
the participant. Every view change starts a fresh coordinator on the new leader, which
settles the epoch before it commits anything new.
"""

from __future__ import annotations

from clusterfs.records import AnyRecord
from clusterfs.txn.actions import Action
from clusterfs.txn.coordinator import Coordinator, CoordinatorConfig
from clusterfs.txn.messages import TO_COORDINATOR, AnyMessage
from clusterfs.txn.participant import Participant
from clusterfs.txn.view import View


class Member:
    def __init__(self, participant: Participant,
                 coordinator_config: CoordinatorConfig | None = None) -> None:
        self.participant = participant
        self.name = participant.name
        self.coordinator: Coordinator | None = None
        self._coordinator_config = coordinator_config

    @property
    def view(self) -> View | None:
        return self.participant.view

    def on_view(self, view: View, now_s: float) -> list[Action]:
        current = self.participant.view
        if current is not None and view.epoch <= current.epoch:
            return []
        actions = self.participant.on_view(view, now_s)
        self.coordinator = None
        if view.leader == self.name:
            self.coordinator = Coordinator(view, self._coordinator_config)
            actions += self.coordinator.start(now_s)
        return actions

    def on_message(self, sender: str, message: AnyMessage, now_s: float) -> list[Action]:
        if isinstance(message, TO_COORDINATOR):
            if self.coordinator is None:
                return []
            return self.coordinator.on_message(sender, message, now_s)
        return self.participant.on_message(sender, message, now_s)

    def capture(self, record: AnyRecord, now_s: float) -> tuple[int, list[Action]]:
        return self.participant.capture(record, now_s)

    def logged(self, epoch: int, first_seq: int, ok: bool, now_s: float,
               reason: str = "") -> list[Action]:
        return self.participant.logged(epoch, first_seq, ok, now_s, reason)

    def validated(self, epoch: int, first_seq: int, errnos: list[int],
                  now_s: float) -> list[Action]:
        if self.coordinator is None:
            return []
        return self.coordinator.validated(epoch, first_seq, errnos, now_s)

    def tick(self, now_s: float) -> list[Action]:
        actions = self.participant.tick(now_s)
        if self.coordinator is not None:
            actions += self.coordinator.tick(now_s)
        return actions

    def next_deadline_s(self) -> float | None:
        times = [self.participant.next_deadline_s()]
        if self.coordinator is not None:
            times.append(self.coordinator.next_deadline_s())
        present = [t for t in times if t is not None]
        return min(present) if present else None
