"""Property-based fuzzing of every JSON HTTP endpoint, their query and path parameters, and both
WebSockets (console and patrol app), through the real HTTP server.

Hypothesis generates the cases into a list first (deep nesting, huge and negative numbers, odd
Unicode with lone surrogates, wrong types, raw bytes); each test then plays them over one
kept-alive session per user, as fast as the server answers. Every test asserts: no answer is a
5xx, every refusal is a JSON error, the server still serves, and a real press afterwards is
committed and acknowledged."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from protocol.messages import Ack, Event
from protocol.ulid import new_ulid
from provisioning import deployment as d
from server.app import CentralServer
from tests.console_helpers import Console, add_users
from tests.helpers import MakeDeployment, db_rows, run_posts, run_server
from tests.patrol_helpers import TeamSpec, add_teams
from tests.patrol_web_helpers import Phone, give_app_passwords

# ---------------------------------------------------------------------------- strategies
CHARS = st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr),  # lone surrogates
                  st.sampled_from("\x00\n\"\\{}[]²٣𝟗\u202e\ufeff\uffff"))
TEXT = st.text(CHARS, max_size=40)
NUMBERS = st.one_of(
    st.integers(), st.integers(min_value=-(10 ** 60), max_value=10 ** 60),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1, 0, 2 ** 63, -(2 ** 63)]),
)
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
VALUES = st.recursive(LEAVES, lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(TEXT, children, max_size=4), max_leaves=12)


def _deep() -> st.SearchStrategy[str]:
    def build(n: int, style: int) -> str:
        if style == 0:
            return "[" * n + "]" * n
        if style == 1:
            return '{"a":' * n + "1" + "}" * n
        return "[{" * n  # unbalanced, never closed

    return st.builds(build, st.integers(10, 5000), st.integers(0, 2))


def _mutated(template: dict[str, Any]) -> st.SearchStrategy[str]:
    """The valid ``template`` with some fields replaced by anything, dropped, or added."""

    @st.composite
    def mutate(draw: st.DrawFn) -> str:
        doc = dict(template)
        for key in draw(st.lists(st.sampled_from([*template, "extra", "type"]), max_size=3)):
            if draw(st.booleans()):
                doc[key] = draw(VALUES)
            else:
                doc.pop(key, None)
        return json.dumps(doc, allow_nan=True)

    return mutate()


Edit = tuple[int, bool, Any]  # (which key, replace or drop, the new value)
Plan = tuple[str, Any]  # ("edit", [Edit, ...]) or ("raw", bytes)

# What a hostile client sends where a JSON object is expected: a plan, applied to every route's
# own valid body (so one generated example makes a case on each route).
PLANS: st.SearchStrategy[Plan] = st.one_of(
    st.lists(st.tuples(st.integers(0, 20), st.booleans(), VALUES), max_size=3).map(
        lambda edits: ("edit", edits)),
    st.lists(st.tuples(st.integers(0, 20), st.booleans(), VALUES), min_size=1, max_size=3).map(
        lambda edits: ("edit", edits)),
    VALUES.map(lambda v: ("raw", json.dumps(v).encode())),  # wrong types at the top
    _deep().map(lambda text: ("raw", text.encode())),
    st.binary(max_size=200).map(lambda b: ("raw", b)),
    TEXT.map(lambda text: ("raw", text.encode("utf-8", "surrogatepass"))),
    st.integers(60_000, 70_000).map(lambda n: ("raw", b'{"x": "' + b"y" * n + b'"}')),
)


def apply(plan: Plan, template: dict[str, Any]) -> bytes:
    kind, what = plan
    if kind == "raw":
        return bytes(what)
    doc = dict(template)
    keys = [*template, "extra", "type"]
    for index, replace, value in what:
        key = keys[index % len(keys)]
        if replace:
            doc[key] = value
        else:
            doc.pop(key, None)
    return json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")


def collect(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """``n`` hypothesis-generated examples of ``strategy``, as a list."""
    cases: list[Any] = []

    @settings(max_examples=n, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def gather(case: Any) -> None:
        cases.append(case)

    gather()
    return cases


def url_part(text: str) -> str:
    """``text`` percent-encoded as a client may send it (lone surrogates as invalid UTF-8)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


