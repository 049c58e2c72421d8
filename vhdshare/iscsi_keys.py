"""iSCSI text: the key=value data segments of Login and Text PDUs, and what the target
answers to each key (RFC 7143 sections 6 and 13), as pure functions.

Why apart from `vhdshare.iscsi_wire`: the wire module is about bytes of PDU headers; this
is about the words inside data segments, the negotiation rules of each key the target
understands (`negotiate`: min, max, AND, OR, list, declarative), the session parameters they
produce (`SessionParams`), the login checks (`check_login_request`, `leading_keys`) and
SendTargets. `vhdshare.iscsi.IscsiTargetConnection` calls them while logging in and for
Text Requests.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vhdshare.iscsi_wire import (
    DEFAULT_MAX_RECV_DATA_SEGMENT_BYTES,
    ISCSI_VERSION,
    MAX_DATA_SEGMENT_BYTES,
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    LoginFlag,
    LoginRequest,
    LoginStatus,
    Stage,
    TextError,
)

# --- text key=value data segments ------------------------------------------------------------


def decode_text(data: bytes) -> list[tuple[str, str]]:
    """The key=value pairs of a text data segment, each NUL-terminated (RFC 7143 6.1)."""
    if data and not data.endswith(b"\0"):
        raise TextError("text data does not end with NUL")
    pairs = []
    for item in data.split(b"\0")[:-1]:
        if not item:
            continue  # tolerate NUL padding
        key, equals, value = item.partition(b"=")
        if not equals or not key or len(key) > MAX_KEY_BYTES or len(value) > MAX_VALUE_BYTES:
            raise TextError(f"malformed key=value item {item[:80]!r}")
        try:
            pairs.append((key.decode("ascii"), value.decode("utf-8")))
        except UnicodeDecodeError:
            raise TextError(f"key=value item {item[:80]!r} is not UTF-8") from None
    return pairs


def encode_text(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{key}={value}".encode() + b"\0" for key, value in pairs)


# --- operational parameters and their negotiation (RFC 7143 section 13) -------------------------


@dataclass(slots=True)
class SessionParams:
    """The session's operational parameters: RFC 7143 defaults until negotiated."""

    header_digest: str = "None"
    data_digest: str = "None"
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    if_marker: bool = False
    of_marker: bool = False
    task_reporting: str = "RFC3720"
    # declared by the initiator: the longest data segment it accepts (our Data-In limit)
    max_recv_data_segment_length: int = DEFAULT_MAX_RECV_DATA_SEGMENT_BYTES


class Rule(enum.Enum):
    LIST = "first of the offered list we support"
    MIN = "numerical minimum"
    MAX = "numerical maximum"
    AND = "Boolean AND"
    OR = "Boolean OR"
    DECLARATIVE = "declared by the initiator, not answered"
    IRRELEVANT = "answered Irrelevant"


@dataclass(frozen=True, slots=True)
class KeyRule:
    rule: Rule
    attribute: str = ""  # the SessionParams field the result goes to
    ours: object = None  # our value: tuple of names, int or bool
    low: int = 0
    high: int = 0


_U24 = MAX_DATA_SEGMENT_BYTES
_DECIMAL_DIGITS = frozenset("0123456789")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
OPERATIONAL_KEYS: dict[str, KeyRule] = {
    "HeaderDigest": KeyRule(Rule.LIST, "header_digest", ("None",)),
    "DataDigest": KeyRule(Rule.LIST, "data_digest", ("None",)),
    "MaxConnections": KeyRule(Rule.MIN, "max_connections", 1, 1, 65535),
    "InitialR2T": KeyRule(Rule.OR, "initial_r2t", False),
    "ImmediateData": KeyRule(Rule.AND, "immediate_data", True),
    "MaxBurstLength": KeyRule(Rule.MIN, "max_burst_length", 1 << 20, 512, _U24),
    "FirstBurstLength": KeyRule(Rule.MIN, "first_burst_length", 256 << 10, 512, _U24),
    "DefaultTime2Wait": KeyRule(Rule.MAX, "default_time2wait", 2, 0, 3600),
    "DefaultTime2Retain": KeyRule(Rule.MIN, "default_time2retain", 0, 0, 3600),
    "MaxOutstandingR2T": KeyRule(Rule.MIN, "max_outstanding_r2t", 1, 1, 65535),
    "DataPDUInOrder": KeyRule(Rule.OR, "data_pdu_in_order", True),
    "DataSequenceInOrder": KeyRule(Rule.OR, "data_sequence_in_order", True),
    "ErrorRecoveryLevel": KeyRule(Rule.MIN, "error_recovery_level", 0, 0, 2),
    "IFMarker": KeyRule(Rule.AND, "if_marker", False),
    "OFMarker": KeyRule(Rule.AND, "of_marker", False),
    "IFMarkInt": KeyRule(Rule.IRRELEVANT),
    "OFMarkInt": KeyRule(Rule.IRRELEVANT),
    "TaskReporting": KeyRule(Rule.LIST, "task_reporting", ("RFC3720",)),
    "MaxRecvDataSegmentLength": KeyRule(Rule.DECLARATIVE, "max_recv_data_segment_length",
                                        None, 512, _U24),
}


