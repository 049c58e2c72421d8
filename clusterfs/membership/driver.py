"""The trio driver of the membership core on one node (see docs/membership.md).

It ticks the core, feeds it the membership messages the transport receives and the
failures the commit layer reports, and performs its actions in order: acceptor state and
views are persisted in the replica's metadata before anything later happens, installed
views go to the commit driver, and going offline stops the commit driver at once.

Catch-up of a joiner: the leader admits a joiner as soon as it asks; the joiner's replica
is brought up to date by the commit layer when the new view starts (the new leader's
settle phase has every member that is behind fetch the committed batches it lacks).
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable

import msgspec
import trio

from clusterfs.membership import events as ev
from clusterfs.membership import messages
from clusterfs.membership.core import Membership
from clusterfs.membership.view import View, to_commit_view
from clusterfs.membership.witness import Witness
from clusterfs.store import Store
from clusterfs.txn.actions import RemoveMember
from clusterfs.txn.driver import CommitDriver

log = logging.getLogger(__name__)

TICK_INTERVAL_S = 0.1
VIEW = b"view"
ACCEPTOR = b"acceptor"
OFFLINE = b"offline"
PERMANENT_OFFLINE = ("removed", "left", "failed")
# A serving node that goes offline for one of these asks the others to admit it again; only
# an online leader can, so this is safe: a node cut off by a partition comes back when the
# partition heals. Not "left" (asked for) and not "failed" (its replica could not apply a
# record and is not to be trusted until it is restarted).
RECOVERABLE_OFFLINE = ("removed", "lost the majority", "no answer from the witness",
                       "the witness of epoch")

SendFrame = Callable[[str, bytes], None]


def stored_view(store: Store) -> View | None:
    with store.read() as view:
        raw = view.get_meta(VIEW)
    return None if raw is None else msgspec.msgpack.decode(raw, type=View)


def _stored_acceptor(store: Store) -> ev.AcceptorState | None:
    with store.read() as view:
        raw = view.get_meta(ACCEPTOR)
    return None if raw is None else msgspec.msgpack.decode(raw, type=ev.AcceptorState)


def stored_offline_reason(store: Store) -> str | None:
    with store.read() as view:
        raw = view.get_meta(OFFLINE)
    return None if raw is None else raw.decode(errors="replace")


class MembershipDriver:
    """Runs this node's `Membership` from one trio task."""

    def __init__(self, name: str, address: str, store: Store, send_frame: SendFrame,
                 commit: CommitDriver, witness: Witness, on_offline: Callable[[str], None]
                 ) -> None:
        self.name = name
        self.address = address
        self._store = store
        self._send_frame = send_frame
        self._commit = commit
        self._witness = witness
        self._on_offline = on_offline
        self._events_in, self._events = trio.open_memory_channel[ev.Event](math.inf)
        self.core: Membership | None = None
        self._rejoin_contacts: tuple[str, ...] = ()
        self._nursery: trio.Nursery | None = None
        self.view_listeners: list[Callable[[View], None]] = []  # told of each view installed

    # -- start-up ---------------------------------------------------------------------------
    def found(self, now_s: float) -> None:
        self.core = Membership.founding(self.name, now_s)
        assert self.core.view is not None
        self._install(self.core.view)

    def restart(self, view: View, now_s: float, contacts: tuple[str, ...]) -> None:
        """Resume from the stored view. A node that was removed meanwhile (it learns so
        from the others' newer epoch) or had been removed before re-joins through
        `contacts` by itself: a restarted node catches up from the others."""
        self._rejoin_contacts = contacts
        offline = stored_offline_reason(self._store)
        self.core = Membership(self.name, view, now_s, acceptor_state=_stored_acceptor(
            self._store), online=offline is None)
        if self.core.online:
            self._commit.on_view(to_commit_view(view))
            self._tell_listeners(view)
        else:
            log.info("offline since the last run (%s); re-joining", offline)
            self._commit.go_offline(offline or "not a member")
            self._rejoin()

    def join(self, contacts: tuple[str, ...], now_s: float) -> None:
        """Ask to be admitted through `contacts` (HOST:PORT of running members)."""
        self.core = Membership(self.name, stored_view(self._store), now_s, online=False)
        self._rejoin_contacts = contacts
        self._rejoin()

    @property
    def rejoining(self) -> bool:
        """Asking to be admitted, or about to (a removed node with contacts)."""
        if self.core is None or self.core.online:
            return False
        return self.core.state == "joining" or (
            bool(self._rejoin_contacts) and not self.core.offline_reason.startswith(
                ("lost", "the witness", "no answer")))

    def stop_rejoining(self) -> None:
        """Once serving, a node that is removed stays offline until it is restarted."""
        self._rejoin_contacts = ()

    def rejoin(self, contacts: tuple[str, ...]) -> None:
        """Ask to be admitted again through `contacts` (a serving node that went offline)."""
        self._rejoin_contacts = contacts
        self._rejoin()

    def _rejoin(self) -> None:
        self._events_in.send_nowait(
            ev.Rejoin(self._rejoin_contacts, self.address, self._commit.applied_seq))

    # -- inputs -----------------------------------------------------------------------------
    def on_frame(self, sender: str, payload: bytes) -> None:
        try:
            message = messages.decode(payload)
        except messages.ProtocolError as exc:
            log.warning("dropped a membership frame from %s: %s", sender[:64], exc)
            return
        self._events_in.send_nowait(message)

    def on_commit_report(self, report: RemoveMember) -> None:
        """What the commit layer asks of the membership layer."""
        self._events_in.send_nowait(ev.MemberFailed(report.node, report.reason))

    def leave(self) -> None:
        self._events_in.send_nowait(messages.Leave(self.name))

    # -- the loop ---------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.core is not None, "found, restart or join first"
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            next_tick_s = trio.current_time()
            while True:
                event: ev.Event = ev.Tick()
                with trio.move_on_at(next_tick_s):
                    event = await self._events.receive()
                now_s = trio.current_time()
                if isinstance(event, ev.Tick):
                    next_tick_s = now_s + TICK_INTERVAL_S
                self._perform(self.core.handle(event, now_s))

    def _perform(self, actions: list[ev.Action]) -> None:
        assert self.core is not None
        queue = collections.deque(actions)
        while queue:
            action = queue.popleft()
            match action:
                case ev.Send(to, message) if to == self.name:
                    queue.extend(self.core.handle(message, trio.current_time()))
                case ev.Send(to, message):
                    self._send_frame(to, messages.encode(message))
                case ev.Persist(state):
                    self._put_meta(ACCEPTOR, msgspec.msgpack.encode(state))
                case ev.InstallView(view):
                    self._install(view)
                case ev.AdmitMember(node):
                    log.info("admitting %s", node)
                    queue.extend(self.core.handle(ev.MemberCaughtUp(node), trio.current_time()))
                case ev.ClaimWitness(epoch, node):
                    assert self._nursery is not None
                    self._nursery.start_soon(self._claim_witness, epoch, node)
                case ev.GoOffline(reason):
                    self._go_offline(reason)

    def _install(self, view: View) -> None:
        with self._store.write() as txn:
            txn.put_meta(VIEW, msgspec.msgpack.encode(view))
            txn.delete_meta(OFFLINE)
        log.info("view %d: members %s, leader %s", view.epoch, ", ".join(view.members),
                 view.leader)
        self._commit.on_view(to_commit_view(view))
        self._tell_listeners(view)

    def _tell_listeners(self, view: View) -> None:
        for listener in self.view_listeners:
            listener(view)

    def _go_offline(self, reason: str) -> None:
        log.warning("going offline: %s", reason)
        if reason.startswith(PERMANENT_OFFLINE):
            # Only a node that is no longer a member must re-join. One that merely lost
            # its majority starts from its view again after a restart (a whole-cluster
            # restart); if the others moved on meanwhile, their newer epoch tells it.
            self._put_meta(OFFLINE, reason.encode())
        self._commit.go_offline(reason)
        if reason.startswith("removed") and self._rejoin_contacts:
            self._rejoin()  # starting up: a restarted node that was removed meanwhile
        self._on_offline(reason)  # serving: the node decides (Node._went_offline)

    def _put_meta(self, key: bytes, value: bytes) -> None:
        with self._store.write() as txn:
            txn.put_meta(key, value)

    async def _claim_witness(self, epoch: int, node: str) -> None:
        granted = await trio.to_thread.run_sync(self._witness.claim, epoch, node)
        self._events_in.send_nowait(ev.WitnessResult(epoch, granted))

    # -- status -----------------------------------------------------------------------------
    @property
    def view(self) -> View | None:
        return None if self.core is None else self.core.view

    @property
    def state(self) -> str:
        return "unknown" if self.core is None else str(self.core.state)

    @property
    def offline_reason(self) -> str:
        return "" if self.core is None or self.core.online else self.core.offline_reason
