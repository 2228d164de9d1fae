"""The protocol's door in microseconds: each refusal's reason and what it says was wrong.

:func:`protocol.messages.decode_from_post` is what the server runs on every message a post
publishes. tests/test_protocol.py checks that every kind of bad input is refused by reason; these
check the bounds at their exact edges and the detail each refusal carries (it is what the
server's rejection log shows an operator), so that ``alarmpost bench mutation`` finds a broken
bound or a lost detail within milliseconds.
"""

from __future__ import annotations

import time

import msgspec
import pytest

import protocol.messages
from protocol.messages import (
    MAX_JSON_DEPTH,
    MAX_PAYLOAD_BYTES,
    CallSignal,
    Event,
    Heartbeat,
    Rejected,
    decode_from_post,
    encode,
)
from protocol.topics import InvalidTopic, parse_post_topic, post_topic
from protocol.ulid import new_ulid

POST = "P001"
EVENT_TOPIC = post_topic(POST, "event")


def _event(**fields: object) -> Event:
    return Event(id=new_ulid(), post=POST, seq=1, ts=time.time(), **fields)  # type: ignore[arg-type]


def _refused(topic: str, payload: bytes) -> Rejected:
    with pytest.raises(Rejected) as info:
        decode_from_post(topic, payload)
    return info.value


def _error_of(payload: bytes, cls: type) -> str:
    """What msgspec itself says of ``payload`` decoded as ``cls``."""
    with pytest.raises(msgspec.DecodeError) as info:
        msgspec.json.Decoder(cls).decode(payload)
    return str(info.value)


def test_empty_oversized_and_deep_payloads_are_refused_with_what_was_wrong() -> None:
    empty = _refused(EVENT_TOPIC, b"")
    assert (empty.reason, empty.detail) == ("empty", "no payload (a cleared retained message?)")
    big = _refused(EVENT_TOPIC, b" " * (MAX_PAYLOAD_BYTES + 1))
    assert (big.reason, big.detail) == ("oversized", f"{MAX_PAYLOAD_BYTES + 1} bytes > 4096")
    nested = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    deep = _refused(EVENT_TOPIC, nested)
    assert (deep.reason, deep.detail) == ("too_deep", f"nesting deeper than 8 ({len(nested)} bytes)")


def test_the_bounds_hold_at_their_exact_edges() -> None:
    good = encode(_event())
    exactly = good + b" " * (MAX_PAYLOAD_BYTES - len(good))  # JSON may end in white space
    assert len(exactly) == MAX_PAYLOAD_BYTES
    assert decode_from_post(EVENT_TOPIC, exactly)[1] == msgspec.json.decode(good, type=Event)
    # Nested exactly as deep as allowed: past the depth check, refused by the decoder instead.
    # (One more bracket beside them: more brackets than the bound, so the depth is measured.)
    edge = b"[[]," + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"]"
    assert edge.count(b"[") == MAX_JSON_DEPTH + 1
    assert _refused(EVENT_TOPIC, edge).reason == "invalid"
    # Many brackets side by side nest only two deep: not too deep either.
    wide = b"[" + b"[]," * MAX_JSON_DEPTH + b"[]]"
    assert _refused(EVENT_TOPIC, wide).reason == "invalid"


def test_a_call_answer_may_be_bigger_than_any_other_message() -> None:
    answer = CallSignal(id=new_ulid(), post=POST, kind="answer", sdp="v=0\r\n" + "a" * 6000,
                        ts=time.time())
    payload = encode(answer)
    assert MAX_PAYLOAD_BYTES < len(payload) < protocol.messages.MAX_CALL_PAYLOAD_BYTES
    assert decode_from_post(post_topic(POST, "callstate"), payload)[1] == answer
    too_big = encode(_event()) + b" " * MAX_PAYLOAD_BYTES  # an event that big is not
    assert _refused(EVENT_TOPIC, too_big).reason == "oversized"


