"""The versioned MQTT topic tree.

::

    alarmpost/v1/post/{post_id}/event       edge → server   alarm events (QoS 1)
    alarmpost/v1/post/{post_id}/heartbeat   edge → server   health, every interval (QoS 0)
    alarmpost/v1/post/{post_id}/status      edge → server   retained online/offline, Last Will
    alarmpost/v1/post/{post_id}/cmdresult   edge → server   answers to commands (QoS 1)
    alarmpost/v1/post/{post_id}/ack         server → edge   "committed", per event (QoS 1)
    alarmpost/v1/post/{post_id}/cmd         server → edge   commands (QoS 1)
    alarmpost/v1/server/status              server → all    retained online/offline of the server
"""

from __future__ import annotations

import re
from typing import Final, Literal, NamedTuple, get_args

TOPIC_PREFIX: Final = "alarmpost/v1"

EdgeKind = Literal["event", "heartbeat", "status", "cmdresult"]
ServerKind = Literal["ack", "cmd"]
Kind = Literal["event", "heartbeat", "status", "cmdresult", "ack", "cmd"]

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
