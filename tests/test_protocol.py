"""The wire contract: every message round-trips, every kind of bad input is refused by reason."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    MAX_PAYLOAD_BYTES,
    Ack,
    Command,
    CommandResult,
    Event,
    Heartbeat,
    InvalidTopic,
    Rejected,
    ServerStatus,
    Status,
    decode_from_post,
    decode_from_server,
    encode,
    new_ulid,
    parse_post_topic,
    post_topic,
    valid_post_id,
    valid_ulid,
)
from protocol.messages import MAX_JSON_DEPTH, json_depth

NOW = time.time()
EVENT = Event(id=new_ulid(), post="P001", seq=7, ts=NOW, hold_ms=120)
EDGE = {
    "event": EVENT,
    "heartbeat": Heartbeat(post="P001", ts=NOW, interval_s=10, uptime_s=5.5, outbox_depth=0,
                           button=False, strobe=True, siren=True, help=False),
    "status": Status(post="P001", state="online", ts=NOW),
    "cmdresult": CommandResult(id=new_ulid(), post="P001", cmd="silence", ok=True, ts=NOW),
}
SERVER = {
    "ack": Ack(post="P001", event_id=EVENT.id, incident_id=new_ulid(), ts=NOW),
    "cmd": Command(id=new_ulid(), post="P001", cmd="reset", ts=NOW),
}


@pytest.mark.parametrize("kind", sorted(EDGE))
def test_edge_messages_round_trip(kind: str) -> None:
    topic = post_topic("P001", kind)  # type: ignore[arg-type]
    where, decoded = decode_from_post(topic, encode(EDGE[kind]))
    assert where == ("P001", kind)
    assert decoded == EDGE[kind]


@pytest.mark.parametrize("kind", sorted(SERVER))
def test_server_messages_round_trip(kind: str) -> None:
    topic = post_topic("P001", kind)  # type: ignore[arg-type]
    assert decode_from_server(topic, encode(SERVER[kind]), "P001") == SERVER[kind]
    status = ServerStatus(state="online", ts=NOW)
    assert decode_from_server("alarmpost/v1/server/status", encode(status), "P001") == status


def _event_doc(**changes: object) -> bytes:
    doc = json.loads(encode(EVENT))
    for key, value in changes.items():
        if value is ...:
            doc.pop(key)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "topic,payload,reason",
    [
        ("alarmpost/v1/post/P001/event", b"{not json", "malformed"),
        ("alarmpost/v1/post/P001/event", b"", "empty"),
        ("alarmpost/v1/post/P001/event", b'{"v":' + b"[" * 4000, "too_deep"),
        ("alarmpost/v1/post/P001/callstate", b'{"v":' + b"[" * 4000, "too_deep"),
        ("alarmpost/v1/post/P001/heartbeat", b"[" * 2000, "too_deep"),
        ("alarmpost/v1/post/P001/status", b'{"a":' * 800, "too_deep"),
        ("alarmpost/v1/post/P001/event", b"[]", "invalid"),
        ("alarmpost/v1/post/P001/event", _event_doc(v=2), "unknown_version"),
        ("alarmpost/v1/post/P001/event", _event_doc(v="1"), "unknown_version"),
        ("alarmpost/v1/post/P001/event", _event_doc(id="not-a-ulid"), "invalid"),
        ("alarmpost/v1/post/P001/event", _event_doc(seq=0), "invalid"),
        ("alarmpost/v1/post/P001/event", _event_doc(ts=12.0), "invalid"),
        ("alarmpost/v1/post/P001/event", _event_doc(id=...), "invalid"),
        ("alarmpost/v1/post/P001/event", _event_doc(extra=1), "invalid"),
        ("alarmpost/v1/post/P001/event", _event_doc(type="fire"), "invalid"),
        ("alarmpost/v1/post/P001/event", _event_doc(post="P002"), "post_mismatch"),
        ("alarmpost/v1/post/P001/event", b" " * (MAX_PAYLOAD_BYTES + 1), "oversized"),
        ("alarmpost/v1/post/P001/ack", encode(SERVER["ack"]), "wrong_direction"),
        ("alarmpost/v2/post/P001/event", encode(EVENT), "bad_topic"),
        ("alarmpost/v1/post/P+1/event", encode(EVENT), "bad_topic"),
        ("alarmpost/v1/post/P001/event/x", encode(EVENT), "bad_topic"),
        ("alarmpost/v1/post/P001/selfdestruct", encode(EVENT), "bad_topic"),
        ("other/topic", encode(EVENT), "bad_topic"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        decode_from_post(topic, payload)
    assert info.value.reason == reason


def test_non_finite_numbers_are_rejected() -> None:
    doc = encode(EDGE["heartbeat"]).replace(b'"uptime_s":5.5', b'"uptime_s":1e999')
    with pytest.raises(Rejected) as info:
        decode_from_post("alarmpost/v1/post/P001/heartbeat", doc)
    assert info.value.reason == "invalid"


def test_nesting_is_measured_outside_strings_and_bounded_before_decoding() -> None:
    assert json_depth(encode(EDGE["heartbeat"])) <= 2
    assert json_depth(b'{"a":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}') == 1
    assert json_depth(b'{"a":"\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}') == 1
    assert json_depth(b"[" * 9) == 9
    assert json_depth(b"[]" * 100) == 1
    # A depth just inside the bound reaches the decoder (and is refused there as invalid).
    inside = b'{"v":' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    with pytest.raises(Rejected) as info:
        decode_from_post("alarmpost/v1/post/P001/event", inside)
    assert info.value.reason == "unknown_version"
    for deep in (b"[" * (MAX_JSON_DEPTH + 1), b'{"v":' + b"[" * 100_000):
        with pytest.raises(Rejected) as info:
            decode_from_post("alarmpost/v1/post/P001/callstate", deep[:MAX_PAYLOAD_BYTES])
        assert info.value.reason == "too_deep"


@given(st.recursive(st.none() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c,
                                                                        max_size=3),
                    max_leaves=40))
@settings(max_examples=300, deadline=None)
def test_json_depth_matches_the_real_nesting(doc: object) -> None:
    def depth(value: object) -> int:
        if isinstance(value, list):
            return 1 + max((depth(v) for v in value), default=0)
        if isinstance(value, dict):
            return 1 + max((depth(v) for v in value.values()), default=0)
        return 0

    assert json_depth(json.dumps(doc).encode(), limit=1000) == depth(doc)


@pytest.mark.parametrize("topic,payload,reason,detail", [
    ("alarmpost/v1/post/P002/ack", encode(SERVER["ack"]), "wrong_post", "addressed to 'P002'"),
    ("alarmpost/v1/post/P001/event", encode(EVENT), "wrong_direction",
     "'event' is not sent by the server"),
    ("alarmpost/v1/post/P001/ack", encode(Ack(post="P002", event_id=EVENT.id, incident_id="i",
                                               ts=NOW)),
     "post_mismatch", "topic names 'P001', body 'P002'"),
    ("alarmpost/v1/post/P+1/ack", encode(SERVER["ack"]), "bad_topic", "invalid post id"),
    ("alarmpost/v1/nope", encode(SERVER["ack"]), "bad_topic", ""),
])
def test_edge_refuses_what_is_not_the_servers_word_to_it(topic: str, payload: bytes,
                                                          reason: str, detail: str) -> None:
    with pytest.raises(Rejected) as info:
        decode_from_server(topic, payload, "P001")
    assert info.value.reason == reason
    assert detail in info.value.detail and info.value.detail


@given(st.text(max_size=80), st.binary(max_size=600))
@settings(max_examples=2000, deadline=None)
def test_decoding_anything_either_succeeds_or_is_rejected(topic: str, payload: bytes) -> None:
    try:
        decode_from_post(topic, payload)
    except Rejected as exc:
        assert exc.reason in Rejected.REASONS


@given(st.text(max_size=70))
def test_post_ids_never_contain_mqtt_wildcards_or_separators(post_id: str) -> None:
    if valid_post_id(post_id):
        assert not set(post_id) & {"+", "#", "/", "\x00", " "}
        assert parse_post_topic(post_topic(post_id, "event")).post_id == post_id
    else:
        with pytest.raises(InvalidTopic):
            post_topic(post_id, "event")


def test_reserved_ids_are_refused() -> None:
    assert not valid_post_id("server")
    assert valid_post_id("P001") and valid_post_id("gate-7_b")


def test_ulids_are_unique_sortable_and_valid() -> None:
    ids = [new_ulid(NOW + i / 1000) for i in range(1000)]
    assert len(set(ids)) == 1000
    assert all(valid_ulid(i) for i in ids)
    assert [i[:10] for i in ids] == sorted(i[:10] for i in ids)
    assert not valid_ulid("01ARZ3NDEKTSV4RRFFQ69G5FAu")


def test_team_ids_fit_a_user_name_and_refusals_say_why() -> None:
    from protocol.messages import Rejected
    from protocol.topics import InvalidTopic, team_user, valid_team_id

    assert valid_team_id("T" * 59) and team_user("T" * 59) == "team-" + "T" * 59
    assert not valid_team_id("T" * 60)  # "team-" + 60 would pass the 64 of a user name
    assert not valid_team_id("T/1") and not valid_team_id("")
    with pytest.raises(InvalidTopic, match="invalid team id 'T/1'"):
        team_user("T/1")
    exc = Rejected("oversized", "5000 bytes > 4096")
    assert (exc.reason, exc.detail, str(exc)) == ("oversized", "5000 bytes > 4096",
                                                  "oversized: 5000 bytes > 4096")
    assert str(Rejected("empty")) == "empty" and Rejected("empty").detail == ""


@pytest.mark.parametrize("bad", ["a\x00b", "\ud800", "ok\udfff"])
def test_free_text_refuses_what_is_not_text(bad: str) -> None:
    """NUL and lone surrogates are no text: refused at the door (a database that cannot store
    them would otherwise fail the whole batch they arrive in)."""
    from protocol.messages import CommandResult, Rejected, decode_from_post, encode

    good = CommandResult(id="01HZZZZZZZZZZZZZZZZZZZZZZZ", post="P001", cmd="silence", ok=True,
                         ts=NOW, detail="done, 中文 ok")
    assert decode_from_post("alarmpost/v1/post/P001/cmdresult", encode(good))[1] == good
    payload = json.dumps({**json.loads(encode(good)), "detail": bad}).encode()
    with pytest.raises(Rejected) as refused:
        decode_from_post("alarmpost/v1/post/P001/cmdresult", payload)
    # (A lone surrogate's JSON escape is already malformed to the decoder; a NUL is invalid.)
    assert refused.value.reason in ("invalid", "malformed")
