"""The versioned MQTT topic tree.

::

    alarmpost/v1/post/{post_id}/event       edge → server   alarm events (QoS 1)
    alarmpost/v1/post/{post_id}/heartbeat   edge → server   health, every interval (QoS 0)
    alarmpost/v1/post/{post_id}/status      edge → server   retained online/offline, Last Will
    alarmpost/v1/post/{post_id}/cmdresult   edge → server   answers to commands (QoS 1)
    alarmpost/v1/post/{post_id}/ack         server → edge   "committed", per event (QoS 1)
    alarmpost/v1/post/{post_id}/cmd         server → edge   commands (QoS 1)
    alarmpost/v1/post/{post_id}/call        server → edge   video call signaling: offer, hangup
    alarmpost/v1/post/{post_id}/callstate   edge → server   video call signaling: answer, hangup
    alarmpost/v1/server/status              server → all    retained online/offline of the server
"""

from __future__ import annotations

import re
from typing import Final, Literal, NamedTuple, get_args

TOPIC_PREFIX: Final = "alarmpost/v1"

EdgeKind = Literal["event", "heartbeat", "status", "cmdresult", "callstate"]
ServerKind = Literal["ack", "cmd", "call"]
Kind = Literal["event", "heartbeat", "status", "cmdresult", "callstate", "ack", "cmd", "call"]

EDGE_KINDS: Final[frozenset[str]] = frozenset(get_args(EdgeKind))
SERVER_KINDS: Final[frozenset[str]] = frozenset(get_args(ServerKind))

# Letters, digits, dash and underscore; never MQTT wildcards or separators.
_POST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
RESERVED_IDS: Final = frozenset({"server", "admin", "all"})


class InvalidTopic(ValueError):
    """A topic outside the tree, or naming an invalid post id."""


class PostTopic(NamedTuple):
    post_id: str
    kind: str


def valid_post_id(post_id: str) -> bool:
    """True for ids usable as MQTT user names and topic levels (no ``+``, ``#``, ``/``)."""
    return bool(_POST_ID_RE.match(post_id)) and post_id.lower() not in RESERVED_IDS


def post_topic(post_id: str, kind: Kind) -> str:
    if not valid_post_id(post_id):
        raise InvalidTopic(f"invalid post id {post_id!r}")
    return f"{TOPIC_PREFIX}/post/{post_id}/{kind}"


def post_subscription(kind: str = "+") -> str:
    """The filter the server subscribes with: every post, one kind (or all)."""
    return f"{TOPIC_PREFIX}/post/+/{kind}"


def server_status_topic() -> str:
    return f"{TOPIC_PREFIX}/server/status"


# ---------------------------------------------------------------------------- patrol teams
#
#     alarmpost/v1/team/{user}/page        server → team   pages (QoS 1, persistent session)
#     alarmpost/v1/team/{user}/withdrawn   server → team   "this page is taken/cancelled/timed out"
#     alarmpost/v1/team/{user}/answer      team → server   accept/decline/en_route/on_scene/resolved
#     alarmpost/v1/team/{user}/position    team → server   where the team is (QoS 0)
#     alarmpost/v1/team/{user}/status      team → server   available/off_duty/... (retained, Last Will)
#
# ``{user}`` is the team's MQTT user name, ``team-{team_id}``, so that the broker's ACL patterns
# (``%u`` is the whole user name) give each team its own topics and nothing else.

TeamServerKind = Literal["page", "withdrawn"]
TeamKind = Literal["answer", "position", "status"]
TEAM_KINDS: Final[frozenset[str]] = frozenset(get_args(TeamKind))
TEAM_SERVER_KINDS: Final[frozenset[str]] = frozenset(get_args(TeamServerKind))
TEAM_USER_PREFIX: Final = "team-"
TEAM_TOPIC_PREFIX: Final = f"{TOPIC_PREFIX}/team/"


class TeamTopic(NamedTuple):
    team_id: str
    kind: str


def valid_team_id(team_id: str) -> bool:
    """Team ids follow the post id rules, short enough that ``team-{id}`` is one too."""
    return len(team_id) <= 59 and valid_post_id(team_id)


def team_user(team_id: str) -> str:
    """The MQTT user name of a team's device."""
    if not valid_team_id(team_id):
        raise InvalidTopic(f"invalid team id {team_id!r}")
    return f"{TEAM_USER_PREFIX}{team_id}"


def team_topic(team_id: str, kind: TeamKind | TeamServerKind) -> str:
    return f"{TEAM_TOPIC_PREFIX}{team_user(team_id)}/{kind}"


def team_subscription(kind: str = "+") -> str:
    """The filter the server subscribes with: every team, one kind (or all)."""
    return f"{TEAM_TOPIC_PREFIX}+/{kind}"


def parse_team_topic(topic: str) -> TeamTopic:
    """Split ``alarmpost/v1/team/team-{id}/{kind}``; raise :class:`InvalidTopic` otherwise."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != "alarmpost" or parts[2] != "team":
        raise InvalidTopic("topic outside the team tree")
    if parts[1] != "v1":
        raise InvalidTopic("unknown protocol version in topic")
    user, kind = parts[3], parts[4]
    team_id = user[len(TEAM_USER_PREFIX):]
    if not user.startswith(TEAM_USER_PREFIX) or not valid_team_id(team_id):
        raise InvalidTopic("invalid team user in topic")
    if kind not in TEAM_KINDS and kind not in TEAM_SERVER_KINDS:
        raise InvalidTopic("unknown message kind in topic")
    return TeamTopic(team_id, kind)


def parse_post_topic(topic: str) -> PostTopic:
    """Split ``alarmpost/v1/post/{id}/{kind}``; raise :class:`InvalidTopic` otherwise."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != "alarmpost" or parts[2] != "post":
        raise InvalidTopic("topic outside the tree")
    if parts[1] != "v1":
        raise InvalidTopic("unknown protocol version in topic")
    post_id, kind = parts[3], parts[4]
    if not valid_post_id(post_id):
        raise InvalidTopic("invalid post id in topic")
    if kind not in EDGE_KINDS and kind not in SERVER_KINDS:
        raise InvalidTopic("unknown message kind in topic")
    return PostTopic(post_id, kind)
