"""A simulated client for `lb.sim`: connect, hold, close, idle, again.

Why a separate module: the client's small state machine (waiting for an
answer, holding a session, idle) is independent of the cluster model, and the
sim stays readable. Scheduled events carry the state they were made for and do
nothing if the client moved on (a late timer after a late accept, say).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lb.messages import ClientReply, SessionBusy, SessionRequest

if TYPE_CHECKING:
    from lb.sim import Simulation


class SimClient:
    """One client: at most one session at a time, one request in flight."""

    def __init__(self, sim: Simulation, index: int) -> None:
        self.sim = sim
        self.client_id = f"client-{index:05d}"
        per_network = sim.config.clients_per_network
        network, host = divmod(index, per_network)
        self.addr = f"10.{network // 256 % 256}.{network % 256}.{host + 1}"
        self.attempt = 0
        self.waiting: str | None = None
        self.session_node: str | None = None
        self.session_id: str | None = None
        self.sessions = 0

    def connect(self) -> None:
        """Send a new session request to every node (unless busy already)."""
        if self.session_node is not None or self.waiting is not None:
            return
        if self.sim.clients_stopped:
            return
        self.attempt += 1
        request_id = f"{self.client_id}#{self.attempt}"
        self.waiting = request_id
        self.sim.deliver_request(self, SessionRequest(request_id, self.client_id, self.addr))
        self.sim.loop.after(self.sim.config.answer_timeout_s, self._timed_out, request_id)

    def _timed_out(self, request_id: str) -> None:
        if self.waiting == request_id:
            self.sim.metrics.client_timeouts += 1
            self.waiting = None
            self.connect()

    def _retry(self, attempt: int) -> None:
        if attempt == self.attempt and self.waiting is None:
            self.connect()

    def on_reply(self, message: ClientReply) -> None:
        """An accept or a busy reply arrived."""
        if isinstance(message, SessionBusy):
            if self.waiting == message.request_id:
                self.waiting = None
                self.sim.loop.after(message.retry_after_s, self._retry, self.attempt)
            return
        if self.session_node is not None:
            # A second accept (a late one for an earlier attempt): give it back.
            self.sim.deliver_close(self, message.node, message.session_id)
            return
        self.waiting = None
        self.session_node = message.node
        self.session_id = message.session_id
        self.sessions += 1
        hold_s = self.sim.delay(self.sim.config.hold_s)
        self.sim.loop.after(hold_s, self._close, message.session_id)

    def _close(self, session_id: str) -> None:
        if self.session_id != session_id or self.session_node is None:
            return
        self.sim.deliver_close(self, self.session_node, session_id)
        self.session_node = self.session_id = None
        self.sim.loop.after(self.sim.idle_time(), self._retry, self.attempt)

    def lost(self, node: str) -> None:
        """The session's node went away; connect again."""
        if self.session_node != node:
            return
        self.session_node = self.session_id = None
        self.connect()
