"""Property-based fuzzing of the server's MQTT ingest through the real broker.

Hypothesis builds garbage for every topic family a post (event, heartbeat, status, cmdresult,
callstate) and a patrol team (answer, status, position) may publish: deep nesting, huge and
negative numbers, odd unicode, wrong types, raw bytes, oversized bodies, and mutations of valid
messages. It is published with a real post's and a real team's credentials through the private
Mosquitto to a running server, which must count every message, fail no handler, stay ready, and
still commit and acknowledge a valid press afterwards.
"""

from __future__ import annotations

import asyncio
import json
import time
import tomllib
from typing import Any

import aiomqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.messages import Ack, Event, decode_from_server, encode
from protocol.ulid import new_ulid
from provisioning import deployment as d
from server.app import CentralServer
from tests.helpers import MakeDeployment, api, run_server, until
from tests.patrol_helpers import TeamSpec, add_teams

POST_FAMILIES = ("event", "heartbeat", "status", "cmdresult", "callstate")
TEAM_FAMILIES = ("answer", "status", "position")
CASES = 6000


def _templates() -> dict[str, dict[str, Any]]:
    """A valid body per family (posts as P001, teams as T1), to mutate."""
    now = time.time()
    return {
        "event": {"v": 1, "id": new_ulid(), "post": "P001", "seq": 1, "ts": now, "type": "alarm",
                  "hold_ms": 100, "epoch": "abc"},
        "heartbeat": {"v": 1, "post": "P001", "ts": now, "interval_s": 1.0, "uptime_s": 3.0,
                      "outbox_depth": 0, "button": False, "strobe": False, "siren": False,
                      "help": False, "silent": False, "faults": ["storage"]},
        "status": {"v": 1, "post": "P001", "state": "online", "ts": now, "reason": ""},
        "cmdresult": {"v": 1, "id": new_ulid(), "post": "P001", "cmd": "silence", "ok": True,
                      "detail": "", "ts": now},
        "callstate": {"v": 1, "id": new_ulid(), "post": "P001", "kind": "answer", "sdp": "v=0",
                      "ts": now, "reason": ""},
        "team:answer": {"v": 1, "page": new_ulid(), "team": "T1", "incident": new_ulid(),
                        "answer": "accept", "ts": now},
        "team:status": {"v": 1, "team": "T1", "state": "available", "ts": now},
        "team:position": {"v": 1, "team": "T1", "lat": 26.0, "lon": 119.3, "ts": now},
    }


TEMPLATES = _templates()

ODD_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40) | \
    st.sampled_from(["\u0000", "\u202e\u202d", "\ud800", "\U0001f6a8" * 30, "P001\u0000",
                     "T1/../P002", "+", "#", "", "a" * 5000])
NUMBERS = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([-1, 0, 2**53 + 1, -(2**63), 2**64, 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-0.0, 1e308, -1e308, 5e-324, 4_102_444_801.0, 1_577_836_799.0]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, ODD_TEXT)
WRONG_TYPES = st.recursive(
    SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(ODD_TEXT, c, max_size=3),
    max_leaves=8)


def _nested(depth: int, opener: str) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if opener == "[" else {"a": value}
    return value


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn, family: str) -> bytes:
    """A family's valid body with fields changed, removed, added or nested deeply."""
    doc = dict(TEMPLATES[family])
    for key in draw(st.lists(st.sampled_from([*doc, "extra", "v", "post", "team"]), max_size=3)):
        how = draw(st.sampled_from(["number", "wrong", "drop", "deep"]))
        if how == "number":
            doc[key] = draw(NUMBERS)
        elif how == "wrong":
            doc[key] = draw(WRONG_TYPES)
        elif how == "deep":
            doc[key] = _nested(draw(st.integers(2, 60)), draw(st.sampled_from("[{")))
        else:
            doc.pop(key, None)
    return _dumps(doc)


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    """Nesting far past any limit, with and without closing brackets, in a few shapes."""
    n = draw(st.integers(9, 4000))
    shape = draw(st.sampled_from([b"[", b'{"a":', b'{"v":[', b'[{"x":']))
    prefix = draw(st.sampled_from([b"", b'{"v":', b'{"post":"P001","v":']))
    body = prefix + shape * n
    if draw(st.booleans()):
        body += b"]" * n
    return body[:4096]


def payloads(family: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        mutated(family),
        deep(),
        st.binary(max_size=300),
        ODD_TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")),
        WRONG_TYPES.map(_dumps),
        st.sampled_from([b"", b"null", b"{}", b"[]", b'"\xff\xfe"', b"1e999", b"-0",
                         b'{"v":1,"post":"P001","ts":1e400}', b"{" + b" " * 5000 + b"}",
                         b'{"post":"\xc3\x28"}', b"\xef\xbb\xbf{}"]),
    )


