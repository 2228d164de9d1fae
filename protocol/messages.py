"""Typed messages and the one codec per direction.

Every payload is a JSON object with ``v`` (the protocol version) and ``post`` (the post it is
about). Decoding is strict: unknown fields, wrong types, out-of-range values, oversized payloads,
another version, or a body naming a different post than its topic are all :class:`Rejected`, with a
short machine-readable ``reason`` that callers count and log.

Input is bounded before it is parsed: its size (:data:`MAX_PAYLOAD_BYTES`, larger for call
signaling) and its nesting depth (:data:`MAX_JSON_DEPTH`, counted by a byte scan that skips
strings), so no payload can make a decoder recurse: ``"oversized"``, ``"too_deep"``, ``"empty"``.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Final, Literal, TypeAlias, TypeVar

import msgspec

from protocol.topics import (
    EDGE_KINDS,
    SERVER_KINDS,
    TEAM_KINDS,
    TEAM_SERVER_KINDS,
    InvalidTopic,
    PostTopic,
    parse_post_topic,
    parse_team_topic,
    server_status_topic,
)

PROTOCOL_VERSION: Final = 1
MAX_PAYLOAD_BYTES: Final = 4096
MAX_CALL_PAYLOAD_BYTES: Final = 32768  # a call offer/answer carries an SDP (~3-6 kB)
# The deepest legitimate message is an object holding a list (a heartbeat's faults): depth 2.
MAX_JSON_DEPTH: Final = 8

PostId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
Ulid = Annotated[str, msgspec.Meta(pattern=r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")]
# UNIX time in seconds; between 2020-01-01 and 2100-01-01 (catches ms-for-s and zero clocks).
Timestamp = Annotated[float, msgspec.Meta(ge=1_577_836_800.0, le=4_102_444_800.0)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
# Free text: no NUL and no lone surrogate (neither is text, and PostgreSQL refuses to store either).
Text = Annotated[str, msgspec.Meta(max_length=200, pattern="^[^\x00\ud800-\udfff]*$")]
# The lifetime of a post's outbox: random, made when the outbox is created. A post whose storage
# was wiped starts a new epoch (its sequence numbers start again at 1); "" for unknown.
Epoch = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z]{0,32}$")]
# A condition a post reports about itself in its heartbeat ("storage", "session_taken_over").
FaultCode = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z_]{0,31}$")]


class _Message(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    v: Literal[1] = PROTOCOL_VERSION


class Event(_Message, frozen=True, kw_only=True):
    """An alarm event: one accepted press of the button (or a commissioning test press)."""

    id: Ulid
    post: PostId
    seq: Annotated[int, msgspec.Meta(ge=1, le=2**53)]
    ts: Timestamp
    type: Literal["alarm", "test"] = "alarm"
    hold_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 0
    epoch: Epoch = ""


class Heartbeat(_Message, frozen=True, kw_only=True):
    """Health of a post, published every ``interval_s``."""

    post: PostId
    ts: Timestamp
    interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)]
    uptime_s: Annotated[float, msgspec.Meta(ge=0)]
    outbox_depth: Count
    button: bool
    strobe: bool
    siren: bool
    help: bool
    silent: bool = False
    faults: Annotated[tuple[FaultCode, ...], msgspec.Meta(max_length=8)] = ()


class Status(_Message, frozen=True, kw_only=True):
    """Retained presence of a post; ``offline`` is also its Last Will."""

    post: PostId
    state: Literal["online", "offline"]
    ts: Timestamp
    reason: Text = ""


class Ack(_Message, frozen=True, kw_only=True):
    """The server committed ``event_id``: the post may drop it from its outbox."""

    post: PostId
    event_id: Ulid
    incident_id: Text
    ts: Timestamp
    duplicate: bool = False


class Command(_Message, frozen=True, kw_only=True):
    """An instruction to a post, answered by a :class:`CommandResult` with the same id."""

    id: Ulid
    post: PostId
    cmd: Literal["silence", "reset", "strobe_off", "siren_on", "strobe_on"]
    ts: Timestamp


class CommandResult(_Message, frozen=True, kw_only=True):
    id: Ulid
    post: PostId
    cmd: Text
    ok: bool
    detail: Text = ""
    ts: Timestamp


class CallSignal(_Message, frozen=True, kw_only=True):
    """Video intercom signaling, no trickle: one ``offer`` (server → post, on ``call``), one
    ``answer`` (post → server, on ``callstate``); ``hangup`` either way ends call ``id``."""

    id: Ulid
    post: PostId
    kind: Literal["offer", "answer", "hangup"]
    sdp: Annotated[str, msgspec.Meta(max_length=30000)] = ""
    ts: Timestamp
    reason: Text = ""


class ServerStatus(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Retained presence of the central server on ``alarmpost/v1/server/status``."""

    v: Literal[1] = PROTOCOL_VERSION
    state: Literal["online", "offline"]
    ts: Timestamp