# ---------------------------------------------------------------------------- the deployment
@dataclass
class Fleet:
    dep: d.Deployment
    server: CentralServer
    incident: str


@pytest.fixture
async def fleet(make_deployment: MakeDeployment) -> AsyncIterator[Fleet]:
    dep = make_deployment(2)
    add_teams(dep, [TeamSpec("A", 1.0), TeamSpec("B", 3.0)])
    give_app_passwords(dep, "A", "B")
    async with run_server(dep) as server:
        add_users(server, ("op", "operator"), ("tech", "technician"), ("root", "admin"),
                  ("victim", "operator"))
        now = time.time()
        (res,) = server.storage.incidents.commit_events(
            [(Event(id=new_ulid(), post="P002", seq=1, ts=now), now)])
        yield Fleet(dep, server, res.incident_id)


async def still_serving_and_a_press_lands(fleet: Fleet) -> None:
    """The server answers, no 5xx was ever sent, and a real press is committed and acked."""
    dep, server = fleet.dep, fleet.server
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{dep.http_port}/healthz",
            headers={"Authorization": f"Bearer {dep.api_token}"}) as resp:
        assert resp.status == 200 and (await resp.json())["ok"] is True
    assert server.metrics.value("http_requests_total", status="500") == 0
    async with run_posts(dep, "P001") as posts:
        post = posts["P001"]
        acked: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()

        def on_ack(ack: Ack, _at: float) -> None:
            if not acked.done():
                acked.set_result(ack)

        post.agent.ack_listeners.append(on_ack)
        await post.press()
        ack = await asyncio.wait_for(acked, 10)
    assert db_rows(dep, "SELECT post_id FROM events WHERE id=?", ack.event_id) == [("P001",)]


def check_answer(what: str, status: int, body: Any) -> None:
    assert status < 500, (what, status, body)
    if status >= 400 and status != 405:
        assert isinstance(body, dict) and isinstance(body.get("error"), str), (what, status, body)


async def send(http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str],
               data: bytes | None = None) -> tuple[int, Any]:
    async with http.request(method, URL(url, encoded=True), headers=headers, data=data,
                            allow_redirects=False) as resp:
        raw = await resp.read()
        if resp.content_type == "application/json":
            return resp.status, json.loads(raw)
        return resp.status, raw[:200]


# ---------------------------------------------------------------------------- bodies
SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


def _body_cases(incident: str) -> list[tuple[str, str, bytes]]:
    """(who, path, body): who is op, tech, root, team, token, or anon-console/anon-patrol."""
    routes: list[tuple[str, str, dict[str, Any]]] = [
        ("op", f"/console/api/incidents/{incident}/resolve",
         {"classification": "false_alarm", "note": "fuzz"}),
        ("op", f"/console/api/incidents/{incident}/page", {"team_id": "A"}),
        ("op", f"/console/api/incidents/{incident}/pages/nope/cancel", {"reason": "x"}),
        ("op", f"/console/api/incidents/{incident}/redispatch", {"reason": "x"}),
        ("op", f"/console/api/incidents/{incident}/acknowledge", {}),
        ("op", "/console/api/posts/P002/command", {"cmd": "silence", "incident_id": incident}),
        ("tech", "/console/api/posts/P002/test_mode", {"on": True, "reason": "fuzz"}),
        ("root", "/console/api/users", {"name": "new-user", "role": "operator", "password": "x"}),
        ("root", "/console/api/users/victim/role", {"role": "supervisor"}),
        ("root", "/console/api/users/victim/disabled", {"disabled": False}),
        ("root", "/console/api/users/victim/password", {"password": "short"}),
        ("team", "/patrol/api/answer", {"page": "nope", "answer": "accept"}),
        ("team", "/patrol/api/status", {"state": "available"}),
        ("team", "/patrol/api/position", {"lat": 26.1, "lon": 119.3, "ts": time.time()}),
        ("token", "/api/teams", {"id": "T9", "name": "fuzz", "zone_polygon": [[26, 119]]}),
        ("anon-console", "/console/api/login", {"name": "op", "password": "wrong password"}),
        ("anon-patrol", "/patrol/api/login", {"team": "B", "password": "wrong password"}),
    ]
    # The generated plans, and always the kinds the test checks for by name (hypothesis may or
    # may not draw a deep enough one: CI runs it derandomized).
    plans: list[Plan] = [*collect(PLANS, 120), ("raw", b"[" * 3000 + b"]" * 3000),
                         ("raw", b'{"a":' * 40 + b"1" + b"}" * 40)]
    return [(who, path, apply(plan, template)) for plan in plans for who, path, template in routes]


