"""What goes into the membership core (events) and what comes out (actions).

Inputs, each given with `now_s` to `Membership.handle`:
  Tick             time passed; send heartbeats, check timeouts.
  a wire Message   one decoded message from a peer (see `messages.py`),
                   including JoinRequest and Leave.
  MemberFailed     the commit layer saw `node` miss a deadline or fail to apply.
  MemberCaughtUp   the driver finished the catch-up started by AdmitMember.
  WitnessResult    the answer to ClaimWitness.
  Rejoin           this (offline) node asks to come back via `contacts`.

Outputs, to be performed by the driver IN LIST ORDER:
  Persist       write `state` durably before doing any later action.
  Send          send `message` to node `to` (a member name, or a contact
                address during a join).
  InstallView   `view` is now this node's view (persist it, hand it to txn).
  AdmitMember   start the data catch-up of joiner `node` from `from_seq`.
  ClaimWitness  compare-and-swap the witness record for `epoch` to `node`.
  GoOffline     stop serving at once (EIO), with `reason` for status.
"""

from __future__ import annotations

from dataclasses import dataclass

from clusterfs.membership.messages import Ballot, Message
from clusterfs.membership.view import View


@dataclass(frozen=True)
class Tick:
    """Time passed."""


@dataclass(frozen=True)
class MemberFailed:
    """The commit layer reports that `node` failed (missed a deadline, voted no)."""

    node: str
    reason: str


@dataclass(frozen=True)
class MemberCaughtUp:
    """Joiner `node` holds the namespace up to the present; it may be added."""

    node: str


@dataclass(frozen=True)
class WitnessResult:
    """The witness compare-and-swap for `epoch` succeeded (`granted`) or not."""

    epoch: int
    granted: bool


@dataclass(frozen=True)
class Rejoin:
    """Ask to (re-)join through `contacts` (node names or addresses)."""

    contacts: tuple[str, ...]
    address: str
    applied_seq: int = 0


Event = Tick | MemberFailed | MemberCaughtUp | WitnessResult | Rejoin | Message


@dataclass(frozen=True)
class AcceptorState:
    """What an acceptor must keep across a crash for the epoch being decided."""

    epoch: int
    promised: Ballot | None
    accepted_ballot: Ballot | None
    accepted_view: View | None


@dataclass(frozen=True)
class Persist:
    state: AcceptorState


@dataclass(frozen=True)
class Send:
    to: str
    message: Message


@dataclass(frozen=True)
class InstallView:
    view: View


@dataclass(frozen=True)
class AdmitMember:
    node: str
    address: str
    from_seq: int


@dataclass(frozen=True)
class ClaimWitness:
    epoch: int
    node: str


@dataclass(frozen=True)
class GoOffline:
    reason: str


Action = Persist | Send | InstallView | AdmitMember | ClaimWitness | GoOffline