FAMILIES = [*POST_FAMILIES, *(f"team:{k}" for k in TEAM_FAMILIES)]


@st.composite
def case(draw: st.DrawFn) -> tuple[str, bytes]:
    family = draw(st.sampled_from(FAMILIES))
    return family, draw(payloads(family))


def generate(n: int, per_example: int = 4) -> list[tuple[str, bytes]]:
    """At least ``n`` (family, payload) cases, ``per_example`` from each hypothesis example
    (hypothesis's own cost is per example)."""
    cases: list[tuple[str, bytes]] = []

    @settings(max_examples=-(-n // per_example), database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(case(), min_size=per_example, max_size=per_example))
    def collect(drawn: list[tuple[str, bytes]]) -> None:
        cases.extend(drawn)

    collect()
    return cases


def _password(path: Any) -> str:
    return str(tomllib.loads(path.read_text())["mqtt"]["password"])


def _total(server: CentralServer, name: str) -> float:
    return sum(server.metrics._counters[name].values())


async def _publish_all(client: aiomqtt.Client, items: list[tuple[str, bytes]]) -> None:
    for start in range(0, len(items), 200):  # QoS 1, PUBACKed, in order
        await asyncio.gather(*(client.publish(topic, payload, qos=1)
                               for topic, payload in items[start:start + 200]))


async def test_fuzzed_messages_on_every_topic_family_never_break_the_server(
    make_deployment: MakeDeployment,
) -> None:
    dep: d.Deployment = make_deployment(3)
    add_teams(dep, [TeamSpec("T1", 1.0)])
    cases = generate(CASES)
    assert len(cases) >= 5000
    families = {family for family, _ in cases}
    assert families == set(FAMILIES), families
    post_cases = [(f"alarmpost/v1/post/P001/{f}", p) for f, p in cases if not f.startswith("team:")]
    team_cases = [(f"alarmpost/v1/team/team-T1/{f[5:]}", p) for f, p in cases if f.startswith("team:")]
    kinds = {
        "deep": sum(1 for _, p in cases if p.count(b"[") + p.count(b"{") > 8),
        "not_json": sum(1 for _, p in cases if not _is_json(p)),
    }
    assert kinds["deep"] > 200 and kinds["not_json"] > 200, kinds

    async with run_server(dep) as server:
        async with aiomqtt.Client("127.0.0.1", dep.broker_port, username="P001",
                                  password=_password(dep.post_config("P001")), identifier="P001",
                                  protocol=aiomqtt.ProtocolVersion.V5) as post:
            await _publish_all(post, post_cases)

            def post_counted() -> bool:
                return (_total(server, "rejected_total") + _total(server, "messages_in_total")
                        == len(post_cases))

            await until(post_counted, 20, "every post message counted, rejected or accepted")

        rejected_before = _total(server, "rejected_total")
        async with aiomqtt.Client("127.0.0.1", dep.broker_port, username="team-T1",
                                  password=_password(dep.team_config("T1")), identifier="team-T1",
                                  protocol=aiomqtt.ProtocolVersion.V5) as team:
            await _publish_all(team, team_cases)

        # A valid press afterwards (the broker passes it on after everything above) is
        # committed and acknowledged.
        async with aiomqtt.Client("127.0.0.1", dep.broker_port, username="P001",
                                  password=_password(dep.post_config("P001")), identifier="P001",
                                  protocol=aiomqtt.ProtocolVersion.V5) as post:
            await post.subscribe("alarmpost/v1/post/P001/ack", qos=1)
            press = Event(id=new_ulid(), post="P001", seq=10**6, ts=time.time(), epoch="fresh")
            await post.publish("alarmpost/v1/post/P001/event", encode(press), qos=1)

            async def acked() -> Ack:
                async for message in post.messages:
                    ack = decode_from_server(str(message.topic), bytes(message.payload),  # type: ignore[arg-type]
                                             "P001")
                    if isinstance(ack, Ack) and ack.event_id == press.id:
                        return ack
                raise AssertionError("no ACK")

            ack = await asyncio.wait_for(acked(), 20)
        assert not ack.duplicate
        committed = server.storage.incidents.events("P001", 10)
        assert committed[0]["id"] == press.id

        m = server.metrics
        team_seen = (_total(server, "rejected_total") - rejected_before
                     + _total(server, "team_messages_total"))
        assert team_seen >= len(team_cases), "a team message vanished uncounted"
        assert _total(server, "handler_errors_total") == 0
        assert m.value("dispatch_errors_total") == 0
        for reason in ("too_deep", "malformed", "invalid", "oversized", "empty"):
            assert m.value("rejected_total", reason=reason) > 0, reason
        assert server.ready.is_set()
        assert (await api(dep, "/healthz"))["ok"] is True


def _is_json(payload: bytes) -> bool:
    try:
        json.loads(payload)
    except (ValueError, RecursionError):
        return False
    return True