def parse_number(text: str) -> int | None:
    """A decimal or 0x-hexadecimal number (RFC 7143 5.1), or None."""
    if text[:2] in ("0x", "0X"):
        digits, allowed, base = text[2:], _HEX_DIGITS, 16
    else:
        digits, allowed, base = text, _DECIMAL_DIGITS, 10
    if not digits or len(digits) > 20 or not set(digits) <= allowed:
        return None
    return int(digits, base)


def negotiate(key: str, offered: str, params: SessionParams) -> str | None:
    """Answer one offered operational key and record the result in `params`.

    Returns the value to answer with ("NotUnderstood", "Reject" and "Irrelevant" included),
    or None for a declaration, which is not answered."""
    rule = OPERATIONAL_KEYS.get(key)
    if rule is None:
        return "NotUnderstood"
    if rule.rule is Rule.IRRELEVANT:
        return "Irrelevant"
    result = _result(rule, offered)
    if result is None:
        return "Reject"
    setattr(params, rule.attribute, result)
    if rule.rule is Rule.DECLARATIVE:
        return None
    if isinstance(result, bool):
        return "Yes" if result else "No"
    return str(result)


def _result(rule: KeyRule, offered: str) -> str | int | bool | None:
    if rule.rule is Rule.LIST:
        assert isinstance(rule.ours, tuple)
        return next((value for value in offered.split(",") if value in rule.ours), None)
    if rule.rule in (Rule.AND, Rule.OR):
        if offered not in ("Yes", "No"):
            return None
        wanted = offered == "Yes"
        if rule.rule is Rule.AND:
            return wanted and bool(rule.ours)
        return wanted or bool(rule.ours)
    number = parse_number(offered)
    if number is None or not rule.low <= number <= rule.high:
        return None
    if rule.rule is Rule.DECLARATIVE:
        return number
    assert isinstance(rule.ours, int)
    return min(number, rule.ours) if rule.rule is Rule.MIN else max(number, rule.ours)


# --- login keys (RFC 7143 sections 6 and 13) ------------------------------------------------

LEADING_KEYS = frozenset({"InitiatorName", "InitiatorAlias", "TargetName", "SessionType"})


class LoginFailure(Exception):
    """The login fails with `status`; the message says why, for the log."""

    def __init__(self, status: LoginStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def check_login_request(request: LoginRequest, expected_stage: int | None) -> None:
    """Version, continuation and stage transition of a Login Request."""
    csg, nsg = request.csg, request.nsg
    if request.version_min > ISCSI_VERSION:
        raise LoginFailure(LoginStatus.UNSUPPORTED_VERSION, "iSCSI version not supported")
    if request.flags & LoginFlag.CONTINUE:
        raise LoginFailure(LoginStatus.INITIATOR_ERROR, "multi-PDU login text")
    if csg not in (Stage.SECURITY, Stage.OPERATIONAL) or expected_stage not in (None, csg):
        raise LoginFailure(LoginStatus.INITIATOR_ERROR, f"login in stage {csg}")
    if request.transit and (nsg not in (Stage.OPERATIONAL, Stage.FULL_FEATURE) or nsg <= csg):
        raise LoginFailure(LoginStatus.INITIATOR_ERROR, f"transition {csg} to {nsg}")


def leading_keys(request: LoginRequest, offered: list[tuple[str, str]],
                 target_names: tuple[str, ...]) -> tuple[str, str, str]:
    """(InitiatorName, SessionType, TargetName) of the first Login Request of a session."""
    keys = dict(offered)
    if request.tsih:
        raise LoginFailure(LoginStatus.SESSION_DOES_NOT_EXIST, "no session to add to")
    if not keys.get("InitiatorName"):
        raise LoginFailure(LoginStatus.MISSING_PARAMETER, "no InitiatorName")
    session_type = keys.get("SessionType", "Normal")
    if session_type not in ("Normal", "Discovery"):
        raise LoginFailure(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, session_type)
    target = keys.get("TargetName", "") if session_type == "Normal" else ""
    if session_type == "Normal" and not target:
        raise LoginFailure(LoginStatus.MISSING_PARAMETER, "no TargetName")
    if session_type == "Normal" and target not in target_names:
        raise LoginFailure(LoginStatus.NOT_FOUND, f"no target named {target!r}")
    return keys["InitiatorName"], session_type, target


def answer_login_key(key: str, value: str, params: SessionParams) -> tuple[str, str] | None:
    """The answer to one offered login key, or None (a declaration or a leading key)."""
    if key in LEADING_KEYS:
        return None
    if key == "AuthMethod":
        if "None" not in value.split(","):
            raise LoginFailure(LoginStatus.AUTHENTICATION_FAILURE,
                               f"AuthMethod={value}: only None is supported")
        return key, "None"
    answer = negotiate(key, value, params)
    return None if answer is None else (key, answer)


def send_targets(value: str, target_names: tuple[str, ...], session_target: str,
                 portal: str) -> list[tuple[str, str]]:
    """The answer to SendTargets=`value` in a discovery ("" target) or normal session."""
    if value == "All":
        names = (session_target,) if session_target else target_names
    elif value == "":
        names = (session_target,) if session_target else ()
    else:
        names = (value,) if value in target_names else ()
    return [pair for name in names for pair in (("TargetName", name), ("TargetAddress", portal))]