async def test_fuzzed_json_bodies_on_every_json_route_never_get_a_5xx(fleet: Fleet) -> None:
    cases = _body_cases(fleet.incident)
    assert len(cases) >= 1500
    dep = fleet.dep
    base = f"http://127.0.0.1:{dep.http_port}"
    async with Console(dep) as op, Console(dep) as tech, Console(dep) as root, \
            Phone(dep) as team, Console(dep) as anon_console, Phone(dep) as anon_patrol:
        for client, who in ((op, "op"), (tech, "tech"), (root, "root")):
            assert (await client.login(who)).status == 200
        assert (await team.login("A")).status == 200
        console_token = await anon_console.login_token()
        patrol_token = await anon_patrol.login_token()
        clients: dict[str, tuple[aiohttp.ClientSession, dict[str, str]]] = {
            "op": (op.http, {"X-CSRF-Token": op.csrf, **op.origin}),
            "tech": (tech.http, {"X-CSRF-Token": tech.csrf, **tech.origin}),
            "root": (root.http, {"X-CSRF-Token": root.csrf, **root.origin}),
            "team": (team.http, {"X-CSRF-Token": team.csrf, **team.origin}),
            "anon-console": (anon_console.http, {"X-CSRF-Token": console_token,
                                                 **anon_console.origin}),
            "anon-patrol": (anon_patrol.http, {"X-CSRF-Token": patrol_token,
                                               **anon_patrol.origin}),
        }
        statuses: dict[int, int] = {}
        async with aiohttp.ClientSession() as token_http:
            clients["token"] = (token_http, {"Authorization": f"Bearer {dep.api_token}"})
            for who, path, body in cases:
                http, headers = clients[who]
                status, answer = await send(http, "POST", base + path,
                                            {**headers, "Content-Type": "application/json"}, body)
                check_answer(f"{who} POST {path} {body[:60]!r}", status, answer)
                statuses[status] = statuses.get(status, 0) + 1
    assert statuses.get(400, 0) > len(cases) / 3, statuses  # most were refused as bad input
    m = fleet.server.metrics
    assert m.value("http_bad_input_total", reason="too_deep") > 0
    assert m.value("http_bad_input_total", reason="malformed") > 0
    await still_serving_and_a_press_lands(fleet)


# ---------------------------------------------------------------------------- parameters
def _parameter_cases(incident: str) -> list[tuple[str, str]]:
    """(who, path with query): who is token, op or team."""
    digits = st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=6)
    odd = st.one_of(TEXT, digits, NUMBERS.map(str), st.sampled_from(["", " 1", "1e3", "0x10"]))
    queries = [
        ("token", "/api/incidents", ("state", "limit")), ("token", "/api/events", ("post", "limit")),
        ("token", "/api/faults", ("open", "limit")), ("token", "/api/posts", ("x",)),
        ("token", "/api/teams", ("limit",)), ("op", "/console/api/incidents", ("state",)),
        ("op", "/console/api/commands", ("post",)), ("op", "/console/api/posts", ("x",)),
        ("team", "/patrol/api/state", ("x",)),
    ]
    templates = [
        ("token", "/api/posts/{}"), ("token", "/api/incidents/{}"), ("token", "/api/teams/{}"),
        ("op", "/console/api/incidents/{}"), ("op", "/console/api/incidents/{}/acknowledge"),
        ("root", "/console/api/users/{}/role"), ("op", "/console/api/posts/{}/command"),
    ]

    @st.composite
    def query(draw: st.DrawFn) -> tuple[str, str]:
        who, path, names = draw(st.sampled_from(queries))
        chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3))
        qs = "&".join(f"{url_part(n)}={url_part(draw(odd))}" for n in chosen)
        return who, f"{path}?{qs}"

    @st.composite
    def path(draw: st.DrawFn) -> tuple[str, str]:
        who, template = draw(st.sampled_from(templates))
        return who, template.format(url_part(draw(st.one_of(TEXT.filter(bool), digits))))

    return collect(st.one_of(query(), path()), 1000)