# ---------------------------------------------------------------------------- patrol teams
TeamId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,58}$")]
Latitude = Annotated[float, msgspec.Meta(ge=-90.0, le=90.0)]
Longitude = Annotated[float, msgspec.Meta(ge=-180.0, le=180.0)]
PageAnswerKind = Literal["accept", "decline", "en_route", "on_scene", "resolved"]
TeamState = Literal["available", "paged", "en_route", "on_scene", "off_duty"]


class Page(_Message, frozen=True, kw_only=True):
    """Server → team: go to this post. Answer with a :class:`PageAnswer` naming ``id``."""

    id: Ulid  # the page; a resend carries the same id, so a device shows it once
    team: TeamId
    incident: Ulid
    post: PostId
    post_name: Text = ""
    school: Text = ""
    address: Text = ""
    lat: Latitude | None = None
    lon: Longitude | None = None
    what: Text = "alarm"
    ts: Timestamp
    deadline: Timestamp  # answer before this, or the next team is paged
    broadcast: bool = False  # sent to several teams: the first to accept takes it


class PageWithdrawn(_Message, frozen=True, kw_only=True):
    """Server → team: stop showing page ``page`` (taken by another team, cancelled, ...)."""

    page: Ulid
    team: TeamId
    incident: Ulid
    reason: Literal["taken", "cancelled", "timeout", "closed", "reassigned"]
    ts: Timestamp


class PageAnswer(_Message, frozen=True, kw_only=True):
    """Team → server: what the team does about page ``page``."""

    page: Ulid
    team: TeamId
    incident: Ulid
    answer: PageAnswerKind
    ts: Timestamp
    classification: Text = ""  # with "resolved": crime, medical, traffic_crowd, ...
    detail: Text = ""


class TeamPosition(_Message, frozen=True, kw_only=True):
    """Team → server: where the team is. Older than the server's max age counts as unknown."""

    team: TeamId
    lat: Latitude
    lon: Longitude
    ts: Timestamp
    accuracy_m: Annotated[float, msgspec.Meta(ge=0, le=100_000)] = 0.0
    speed_mps: Annotated[float, msgspec.Meta(ge=0, le=100)] = 0.0


class TeamStatus(_Message, frozen=True, kw_only=True):
    """Team → server: retained duty status; ``off_duty`` is also the device's Last Will."""

    team: TeamId
    state: TeamState
    ts: Timestamp
    reason: Text = ""


TeamMessage: TypeAlias = PageAnswer | TeamPosition | TeamStatus
TeamServerMessage: TypeAlias = Page | PageWithdrawn

EdgeMessage: TypeAlias = Event | Heartbeat | Status | CommandResult | CallSignal
ServerMessage: TypeAlias = Ack | Command | ServerStatus | CallSignal
AnyMessage: TypeAlias = EdgeMessage | ServerMessage | TeamMessage | TeamServerMessage

_EDGE_TYPES: Final[dict[str, type[EdgeMessage]]] = {
    "event": Event,
    "heartbeat": Heartbeat,
    "status": Status,
    "cmdresult": CommandResult,
    "callstate": CallSignal,
}
_SERVER_TYPES: Final[dict[str, type[Ack] | type[Command] | type[CallSignal]]] = {
    "ack": Ack, "cmd": Command, "call": CallSignal,
}
assert set(_EDGE_TYPES) == EDGE_KINDS and set(_SERVER_TYPES) == SERVER_KINDS
_TEAM_TYPES: Final[dict[str, type[TeamMessage]]] = {
    "answer": PageAnswer,
    "position": TeamPosition,
    "status": TeamStatus,
}
_TEAM_SERVER_TYPES: Final[dict[str, type[TeamServerMessage]]] = {
    "page": Page,
    "withdrawn": PageWithdrawn,
}
assert set(_TEAM_TYPES) == TEAM_KINDS and set(_TEAM_SERVER_TYPES) == TEAM_SERVER_KINDS

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder] = {}  # type: ignore[type-arg]


class _Envelope(msgspec.Struct):
    v: object = None


class Rejected(ValueError):
    """A message that must not be acted on. ``reason`` is a short label for metrics."""

    REASONS: Final = (
        "bad_topic",
        "wrong_direction",
        "oversized",
        "malformed",
        "unknown_version",
        "invalid",
        "too_deep",
        "empty",
        "post_mismatch",
        "unknown_post",
        "wrong_post",
        # patrol teams (decoding, then the dispatcher's checks)
        "team_mismatch",
        "unknown_team",
        "wrong_team",
        "stale_position",
        "future_timestamp",
        "unknown_page",
        "not_your_page",
        "page_closed",
        "not_assigned",
        "classification_required",
    )

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def encode(message: AnyMessage) -> bytes:
    """The JSON bytes of a message (no whitespace, fields in declaration order)."""
    return _encoder.encode(message)


