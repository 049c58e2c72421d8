"""The composition root of one node: block directory, replica, committer, FUSE mount.

`run(config, ready)` mounts, calls `ready()` once the mount is live, serves until the file
system is unmounted or the process gets SIGTERM/SIGINT, and then shuts down cleanly: queued
records are committed, handles closed, unlinked inodes purged and the replica marked clean.
After an unclean stop (kill -9, power loss) the next start repairs what a crash can leave
behind between a commit and the block directory (see `fsck`).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from clusterfs import status
from clusterfs.blockdir import FORMAT_FILE, BlockDir, open_blockdir
from clusterfs.credentials import authorised_client_keys, credentials_path, load_credentials
from clusterfs.filesystem import FileSystem
from clusterfs.fuse_ops import Operations, invalidating, mount_options
from clusterfs.membership.driver import RECOVERABLE_OFFLINE, MembershipDriver, stored_view
from clusterfs.membership.view import View as MembershipView
from clusterfs.membership.witness import Witness
from clusterfs.namespace import initialise
from clusterfs.pieces import Payload
from clusterfs.protocol.messages import Member
from clusterfs.protocol.ops import FileOps
from clusterfs.protocol.server import ProtocolServer
from clusterfs.registry import Registry, RegistryError, check_name
from clusterfs.status import mount_source
from clusterfs.store import CLUSTER_ID, Store
from clusterfs.txn.actions import RemoveMember
from clusterfs.txn.driver import CommitDriver
from clusterfs.txn.transport import (
    CHANNEL_LB,
    CHANNEL_MEMBERSHIP,
    CHANNEL_PROTOCOL,
    CHANNEL_TXN,
    Transport,
    TransportError,
)
from vhdshare.unpacker import Unpacker

log = logging.getLogger(__name__)

CLEAN = b"clean"
FOUNDER_FILE = "founder"
JOIN_TIMEOUT_S = 60.0


class NodeError(Exception):
    """The node cannot start; the message is one line for the operator."""


@dataclass(frozen=True)
class NodeConfig:
    blockdir: Path
    mountpoint: Path
    name: str
    state_dir: Path
    listen: str
    join: str | None = None
    options: list[str] = field(default_factory=list)


def replica_path(state_dir: Path) -> Path:
    return state_dir / "replica"


def open_replica(state_dir: Path, blockdir: BlockDir) -> Store:
    """Open (or found) this node's replica and check it belongs to this block directory."""
    store = Store(replica_path(state_dir))
    with store.write() as view:
        cluster_id = view.get_meta(CLUSTER_ID)
        if cluster_id is None:
            view.put_meta(CLUSTER_ID, blockdir.cluster_id.encode())
            view.put_meta(CLEAN, b"1")
            # The root is not a record: every node makes the same one, from the format
            # marker that they all share.
            marker = os.stat(blockdir.root / FORMAT_FILE)
            initialise(view, marker.st_uid, marker.st_gid, marker.st_mtime_ns)
        elif cluster_id.decode() != blockdir.cluster_id:
            store.close()
            raise NodeError(f"{state_dir}: state belongs to another cluster")
    return store


def recover(store: Store, blockdir: BlockDir) -> None:
    """Before serving: mark the replica as in use (a clean stop marks it clean again). The
    repairs of the block directory and the purge of orphans wait until the replica has caught
    up with the cluster (`FileSystem.settle`, run by the housekeeping task): a lagging
    replica would take files made or purged since for damage, a purge committed here alone
    would put this replica out of step with the others, and an orphan may still be open on
    another node."""
    _set_clean(store, False)


def _set_clean(store: Store, clean: bool) -> None:
    with store.write() as view:
        view.put_meta(CLEAN, b"1" if clean else b"0")


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


