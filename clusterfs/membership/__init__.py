"""Sans-IO cluster membership: heartbeats, failure suspicion, views and epochs.

Modules: `view` (the View type and the pure rules), `messages` (wire
messages, `ProtocolError`), `events` (inputs and actions), `config`
(timeouts), `detector` (heartbeat silence), `paxos` (deciding one view
change), `core` (the state machine of one node), `sim` (an in-memory network
on a virtual clock, for tests). No I/O, no clock: see docs/membership.md for
what the driver must do.
"""

from clusterfs.membership.config import MembershipConfig
from clusterfs.membership.core import Membership
from clusterfs.membership.events import (
    AcceptorState,
    Action,
    AdmitMember,
    ClaimWitness,
    Event,
    GoOffline,
    InstallView,
    MemberCaughtUp,
    MemberFailed,
    Persist,
    Rejoin,
    Send,
    Tick,
    WitnessResult,
)
from clusterfs.membership.messages import (
    JoinRequest,
    Leave,
    Message,
    ProtocolError,
    decode,
    encode,
)
from clusterfs.membership.view import View, choose_leader, majority_of, next_view

__all__ = [
    "AcceptorState",
    "Action",
    "AdmitMember",
    "ClaimWitness",
    "Event",
    "GoOffline",
    "InstallView",
    "JoinRequest",
    "Leave",
    "MemberCaughtUp",
    "MemberFailed",
    "Membership",
    "MembershipConfig",
    "Message",
    "Persist",
    "ProtocolError",
    "Rejoin",
    "Send",
    "Tick",
    "View",
    "WitnessResult",
    "choose_leader",
    "decode",
    "encode",
    "majority_of",
    "next_view",
]