async def test_fuzzed_query_and_path_parameters_never_get_a_5xx(fleet: Fleet) -> None:
    cases = _parameter_cases(fleet.incident)
    assert len(cases) >= 900
    dep = fleet.dep
    base = f"http://127.0.0.1:{dep.http_port}"
    async with Console(dep) as op, Console(dep) as root, Phone(dep) as team, \
            aiohttp.ClientSession() as token_http:
        assert (await op.login("op")).status == 200
        assert (await root.login("root")).status == 200
        assert (await team.login("A")).status == 200
        clients = {"token": (token_http, {"Authorization": f"Bearer {dep.api_token}"}),
                   "op": (op.http, {"X-CSRF-Token": op.csrf, **op.origin}),
                   "root": (root.http, {"X-CSRF-Token": root.csrf, **root.origin}),
                   "team": (team.http, {})}
        for who, target in cases:
            http, headers = clients[who]
            method = "POST" if target.endswith(("/acknowledge", "/role", "/command")) else "GET"
            status, answer = await send(http, method, base + target, headers,
                                        b"{}" if method == "POST" else None)
            check_answer(f"{who} {method} {target}", status, answer)
    await still_serving_and_a_press_lands(fleet)


# ---------------------------------------------------------------------------- WebSockets
Frame = tuple[str, Any]  # ("text", str) or ("bytes", bytes)


def _frames(templates: list[dict[str, Any]], n: int, max_bytes: int) -> list[Frame]:
    text = st.one_of(
        st.sampled_from(templates).flatmap(_mutated),
        VALUES.map(json.dumps), _deep(), TEXT,
        st.sampled_from(['{"type": "ping"}', '{"type":"ping"}', "", "null", "[]", '{"type": ""}']),
    ).map(lambda s: s.encode("utf-8", "surrogatepass")[:max_bytes].decode("utf-8", "replace"))
    return collect(st.one_of(text.map(lambda s: ("text", s)),
                             st.binary(max_size=100).map(lambda b: ("bytes", b))), n)


async def _play(ws: aiohttp.ClientWebSocketResponse, frame: Frame) -> None:
    if frame[0] == "text":
        await ws.send_str(frame[1])
    else:
        await ws.send_bytes(frame[1])


async def _until(ws: aiohttp.ClientWebSocketResponse, done: Callable[[dict[str, Any]], bool],
                 within: float = 10.0) -> list[dict[str, Any]]:
    """Read messages until one satisfies ``done``; every one must be a JSON object."""
    seen: list[dict[str, Any]] = []

    async def read() -> None:
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, ws.close_code)
            message = json.loads(msg.data)
            assert isinstance(message, dict)
            seen.append(message)
            if done(message):
                return

    await asyncio.wait_for(read(), within)
    return seen


