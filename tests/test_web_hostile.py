"""Hostile browsers against every HTTP surface: login limits that hold under concurrency without
locking a named account out, odd parameters and bodies answered 400 (never 500), WebSocket
frames bounded, and sockets that trickle their headers closed while others are served."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from provisioning import deployment as d
from server.app import CentralServer
from server.web.auth import LoginLimiter
from tests.console_helpers import Console, add_users
from tests.helpers import MakeDeployment, db_rows, run_server
from tests.patrol_helpers import TeamSpec, add_teams
from tests.patrol_web_helpers import APP_PASSWORD, Phone, give_app_passwords

MAX_DELAY_S = 2.0  # the test deployment's cap on a named account's delay
HEADER_TIMEOUT_S = 2.0
DEEP = "[" * 50_000 + "]" * 50_000  # 100 KB over the bodies' bound
NESTED = '{"a":' * 3000 + "1" + "}" * 3000  # 17 KB: small, but deeper than any parser likes


@pytest.fixture
async def hostile(make_deployment: MakeDeployment, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[tuple[d.Deployment, CentralServer]]:
    """A server with teams A and B (app passwords set), short login delays and header deadline."""
    monkeypatch.setenv("ALARMPOST_SERVER_CONSOLE_LOGIN_MAX_DELAY_S", str(MAX_DELAY_S))
    monkeypatch.setenv("ALARMPOST_SERVER_HTTP_READ_TIMEOUT_S", str(HEADER_TIMEOUT_S))
    dep = make_deployment(2)
    add_teams(dep, [TeamSpec("A", 1.0), TeamSpec("B", 3.0)])
    give_app_passwords(dep, "A", "B")
    async with run_server(dep) as server:
        yield dep, server


# ---------------------------------------------------------------------------- login limits
async def _concurrent_guesses(client: Console | Phone, who: str, n: int) -> list[int]:
    token = await client.login_token()
    return list(await asyncio.gather(*(client.try_login(token, who, f"guess number {i}")
                                       for i in range(n))))


async def test_concurrent_wrong_console_passwords_are_counted_before_the_check(
    hostile: tuple[d.Deployment, CentralServer]
) -> None:
    dep, server = hostile
    add_users(server, ("carol", "operator"))
    async with Console(dep, source="127.0.0.2") as eve:
        statuses = await _concurrent_guesses(eve, "carol", 30)
    attempts = server.config.console.login_attempts
    assert statuses.count(401) <= attempts, statuses
    assert statuses.count(429) >= 30 - attempts, statuses
    assert set(statuses) <= {401, 429}
    # What was checked against the hash: each check leaves a failed login in the audit.
    checked = db_rows(dep, "SELECT count(*) FROM console_audit WHERE action='login_failed'")[0][0]
    assert checked <= attempts
    assert server.metrics.value("console_logins_total", result="failed") == checked
    assert server.metrics.value("login_refused_total", app="console", reason="address") >= 25


async def test_concurrent_wrong_patrol_passwords_are_counted_before_the_check(
    hostile: tuple[d.Deployment, CentralServer]
) -> None:
    dep, server = hostile
    async with Phone(dep, source="127.0.0.2") as eve:
        statuses = await _concurrent_guesses(eve, "B", 30)
    attempts = server.config.console.login_attempts
    assert statuses.count(401) <= attempts, statuses
    assert statuses.count(429) >= 30 - attempts, statuses
    assert server.metrics.value("patrol_web_logins_total", result="failed") <= attempts
    assert server.metrics.value("login_refused_total", app="patrol", reason="address") >= 25


async def test_guesses_at_an_operators_name_slow_it_down_but_never_lock_it_out(
    hostile: tuple[d.Deployment, CentralServer]
) -> None:
    dep, server = hostile
    add_users(server, ("alice", "operator"))
    # 50 wrong guesses at alice from one address (most refused), then 5 from each of ten more
    # (all checked: alice's name now has 55 recent failures).
    async with Console(dep, source="127.0.0.2") as eve:
        statuses = await _concurrent_guesses(eve, "alice", 50)
    assert set(statuses) == {401, 429}

    async def from_address(n: int) -> list[int]:
        async with Console(dep, source=f"127.0.1.{n}") as bot:
            return await _concurrent_guesses(bot, "alice", 5)

    spread = await asyncio.gather(*(from_address(n) for n in range(1, 11)))
    assert all(s == [401] * 5 for s in spread), spread
    assert server.metrics.value("login_delayed_total", app="console") > 0
    # The real alice, from her own desk, with her password: in, after at most the cap.
    async with Console(dep, source="127.0.0.3") as alice:
        started = time.monotonic()
        resp = await alice.login("alice")
        took = time.monotonic() - started
        assert resp.status == 200
        assert (await alice.get("/console/api/me"))[1]["name"] == "alice"
    assert MAX_DELAY_S * 0.9 <= took <= MAX_DELAY_S + 2.0, took
    # Her success clears the name's delay.
    async with Console(dep, source="127.0.0.4") as again:
        started = time.monotonic()
        assert (await again.login("alice")).status == 200
        assert time.monotonic() - started < MAX_DELAY_S * 0.9


async def test_guesses_at_a_team_slow_it_down_but_never_lock_it_out(
    hostile: tuple[d.Deployment, CentralServer]
) -> None:
    dep, server = hostile
    async with Phone(dep, source="127.0.0.2") as eve:
        statuses = await _concurrent_guesses(eve, "A", 50)
    assert statuses.count(401) <= server.config.console.login_attempts
    async with Phone(dep, source="127.0.0.3") as team_a:
        started = time.monotonic()
        resp = await team_a.login("A", APP_PASSWORD)
        assert resp.status == 200
        assert time.monotonic() - started <= MAX_DELAY_S + 2.0
        assert (await team_a.get("/patrol/api/state"))[1]["team"] == "A"


def test_limiter_counts_before_the_check_and_delays_a_name_without_locking_it() -> None:
    limiter = LoginLimiter(attempts=3, window_s=60, delay_s=0.5, max_delay_s=8.0, free=2)
    # The address's budget is taken when the attempt starts, not when it has failed.
    tickets = [limiter.begin("10.0.0.1", "alice", now=0.0) for _ in range(3)]
    assert all(t.admitted for t in tickets)
    refused = limiter.begin("10.0.0.1", "alice", now=0.0)
    assert not refused.admitted and refused.retry_after == pytest.approx(60)
    # A success gives its slot back; failures keep theirs for the window.
    limiter.succeeded(tickets[0], now=0.0)
    assert limiter.begin("10.0.0.1", "bob", now=1.0).admitted
    for t in tickets[1:]:
        limiter.failed(t, now=1.0)
    assert not limiter.begin("10.0.0.1", "carol", now=2.0).admitted
    assert limiter.begin("10.0.0.1", "carol", now=61.5).admitted  # the window slid
    # A name: a delay growing 0.5, 1, 2, 4, 8, 8 s after `free` failures; never a refusal.
    delays = []
    for i in range(9):
        t = limiter.begin(f"10.1.0.{i}", "dave", now=100.0)
        assert t.admitted
        delays.append(t.delay)
        limiter.failed(t, now=100.0)
    assert delays == [0, 0, 0.5, 1, 2, 4, 8, 8, 8]
    # Attempts in flight count too: ten concurrent guesses at one name are not all free.
    fresh = LoginLimiter(attempts=100, window_s=60, delay_s=0.5, max_delay_s=8.0, free=2)
    assert [fresh.begin("10.2.0.1", "erin", now=0).delay for _ in range(5)] == [0, 0, 0.5, 1, 2]
    # A right password after the delay clears the name.
    t = limiter.begin("10.9.9.9", "dave", now=101.0)
    assert t.delay == 8
    limiter.succeeded(t, now=101.0)
    assert limiter.begin("10.9.9.9", "dave", now=101.0).delay == 0


def test_limiter_memory_is_bounded_under_a_spray_of_names_and_addresses() -> None:
    limiter = LoginLimiter(attempts=5, window_s=60, max_keys=1000)
    for i in range(20_000):
        t = limiter.begin(f"10.{i // 256 % 256}.{i % 256}.1", f"user{i}", now=float(i) / 1000)
        limiter.failed(t, now=float(i) / 1000)
    assert limiter.size() <= 2 * 1000


# ---------------------------------------------------------------------------- odd input: 400
async def _token_get(dep: d.Deployment, http: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
    async with http.get(f"http://127.0.0.1:{dep.http_port}{path}",
                        headers={"Authorization": f"Bearer {dep.api_token}"}) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


@pytest.mark.parametrize("query", [
    "/api/incidents?limit=%C2%B2",  # "²": isdigit() but not int()
    "/api/events?limit=%D9%A3",  # Arabic-Indic three: int() takes it, it is still not ASCII
    "/api/faults?limit=99999999999999999999999999999",
    "/api/incidents?limit=-1",
    "/api/incidents?state=%00",
    "/api/events?post=%ED%A0%80",  # a lone surrogate once decoded
    "/api/events?post=" + "P" * 5000,
    "/api/teams/%ED%A0%80",
    "/api/posts/%ED%A0%80",
    "/api/incidents/%ED%A0%80",
])
async def test_odd_query_parameters_are_answered_400_or_404(
    hostile: tuple[d.Deployment, CentralServer], query: str
) -> None:
    dep, server = hostile
    async with aiohttp.ClientSession() as http:
        status, body = await _token_get(dep, http, query)
    assert status in (400, 404), (status, body)
    assert isinstance(body, dict) and body["error"], body
    assert server.metrics.value("http_requests_total", status="500") == 0


async def test_nested_and_oversized_json_bodies_are_400_on_every_json_route(
    hostile: tuple[d.Deployment, CentralServer]
) -> None:
    dep, server = hostile
    add_users(server, ("root", "admin"), ("op", "operator"), ("tech", "technician"))
    now = time.time()
    from protocol.messages import Event
    from protocol.ulid import new_ulid

    (res,) = server.storage.incidents.commit_events([(Event(id=new_ulid(), post="P001", seq=1, ts=now),
                                            now)])
    inc = res.incident_id
    console_routes = {
        "op": [f"/console/api/incidents/{inc}/resolve", f"/console/api/incidents/{inc}/page",
               f"/console/api/incidents/{inc}/redispatch", "/console/api/posts/P001/command"],
        "tech": ["/console/api/posts/P001/test_mode"],
        "root": ["/console/api/users", "/console/api/users/op/role",
                 "/console/api/users/op/disabled", "/console/api/users/op/password"],
    }
    bodies = [NESTED.encode(), DEEP.encode(), b'{"name": 1e999999, "password": NaN}',
              b'{"name": ' + b"9" * 5000 + b"}", b"\xff\xfe{", b'"just a string"',
              b'{"a": "\\ud800"}']
    statuses: list[tuple[str, int]] = []
    for user, paths in console_routes.items():
        async with Console(dep) as c:
            assert (await c.login(user)).status == 200
            for path in paths:
                for raw in bodies:
                    status, body = await c.post(path, raw=raw)
                    statuses.append((path, status))
                    assert isinstance(body, dict) and body.get("error"), (path, status, body)
    async with Console(dep) as anon:
        token = await anon.login_token()
        for raw in bodies:
            async with anon.http.post(f"{anon.base}/console/api/login", data=raw,
                                      headers={"X-CSRF-Token": token, **anon.origin}) as resp:
                statuses.append(("/console/api/login", resp.status))
    async with Phone(dep) as phone:
        token = await phone.login_token()
        for raw in bodies:
            async with phone.http.post(f"{phone.base}/patrol/api/login", data=raw,
                                       headers={"X-CSRF-Token": token, **phone.origin}) as resp:
                statuses.append(("/patrol/api/login", resp.status))
        assert (await phone.login("A")).status == 200
        for path in ("/patrol/api/answer", "/patrol/api/status", "/patrol/api/position"):
            for raw in bodies:
                status, body = await phone.post(path, raw=raw)
                statuses.append((path, status))
    async with aiohttp.ClientSession() as http:
        for raw in bodies:
            async with http.post(f"http://127.0.0.1:{dep.http_port}/api/teams", data=raw,
                                 headers={"Authorization": f"Bearer {dep.api_token}"}) as resp:
                statuses.append(("/api/teams", resp.status))
    bad = [(path, status) for path, status in statuses if status not in (400, 413)]
    assert not bad, bad
    assert server.metrics.value("http_requests_total", status="500") == 0
    assert server.metrics.value("http_bad_input_total", reason="too_deep") > 0
    assert server.metrics.value("http_bad_input_total", reason="too_large") > 0


# ---------------------------------------------------------------------------- WebSockets
async def test_console_websocket_answers_bad_frames_and_closes_on_oversized_ones(
    hostile: tuple[d.Deployment, CentralServer]
) -> None:
    dep, server = hostile
    add_users(server, ("op", "operator"))
    async with Console(dep) as c:
        assert (await c.login("op")).status == 200
        ws = await c.ws()
        assert (await ws.receive_json())["type"] == "hello"
        for frame in (NESTED, '{"type": "call.start", "post_id": {"a": [[[[1]]]]}}',
                      '{"type": 1e99999}', '{"type": "\\ud800"}', "nul\x00",
                      '{"type": "call.hangup", "call_id": ' + "7" * 5000 + "}"):
            await ws.send_str(frame)
            answer = await asyncio.wait_for(ws.receive_json(), 5)
            assert answer["type"] in ("error", "call.error"), (frame[:40], answer)
            assert answer.get("post_id") in (None, "P001"), answer  # nothing echoed back
        await ws.send_bytes(b"\x00\xff" * 10)
        assert (await asyncio.wait_for(ws.receive_json(), 5))["type"] == "error"
        await ws.send_str('{"type": "ping"}')
        assert (await asyncio.wait_for(ws.receive_json(), 5))["type"] == "pong"
        await ws.send_str(json.dumps({"type": "ping", "pad": "x" * 70_000}))
        closing = await asyncio.wait_for(ws.receive(), 5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1009  # message too big
        await ws.close()
    assert server.metrics.value("console_ws_rejected_total", reason="malformed") >= 3
    assert server.metrics.value("http_requests_total", status="500") == 0


async def test_patrol_websocket_answers_bad_frames_and_closes_on_oversized_ones(
    hostile: tuple[d.Deployment, CentralServer]
) -> None:
    dep, server = hostile
    async with Phone(dep) as phone:
        assert (await phone.login("A")).status == 200
        ws = await phone.ws()
        assert (await ws.receive_json())["type"] == "hello"
        for frame in (NESTED[:4000], '{"type": "ping", "x": 1}', "\x00"):
            await ws.send_str(frame)
            assert (await asyncio.wait_for(ws.receive_json(), 5))["type"] == "error"
        await ws.send_str('{"type": "ping"}')
        assert (await asyncio.wait_for(ws.receive_json(), 5))["type"] == "pong"
        await ws.send_str("x" * 10_000)
        await asyncio.wait_for(ws.receive(), 5)
        assert ws.close_code == 1009
        await ws.close()
    assert server.metrics.value("http_requests_total", status="500") == 0


# ---------------------------------------------------------------------------- slow sockets
async def test_a_socket_trickling_its_headers_is_closed_while_others_are_served(
    hostile: tuple[d.Deployment, CentralServer]
) -> None:
    dep, server = hostile
    request = (f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{dep.http_port}\r\n"
               f"Authorization: Bearer {dep.api_token}\r\nX-Pad: {'y' * 200}\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", dep.http_port)
    closed = asyncio.Event()
    opened = time.monotonic()

    async def trickle() -> None:
        try:
            for byte in request:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.2)  # the attacker's pace: 5 bytes a second
        except ConnectionError:
            pass

    async def watch() -> bytes:
        try:
            data = await reader.read()
        except ConnectionError:
            data = b""
        closed.set()
        return data

    trickler = asyncio.create_task(trickle())
    watcher = asyncio.create_task(watch())
    # Meanwhile a normal client is served at once, again and again, on fresh connections.
    async with aiohttp.ClientSession() as http:
        while not closed.is_set() and time.monotonic() - opened < HEADER_TIMEOUT_S + 3:
            started = time.monotonic()
            status, body = await _token_get(dep, http, "/api/posts")
            assert status == 200 and len(body) == 2
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.1)
    await asyncio.wait_for(closed.wait(), HEADER_TIMEOUT_S + 3)
    took = time.monotonic() - opened
    answer = await watcher
    trickler.cancel()
    await asyncio.gather(trickler, return_exceptions=True)
    writer.close()
    assert took <= HEADER_TIMEOUT_S + 1.0, took
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert server.metrics.value("http_refused_total", reason="header_timeout") == 1


async def test_a_socket_trickling_its_body_is_answered_408(
    hostile: tuple[d.Deployment, CentralServer]
) -> None:
    dep, server = hostile
    body = json.dumps({"id": "T9", "name": "slow"}).encode()
    head = (f"POST /api/teams HTTP/1.1\r\nHost: 127.0.0.1:{dep.http_port}\r\n"
            f"Authorization: Bearer {dep.api_token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) + 100}\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", dep.http_port)
    writer.write(head + body[:5])
    await writer.drain()
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.read(200), HEADER_TIMEOUT_S + 4)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started <= HEADER_TIMEOUT_S + 2.5
    assert server.metrics.value("http_bad_input_total", reason="body_timeout") == 1


def test_parse_json_bounds_depth_before_parsing_and_refuses_what_no_store_takes() -> None:
    from protocol.messages import json_depth
    from server.web.http import BadInput, parse_json

    assert json_depth(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "b": [1, {"c": []}]}', 100) == 4
    assert json_depth(b'["\\"[[[[", "\\\\", [[]]]', 100) == 3  # escaped quotes, backslashes
    assert parse_json('{"a": "' + "[" * 100 + '"}') == {"a": "[" * 100}
    assert parse_json(b'{"emoji": "\\ud83d\\ude00"}') == {"emoji": "\U0001F600"}  # a real pair
    for raw, reason in [("[" * 17 + "]" * 17, "too_deep"), ('{"a": "\\ud800"}', "encoding"),
                        (b"\xff", "encoding"), ("NaN", "malformed"), ("[1e999]", "malformed"),
                        ("9" * 31, "malformed"), ("{", "malformed"), ("x" * 70_000, "too_large")]:
        with pytest.raises(BadInput) as refused:
            parse_json(raw)
        assert refused.value.reason == reason, raw[:20]


def test_limiter_forgets_expired_entries_first_then_the_oldest_and_keeps_an_attacker() -> None:
    limiter = LoginLimiter(attempts=2, window_s=10, max_keys=10)
    for i in range(9):  # long ago: expired by t=100
        limiter.failed(limiter.begin(f"10.1.0.{i}", f"u{i}", now=0.0), now=0.0)
    for _ in range(2):  # an attacker who has used up its attempts just now
        limiter.failed(limiter.begin("10.0.0.1", "alice", now=100.0), now=100.0)
    assert len(limiter._addresses) == 10
    limiter.failed(limiter.begin("10.2.0.1", "bob", now=100.5), now=100.5)  # full: prune
    assert sorted(limiter._addresses) == ["10.0.0.1", "10.2.0.1"]  # the expired ones went
    assert not limiter.begin("10.0.0.1", "alice", now=100.6).admitted  # still refused

    full = LoginLimiter(attempts=5, window_s=60, max_keys=10)
    for i in range(10):  # ten addresses, all with a recent failure: none expired
        full.failed(full.begin(f"a{i}", "carol", now=float(i)), now=float(i))
    full.begin("new", "carol", now=20.0)
    # Still full after dropping the expired: the oldest idle quarter goes (10 - 10 * 3 // 4).
    assert sorted(full._addresses) == [*(f"a{i}" for i in range(3, 10)), "new"]