_M = TypeVar("_M", bound=msgspec.Struct)


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(payload: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply ``[``/``{`` nest in ``payload`` outside strings; stops counting past ``limit``.

    A byte scan, not a parse, so it cannot recurse: run it before any decoder sees the payload.
    Unbalanced or unterminated input is counted as written (a later decode refuses it).
    """
    depth = deepest = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', payload)):
        if match.group() in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth = max(depth - 1, 0)
    return deepest


def check_bounds(payload: bytes, limit: int = MAX_PAYLOAD_BYTES) -> None:
    """Refuse what no decoder may see: empty, bigger than ``limit``, nested too deeply."""
    if not payload:
        raise Rejected("empty", "no payload (a cleared retained message?)")
    if len(payload) > limit:
        raise Rejected("oversized", f"{len(payload)} bytes > {limit}")
    brackets = payload.count(b"[") + payload.count(b"{")  # cannot nest deeper than it has
    if brackets > MAX_JSON_DEPTH and json_depth(payload) > MAX_JSON_DEPTH:
        raise Rejected("too_deep", f"nesting deeper than {MAX_JSON_DEPTH} ({len(payload)} bytes)")


def _decode(payload: bytes, cls: type[_M]) -> _M:
    check_bounds(payload, MAX_CALL_PAYLOAD_BYTES if cls is CallSignal else MAX_PAYLOAD_BYTES)
    decoder = _decoders.get(cls)
    if decoder is None:
        decoder = _decoders[cls] = msgspec.json.Decoder(cls)
    try:
        message: _M = decoder.decode(payload)
    except msgspec.ValidationError as exc:
        try:
            version = msgspec.json.decode(payload, type=_Envelope).v
        except (msgspec.DecodeError, RecursionError):
            version = PROTOCOL_VERSION
        if version != PROTOCOL_VERSION:
            raise Rejected("unknown_version", f"v={str(version)[:20]!r}") from None
        raise Rejected("invalid", str(exc)[:200]) from None
    except msgspec.DecodeError as exc:
        raise Rejected("malformed", str(exc)[:200]) from None
    except RecursionError:  # unreachable with the depth bound; never let it escape anyway
        raise Rejected("too_deep", f"{len(payload)} bytes") from None
    for name in message.__struct_fields__:
        value = getattr(message, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise Rejected("invalid", f"{name} is not finite")
    return message


def decode_from_post(topic: str, payload: bytes) -> tuple[PostTopic, EdgeMessage]:
    """Decode what a post published. The body must name the same post as the topic."""
    try:
        where = parse_post_topic(topic)
    except InvalidTopic as exc:
        raise Rejected("bad_topic", str(exc)) from None
    cls = _EDGE_TYPES.get(where.kind)
    if cls is None:
        raise Rejected("wrong_direction", f"{where.kind!r} is not sent by posts")
    message = _decode(payload, cls)
    if message.post != where.post_id:
        raise Rejected("post_mismatch", f"topic names {where.post_id!r}, body {message.post!r}")
    return where, message


def decode_from_server(topic: str, payload: bytes, post_id: str) -> ServerMessage:
    """Decode what the server sent to ``post_id`` (an ack, a command or the server status)."""
    if topic == server_status_topic():
        return _decode(payload, ServerStatus)
    try:
        where = parse_post_topic(topic)
    except InvalidTopic as exc:
        raise Rejected("bad_topic", str(exc)) from None
    if where.post_id != post_id:
        raise Rejected("wrong_post", f"addressed to {where.post_id!r}")
    cls = _SERVER_TYPES.get(where.kind)
    if cls is None:
        raise Rejected("wrong_direction", f"{where.kind!r} is not sent by the server")
    message = _decode(payload, cls)
    if message.post != post_id:
        raise Rejected("post_mismatch", f"topic names {post_id!r}, body {message.post!r}")
    return message


def decode_from_team(topic: str, payload: bytes) -> tuple[str, TeamMessage]:
    """Decode what a team's device published: ``(team_id, message)``. The body must name the
    same team as the topic."""
    try:
        where = parse_team_topic(topic)
    except InvalidTopic as exc:
        raise Rejected("bad_topic", str(exc)) from None
    cls = _TEAM_TYPES.get(where.kind)
    if cls is None:
        raise Rejected("wrong_direction", f"{where.kind!r} is not sent by teams")
    message = _decode(payload, cls)
    if message.team != where.team_id:
        raise Rejected("team_mismatch", f"topic names {where.team_id!r}, body {message.team!r}")
    return where.team_id, message


def decode_for_team(topic: str, payload: bytes, team_id: str) -> TeamServerMessage | ServerStatus:
    """Decode what the server sent to team ``team_id`` (a page, a withdrawal, server status)."""
    if topic == server_status_topic():
        return _decode(payload, ServerStatus)
    try:
        where = parse_team_topic(topic)
    except InvalidTopic as exc:
        raise Rejected("bad_topic", str(exc)) from None
    if where.team_id != team_id:
        raise Rejected("wrong_team", f"addressed to {where.team_id!r}")
    cls = _TEAM_SERVER_TYPES.get(where.kind)
    if cls is None:
        raise Rejected("wrong_direction", f"{where.kind!r} is not sent by the server")
    message = _decode(payload, cls)
    if message.team != team_id:
        raise Rejected("team_mismatch", f"topic names {team_id!r}, body {message.team!r}")
    return message