def test_undecodable_payloads_are_refused_with_the_decoders_own_words() -> None:
    malformed = _refused(EVENT_TOPIC, b"{not json")
    assert (malformed.reason, malformed.detail) == ("malformed", _error_of(b"{not json", Event))
    # A wrong value: msgspec's message quotes it, and the detail keeps its first 200 characters.
    wrong = encode(_event()).replace(b'"type":"alarm"', b'"type":"' + b"x" * 300 + b'"')
    invalid = _refused(EVENT_TOPIC, wrong)
    assert len(_error_of(wrong, Event)) > 200
    assert (invalid.reason, invalid.detail) == ("invalid", _error_of(wrong, Event)[:200])
    # A version this server does not speak: named, at most 20 characters of it.
    future = b'{"v":"' + b"9" * 30 + b'"}'
    version = _refused(EVENT_TOPIC, future)
    assert (version.reason, version.detail) == ("unknown_version", "v='" + "9" * 20 + "'")


def test_topics_and_bodies_that_do_not_match_are_refused_with_what_was_wrong() -> None:
    good = encode(_event())
    with pytest.raises(InvalidTopic) as topic_error:
        parse_post_topic("alarmpost/v1/post/P001")
    bad_topic = _refused("alarmpost/v1/post/P001", good)
    assert (bad_topic.reason, bad_topic.detail) == ("bad_topic", str(topic_error.value))
    assert bad_topic.detail != ""
    direction = _refused(post_topic(POST, "ack"), good)
    assert (direction.reason, direction.detail) == ("wrong_direction",
                                                    "'ack' is not sent by posts")
    mismatch = _refused(post_topic("P002", "event"), good)
    assert (mismatch.reason, mismatch.detail) == ("post_mismatch",
                                                  "topic names 'P002', body 'P001'")


def test_decoding_works_from_a_cold_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # The decoders are made on first use and kept: the first message of each kind, and every
    # one after it, must decode the same.
    monkeypatch.setattr(protocol.messages, "_decoders", {})
    for _ in range(2):
        event = _event()
        assert decode_from_post(EVENT_TOPIC, encode(event))[1] == event


class _Decoded:
    """A decoder that returns a message as it is, whatever the payload."""

    def __init__(self, message: object) -> None:
        self.message = message

    def decode(self, payload: bytes) -> object:
        return self.message


def test_a_number_that_is_not_finite_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    beat = Heartbeat(post=POST, ts=time.time(), interval_s=10.0, uptime_s=5.0, outbox_depth=0,
                     button=False, strobe=False, siren=False, help=False)
    # JSON has no infinity (msgspec refuses 1e999 as out of range); should a decoder ever
    # produce one, the message is still refused.
    assert _refused(post_topic(POST, "heartbeat"),
                    encode(beat).replace(b'"uptime_s":5.0', b'"uptime_s":1e999')).reason == "invalid"
    endless = msgspec.structs.replace(beat, uptime_s=float("inf"))
    monkeypatch.setattr(protocol.messages, "_decoders", {Heartbeat: _Decoded(endless)})
    refused = _refused(post_topic(POST, "heartbeat"), encode(beat))
    assert (refused.reason, refused.detail) == ("invalid", "uptime_s is not finite")
    monkeypatch.setattr(protocol.messages, "_decoders", {Heartbeat: _Decoded(beat)})
    assert decode_from_post(post_topic(POST, "heartbeat"), encode(beat))[1] == beat


class _RecursingDecoder:
    def decode(self, payload: bytes) -> object:
        raise RecursionError("maximum recursion depth exceeded")


def test_a_decoder_that_recurses_too_deep_is_a_refusal_never_an_escape(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Unreachable with the depth bound in front of the decoder; if it ever were reached, the
    # message is refused like any too deep one.
    monkeypatch.setattr(protocol.messages, "_decoders", {Event: _RecursingDecoder()})
    payload = encode(_event())
    refused = _refused(EVENT_TOPIC, payload)
    assert (refused.reason, refused.detail) == ("too_deep", f"{len(payload)} bytes")