class Node:
    """One cluster node's services, wired together: transport, commit and membership
    drivers, the file system layer, the file protocol's sessions, and the control requests
    of the command line."""

    def __init__(self, config: NodeConfig, blockdir: BlockDir, store: Store) -> None:
        self.config = config
        self.store = store
        self.registry = Registry(config.blockdir)
        self.fs = FileSystem(store, blockdir)
        self.transport = Transport(config.name, config.listen, self.registry.address,
                                   load_credentials(credentials_path(config.blockdir)),
                                   lambda: authorised_client_keys(config.blockdir))
        self.commit = CommitDriver(config.name, store, self._send_txn, self.fs.on_applied,
                                   self._commit_report, self.registry.snapshots_dir,
                                   self.fs.caches_dropped)
        self.membership = MembershipDriver(
            config.name, config.listen, store, self._send_membership, self.commit,
            Witness(self.registry.cluster_dir), self._went_offline)
        self.fs.committer = self.commit
        self.unpacker = Unpacker(self.fs)  # vhdshare's tunnel service
        self.protocol = ProtocolServer(
            config.name, FileOps(self.fs, self.unpacker), self._send_client, self._send_lb,
            incarnation=time.time_ns() // 1000)
        self.membership.view_listeners.append(self._view_installed)
        self.transport.on(CHANNEL_TXN, self.commit.on_frame)
        self.transport.on(CHANNEL_MEMBERSHIP, self.membership.on_frame)
        self.transport.on(CHANNEL_LB, self.protocol.on_peer)
        self.transport.on_clients(self.protocol.on_client)
        self.transport.on_control(self._control)
        self._mounted = False

    def _send_txn(self, to: str, payload: bytes) -> None:
        self.transport.send(to, CHANNEL_TXN, payload)

    def _send_membership(self, to: str, payload: bytes) -> None:
        self.transport.send(to, CHANNEL_MEMBERSHIP, payload)

    def _send_lb(self, to: str, payload: bytes) -> None:
        self.transport.send(to, CHANNEL_LB, payload)

    def _send_client(self, client: str, payload: Payload) -> None:
        self.transport.reply(client, CHANNEL_PROTOCOL, payload)

    def _view_installed(self, view: MembershipView) -> None:
        addresses = {name: self.registry.address(name) or "" for name in view.members}
        addresses[self.config.name] = self.config.listen
        self.protocol.on_view(view.epoch, [Member(name, addresses[name])
                                           for name in view.members])

    def _commit_report(self, report: RemoveMember) -> None:
        self.membership.on_commit_report(report)

    def _went_offline(self, reason: str) -> None:
        self.fs.offline_reason = reason
        self.protocol.push()  # its clients go elsewhere
        if reason.startswith("left") and self._mounted:
            pyfuse3.terminate()  # `clusterfs leave`: unmount once the view is without us
        elif self._mounted and reason.startswith(RECOVERABLE_OFFLINE):
            view = self.membership.view
            log.warning("asking to be admitted again")
            self.membership.rejoin(self._contacts(view.members if view else ()))

    async def _serve_when_caught_up(self) -> None:
        """A node that went offline answers again once it is a member again and has caught
        up (the commit layer serves), not before: its replica may be behind until then."""
        while True:
            if self.commit.serving and self.fs.offline_reason:
                log.warning("serving again (offline was: %s)", self.fs.offline_reason)
                self.fs.offline_reason = ""
                self.protocol.push()
            await self.commit.changed.wait()

    # -- start-up ---------------------------------------------------------------------------
    def _start_membership(self) -> None:
        now_s = trio.current_time()
        view = stored_view(self.store)
        if view is not None:
            self.membership.restart(view, now_s, self._contacts(view.members))
        elif self.config.join:
            self.membership.join((self.config.join,), now_s)
        else:
            self._claim_founding()
            self.membership.found(now_s)

    def _contacts(self, members: tuple[str, ...]) -> tuple[str, ...]:
        """Where to ask for re-admission: --join if given, else the last view's members."""
        found = [self.registry.address(name) for name in members if name != self.config.name]
        contacts = [self.config.join] if self.config.join else []
        return tuple(contacts + [address for address in found if address])

    def _claim_founding(self) -> None:
        """Only one node founds a cluster on a block directory; the others join it."""
        self.registry.cluster_dir.mkdir(exist_ok=True)
        try:
            fd = os.open(self.registry.cluster_dir / FOUNDER_FILE,
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            founder = (self.registry.cluster_dir / FOUNDER_FILE).read_text().strip()
            raise NodeError(f"{self.config.blockdir}: a cluster was already founded here "
                            f"(by {founder}); use --join HOST:PORT of a running node") from None
        with os.fdopen(fd, "w") as f:
            f.write(self.config.name + "\n")

    async def _wait_serving(self) -> None:
        with trio.move_on_after(JOIN_TIMEOUT_S):
            while not self.commit.serving:
                if self.commit.offline_reason and not self.membership.rejoining:
                    raise NodeError(self._offline_message())
                await self.commit.changed.wait()
            return
        where = f"through {self.config.join}" if self.config.join else "with the cluster"
        raise NodeError(f"could not join {where} within {JOIN_TIMEOUT_S:g} s "
                        f"(state: {self.membership.state})")

    def _offline_message(self) -> str:
        view = self.membership.view
        if view is not None and "majority" in self.commit.offline_reason:
            return (f"could not reach a majority of the cluster ({', '.join(view.members)}); "
                    "start the other nodes at about the same time")
        return f"node is offline: {self.commit.offline_reason}"

    async def run(self, ready: Callable[[], None]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.transport.run)
            self.registry.register(self.config.name, self.config.listen)
            await nursery.start(self.commit.run)
            self._start_membership()
            await nursery.start(self.membership.run)
            await self._wait_serving()
            self.fs.offline_reason = ""  # what it was before it (re-)joined at start-up
            self.membership.stop_rejoining()
            await nursery.start(self.fs.remove_purged)
            await nursery.start(self.fs.spares.run)
            await nursery.start(self.protocol.run)
            nursery.start_soon(self._serve_when_caught_up)
            nursery.start_soon(_stop_on_signals)
            await self._serve_mount(ready)
            nursery.cancel_scope.cancel()

    async def _serve_mount(self, ready: Callable[[], None]) -> None:
        source = mount_source(self.config.name, self.config.listen, self.config.blockdir)
        pyfuse3.init(Operations(self.fs), str(self.config.mountpoint),
                     mount_options(self.config.options, source))
        self._mounted = True
        try:
            ready()
            with invalidating(self.fs):
                await pyfuse3.main()
        finally:
            self._mounted = False
            pyfuse3.close(unmount=True)
            self.protocol.close_all()
            self.unpacker.close()
            self.fs.close_all()
            self.fs.remove_purged_now()

    # -- control requests -------------------------------------------------------------------
    def _control(self, payload: bytes) -> bytes:
        request = status.decode_request(payload)
        if isinstance(request, status.ControlError):
            return status.encode(request)
        if isinstance(request, status.LeaveRequest):
            self.membership.leave()
            return status.encode(status.LeaveReply(os.getpid()))
        return status.encode(self.status())

    def status(self) -> status.NodeStatus:
        view = self.membership.view
        members = view.members if view is not None else ()
        addresses = {name: self.registry.address(name) or "" for name in members}
        addresses[self.config.name] = self.config.listen
        state = self.membership.state
        reason = self.membership.offline_reason if state != "online" else ""
        if self._mounted and self.fs.offline_reason:  # the mount answers EIO meanwhile
            state, reason = "offline", self.fs.offline_reason + {
                "joining": "; asking to be admitted again",
                "online": "; a member again, catching up"}.get(self.membership.state, "")
        return status.NodeStatus(
            name=self.config.name, address=self.config.listen, pid=os.getpid(), state=state,
            reason=reason, epoch=view.epoch if view is not None else 0,
            leader=view.leader if view is not None else "", members=members,
            addresses=addresses, applied_seq=self.commit.applied_seq,
            digest=self.store.digest(), mountpoint=str(self.config.mountpoint),
            sessions=len(self.protocol.sessions))


def _single_node_error(group: BaseExceptionGroup) -> BaseException:
    """The one-line error inside a nursery's exception group, else the group itself."""
    errors = group.exceptions
    if len(errors) == 1 and isinstance(errors[0], BaseExceptionGroup):
        return _single_node_error(errors[0])
    if len(errors) == 1 and isinstance(errors[0], NodeError | TransportError):
        return NodeError(str(errors[0]))
    return group


async def serve(config: NodeConfig, ready: Callable[[], None]) -> None:
    blockdir = open_blockdir(config.blockdir)
    try:
        check_name(config.name)
    except RegistryError as exc:
        raise NodeError(str(exc)) from None
    store = open_replica(config.state_dir, blockdir)
    try:
        recover(store, blockdir)
        try:
            await Node(config, blockdir, store).run(ready)
        except BaseExceptionGroup as group:  # the nursery wraps a start-up failure
            raise _single_node_error(group) from None
        except TransportError as exc:
            raise NodeError(str(exc)) from None
        _set_clean(store, True)
    finally:
        store.close()
    log.info("node %s stopped cleanly", config.name)


def run(config: NodeConfig, ready: Callable[[], None]) -> None:
    trio.run(serve, config, ready)