async def test_fuzzed_console_websocket_frames_are_answered_never_crash(fleet: Fleet) -> None:
    frames = _frames([
        {"type": "ping"},
        {"type": "call.start", "post_id": "P002", "sdp": SDP, "mode": "view",
         "incident_id": fleet.incident},
        {"type": "call.hangup", "call_id": "nope"},
        {"type": "call.start", "post_id": "P999", "sdp": "x"},
    ], 1200, 60_000)
    assert len(frames) >= 1100
    dep, server = fleet.dep, fleet.server
    async with Console(dep) as op:
        assert (await op.login("op")).status == 200
        ws = await op.ws()
        await _until(ws, lambda m: m["type"] == "hello")
        for i in range(0, len(frames), 50):
            for frame in frames[i:i + 50]:
                await _play(ws, frame)
            # A barrier: the socket still answers after each batch of 50.
            await ws.send_str(json.dumps({"type": "ping", "barrier": i}))
            seen = await _until(ws, lambda m: m.get("type") == "pong")
            assert all(isinstance(m.get("type"), str) for m in seen), seen
        await ws.close()
    assert server.metrics.value("console_ws_rejected_total", reason="malformed") > 100
    await still_serving_and_a_press_lands(fleet)


async def test_fuzzed_patrol_websocket_frames_are_answered_never_crash(fleet: Fleet) -> None:
    frames = _frames([{"type": "ping"}], 800, 4000)  # the app's frames are at most 4 KiB
    assert len(frames) >= 700
    dep, server = fleet.dep, fleet.server
    async with Phone(dep) as team:
        assert (await team.login("A")).status == 200
        ws = await team.ws()
        await _until(ws, lambda m: m["type"] == "hello")
        for frame in frames:
            await _play(ws, frame)
            (answer,) = await _until(ws, lambda m: True)
            assert answer["type"] in ("error", "pong"), (frame, answer)
        await ws.close()
    assert server.metrics.value("patrol_web_refused_total", reason="ws_message") > 500
    await still_serving_and_a_press_lands(fleet)


# ---------------------------------------------------------------------------- header bytes
def _header_cases() -> list[tuple[str, str, bytes, bytes]]:
    """(method, path, header name, raw header value): any bytes but CR and LF."""
    routes = [("GET", "/api/posts"), ("GET", "/healthz"), ("POST", "/console/api/login"),
              ("POST", "/console/api/logout"), ("GET", "/console/api/me"),
              ("GET", "/console/ws?csrf=x"), ("POST", "/patrol/api/login"),
              ("POST", "/patrol/api/status"), ("GET", "/patrol/ws?csrf=x"), ("GET", "/console/")]
    names = [b"Authorization", b"Cookie", b"Origin", b"X-CSRF-Token", b"Content-Type",
             b"Upgrade", b"Accept-Encoding", b"Host"]
    value = st.one_of(
        st.binary(max_size=60),
        st.tuples(st.sampled_from([b"Bearer ", b"alarmpost_session=", b"alarmpost_prelogin=",
                                   b"http://[", b"http://127.0.0.1:1/", b"websocket"]),
                  st.binary(max_size=40)).map(b"".join),
    ).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    return collect(st.tuples(st.sampled_from(routes), st.sampled_from(names), value).map(
        lambda c: (c[0][0], c[0][1], c[1], c[2])), 1000)


async def test_fuzzed_header_bytes_never_get_a_5xx(fleet: Fleet) -> None:
    cases = _header_cases()
    assert len(cases) >= 900
    dep, server = fleet.dep, fleet.server
    for method, path, name, value in cases:
        reader, writer = await asyncio.open_connection("127.0.0.1", dep.http_port)
        extra = b"" if name == b"Host" else b"Host: 127.0.0.1:%d\r\n" % dep.http_port
        writer.write(b"%s %s HTTP/1.1\r\n%s%s: %s\r\nContent-Length: 2\r\nConnection: close\r\n"
                     b"\r\n{}" % (method.encode(), path.encode(), extra, name, value))
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status_line = answer.split(b"\r\n", 1)[0].split(b" ")
        assert status_line[0] in (b"HTTP/1.0", b"HTTP/1.1") and 100 <= int(status_line[1]) < 500, (
            method, path, name, value, answer[:300])
    assert server.metrics.value("http_requests_total", status="500") == 0
    await still_serving_and_a_press_lands(fleet)
