"""The wire contract shared by the edge agent and the central server.

Topics live in :mod:`protocol.topics`, messages and their codecs in :mod:`protocol.messages`.
Nothing here does I/O; both sides import it, it imports neither.
"""

from protocol.messages import (
    MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    Ack,
    Command,
    CommandResult,
    Event,
    Heartbeat,
    Page,
    PageAnswer,
    PageWithdrawn,
    Rejected,
    ServerStatus,
    Status,
    TeamPosition,
    TeamStatus,
    decode_for_team,
    decode_from_post,
    decode_from_server,
    decode_from_team,
    encode,
)
from protocol.topics import (
    TOPIC_PREFIX,
    InvalidTopic,
    PostTopic,
    parse_post_topic,
    post_topic,
    server_status_topic,
    team_topic,
    valid_post_id,
    valid_team_id,
)
from protocol.ulid import new_ulid, valid_ulid

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "PROTOCOL_VERSION",
    "TOPIC_PREFIX",
    "Ack",
    "Command",
    "CommandResult",
    "Event",
    "Heartbeat",
    "InvalidTopic",
    "Page",
    "PageAnswer",
    "PageWithdrawn",
    "PostTopic",
    "Rejected",
    "ServerStatus",
    "Status",
    "TeamPosition",
    "TeamStatus",
    "decode_for_team",
    "decode_from_post",
    "decode_from_server",
    "decode_from_team",
    "encode",
    "new_ulid",
    "parse_post_topic",
    "post_topic",
    "server_status_topic",
    "team_topic",
    "valid_post_id",
    "valid_team_id",
    "valid_ulid",
]
