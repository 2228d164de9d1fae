"""The patrol app's HTTP and WebSocket side: logins, sessions, CSRF, one team acting for itself
only, answers and positions through the dispatcher exactly as MQTT ones are."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from provisioning import deployment as d
from server.app import CentralServer
from server.web.api import make_app
from server.web.patrol import PUBLIC, TEAM
from tests.console_helpers import next_notice
from tests.helpers import ALARMPOST, MakeDeployment, api, db_rows, run_posts, run_server, until
from tests.patrol_helpers import KM_LAT, TeamSpec, add_teams
from tests.patrol_web_helpers import Phone, give_app_passwords

PUBLIC_ROUTES = {("GET", "/patrol"), ("GET", "/patrol/login"), ("POST", "/patrol/api/login")}


@pytest.fixture
async def patrol(make_deployment: MakeDeployment) -> AsyncIterator[tuple[d.Deployment,
                                                                           CentralServer]]:
    """Teams A (1 km from P001) and B (3 km), each with an app password; no MQTT devices."""
    dep = make_deployment(2)
    add_teams(dep, [TeamSpec("A", 1.0), TeamSpec("B", 3.0)], answer_timeout_s=20.0)
    give_app_passwords(dep, "A", "B")
    async with run_server(dep) as server:
        yield dep, server


def _where(dep: d.Deployment, km_north: float) -> tuple[float, float]:
    post = dep.posts[0]
    return post.lat + km_north * KM_LAT, post.lon


async def test_every_route_declares_access_and_anonymous_is_refused(
    patrol: tuple[d.Deployment, CentralServer]
) -> None:
    dep, server = patrol
    routes = []
    for route in make_app(server).router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix", "")
        if (not path.startswith("/patrol") or route.method == "HEAD"
                or isinstance(route.resource, web.StaticResource)):
            continue
        routes.append((route.method, path, getattr(route.handler, "access", None)))
    assert len(routes) >= 10
    assert all(level in (PUBLIC, TEAM) for _, _, level in routes), routes
    assert {(m, p) for m, p, level in routes if level == PUBLIC} == PUBLIC_ROUTES
    async with Phone(dep) as anon:
        for method, path, level in routes:
            if level == PUBLIC:
                continue
            if method == "GET":
                status, _ = await anon.get(path)
                assert status == (302 if path == "/patrol/" else 401), (path, status)
            else:
                status, body = await anon.post(path, {}, csrf="x")
                assert status == 401 and body["error"] == "log in first", (path, status)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await anon.ws(csrf="x")
        assert refused.value.status == 401
        status, css = await anon.get("/patrol/static/patrol.css")
        assert status == 200 and "body" in css  # static files hold no data
    # The API token opens no /patrol door, and a team session no /console or /api one.
    async with aiohttp.ClientSession() as raw, raw.get(
            f"http://127.0.0.1:{dep.http_port}/patrol/api/state",
            headers={"Authorization": f"Bearer {dep.api_token}"}) as resp:
        assert resp.status == 401
    async with Phone(dep) as phone:
        assert (await phone.login("A")).status == 200
        assert (await phone.get("/console/api/me"))[0] == 401
        assert (await phone.get("/api/incidents"))[0] == 401
    assert server.metrics.value("patrol_web_refused_total", reason="no_session") >= 8


async def test_logins_sessions_csrf_and_origin(patrol: tuple[d.Deployment, CentralServer]) -> None:
    dep, server = patrol
    async with aiohttp.ClientSession() as raw, raw.post(  # no pre-login token
            f"http://127.0.0.1:{dep.http_port}/patrol/api/login",
            json={"team": "A", "password": "patrol car password"}) as resp:
        assert resp.status == 403
    async with Phone(dep) as eve:
        assert (await eve.login("A", "wrong password")).status == 401
        assert (await eve.login("NOPE")).status == 401  # same answer as a wrong password
        assert (await eve.login("../../etc")).status == 401
    async with Phone(dep) as a:
        resp = await a.login("A")
        assert resp.status == 200
        cookie = resp.cookies["alarmpost_patrol_session"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/patrol"
        status, page = await a.get("/patrol/")
        assert status == 200 and a.csrf in page and "patrol.js" in page
        status, st = await a.get("/patrol/api/state")
        assert status == 200 and st["team"] == "A" and st["current"] is None
        assert "false_alarm" in st["classifications"]
        # CSRF and Origin on every POST and the WebSocket.
        assert (await a.post("/patrol/api/status", {"state": "available"}, csrf=""))[0] == 403
        status, body = await a.post("/patrol/api/status", {"state": "available"}, csrf="forged")
        assert status == 403 and "CSRF" in body["error"]
        assert (await a.post("/patrol/api/status", {"state": "available"},
                             origin="http://evil.example"))[0] == 403
        for bad in ("forged", ""):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await a.ws(csrf=bad)
            assert refused.value.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await a.ws(origin="http://evil.example")
        assert server.dispatcher.live["A"].status is None  # nothing happened
        ws = await a.ws()
        hello = await ws.receive_json()
        assert hello["type"] == "hello" and hello["state"]["team"] == "A"
        await ws.send_str("hello?")
        assert (await ws.receive_json())["type"] == "error"
        await ws.close()
        # Bad bodies get a clear 400, never a traceback.
        for raw_body in (b"not json", b"[1, 2]", b'{"state": 5}', b'{"state": "on_fire"}'):
            status, body = await a.post("/patrol/api/status", raw=raw_body)
            assert status == 400 and body["error"], (raw_body, body)
        # A new password logs every phone of the team out; logout ends the session.
        give_app_passwords(dep, "A")
        assert (await a.get("/patrol/api/state"))[0] == 401
        assert (await a.login("A")).status == 200
        assert (await a.post("/patrol/api/logout"))[0] == 200
        assert (await a.get("/patrol/api/state"))[0] == 401
    # Only hashes are stored.
    assert all(len(r[0]) == 64 for r in db_rows(dep, "SELECT token_hash FROM team_sessions"))
    assert all(r[0].startswith("$argon2id$")
               for r in db_rows(dep, "SELECT password_hash FROM team_app_passwords"))
    assert server.metrics.value("patrol_web_refused_total", reason="csrf") >= 5
    assert server.metrics.value("patrol_web_logins_total", result="failed") == 3


async def test_login_is_rate_limited(patrol: tuple[d.Deployment, CentralServer]) -> None:
    dep, server = patrol
    async with Phone(dep) as eve:
        for _ in range(5):
            assert (await eve.login("B", "guess guess")).status == 401
        resp = await eve.login("B")  # even the right password, until the window slides
        assert resp.status == 429 and int(resp.headers["Retry-After"]) > 0
    async with Phone(dep) as a:  # another team from the same address is limited too
        assert (await a.login("A")).status == 429
    assert server.metrics.value("patrol_web_logins_total", result="rate_limited") == 2


async def _state(phone: Phone) -> dict[str, Any]:
    status, body = await phone.get("/patrol/api/state")
    assert status == 200
    return dict(body)


async def test_page_answers_and_positions_go_through_the_dispatcher(
    patrol: tuple[d.Deployment, CentralServer]
) -> None:
    dep, server = patrol
    async with Phone(dep) as a, Phone(dep) as b, run_posts(dep, "P001") as posts:
        assert (await a.login("A")).status == 200 and (await b.login("B")).status == 200
        await a.on_duty(*_where(dep, 1.0))
        await b.on_duty(*_where(dep, 3.0))
        live = server.dispatcher.live["A"]
        assert live.status == "available" and live.position_at is not None
        assert abs((live.lat or 0) - _where(dep, 1.0)[0]) < 1e-9
        ws_a, ws_b = await a.ws(), await b.ws()
        assert (await ws_a.receive_json())["type"] == "hello"
        assert (await ws_b.receive_json())["type"] == "hello"

        await posts["P001"].press()
        paged = await next_notice(ws_a, "page", 5)
        current = paged["state"]["current"]
        assert current["phase"] == "paged" and current["post"] == "P001"
        assert current["post_name"] and current["school"] and current["address"]
        assert current["nav"]["geo"].startswith("geo:") and current["what"]
        page_id, incident_id = current["id"], current["incident"]
        assert (await _state(b))["current"] is None  # B was not paged

        # B cannot answer A's page, in any way; nothing changes.
        for kind in ("accept", "decline", "en_route"):
            status, body = await b.post("/patrol/api/answer", {"page": page_id, "answer": kind})
            assert status == 403 and body["reason"] == "not_your_page", body
        status, body = await b.post("/patrol/api/answer", {"page": "01ARZ3NDEKTSV4RRFFQ69G5FAV",
                                                           "answer": "accept"})
        assert status == 404 and body["reason"] == "unknown_page"
        status, body = await a.post("/patrol/api/answer", {"page": page_id, "answer": "fly"})
        assert status == 400
        status, body = await a.post("/patrol/api/answer", {"page": page_id, "answer": "resolved"})
        assert status == 400 and "classification" in body["error"]
        status, body = await a.post("/patrol/api/answer", {"page": page_id, "answer": "en_route"})
        assert status == 409 and body["reason"] == "not_assigned"  # accept first
        assert (server.storage.incidents.get(incident_id) or {})["state"] == "paged"

        status, body = await a.post("/patrol/api/answer", {"page": page_id, "answer": "accept"})
        assert status == 200 and body["current"]["phase"] == "accepted", body
        status, body = await a.post("/patrol/api/answer", {"page": page_id, "answer": "accept"})
        assert status == 409 and body["reason"] == "page_closed"  # a double accept
        for kind, phase in (("en_route", "en_route"), ("on_scene", "on_scene")):
            status, body = await a.post("/patrol/api/answer", {"page": page_id, "answer": kind})
            assert status == 200 and body["current"]["phase"] == phase, body

        # Positions: the dispatcher's own checks; refusals counted like MQTT ones.
        now = time.time()
        bad = [({"lat": 200, "lon": 119.3, "ts": now}, 400, "invalid"),
               ({"lat": 26.1, "lon": 119.3, "ts": now - 3600}, 422, "stale_position"),
               ({"lat": 26.1, "lon": 119.3, "ts": now + 3600}, 422, "future_timestamp"),
               ({"lat": 26.1, "lon": 119.3, "ts": "now"}, 400, None),
               ({"lat": 26.1}, 400, None)]
        for body_, expected, reason in bad:
            status, body = await a.post("/patrol/api/position", body_)
            assert status == expected and body["error"], (body_, body)
            if reason:
                assert body["reason"] == reason
        status, body = await a.post("/patrol/api/position",
                                    raw=b'{"lat": NaN, "lon": 119.3, "ts": %f}' % now)
        assert status == 400, body
        for reason in ("invalid", "stale_position", "future_timestamp"):
            assert server.metrics.value("rejected_total", reason=reason) >= 1
        assert server.metrics.value("rejected_total", reason="not_your_page") == 3
        assert abs((live.lat or 0) - _where(dep, 1.0)[0]) < 1e-9  # nothing corrupted

        # An operator closes the incident: the phone is told at once.
        server.transition(incident_id, "resolved", "alice", classification="test")
        withdrawn = await next_notice(ws_a, "withdrawn", 5)
        assert withdrawn["reason"] == "closed" and withdrawn["state"]["current"] is None
        await ws_a.close()
        await ws_b.close()

    incident = await api(dep, f"/api/incidents/{incident_id}")
    steps = [(t["actor"], t["action"]) for t in incident["timeline"]]
    for action in ("accepted", "en_route", "on_scene"):
        assert ("team:A", action) in steps, steps
    assert incident["dispatch"]["times"]["on_scene_at"] is not None


async def test_taken_page_is_withdrawn_from_the_other_phone(make_deployment: MakeDeployment) -> None:
    # Broadcast at once (K = 0): both teams get the page; the first to accept takes it.
    dep = make_deployment(2)
    add_teams(dep, [TeamSpec("A", 1.0), TeamSpec("B", 2.0)], direct_pages=0)
    give_app_passwords(dep, "A", "B")
    async with run_server(dep) as server, Phone(dep) as a, Phone(dep) as b, \
            run_posts(dep, "P001") as posts:
        assert (await a.login("A")).status == 200 and (await b.login("B")).status == 200
        await a.on_duty(*_where(dep, 1.0))
        await b.on_duty(*_where(dep, 2.0))
        ws_a, ws_b = await a.ws(), await b.ws()
        await ws_a.receive_json()
        await ws_b.receive_json()
        await posts["P001"].press()
        page_a, page_b = await asyncio.gather(next_notice(ws_a, "page"), next_notice(ws_b, "page"))
        assert page_a["broadcast"] and page_b["broadcast"]
        status, _ = await b.post("/patrol/api/answer", {"page": page_b["page"], "answer": "accept"})
        assert status == 200
        gone = await next_notice(ws_a, "withdrawn")
        assert gone["reason"] == "taken" and gone["state"]["current"] is None
        status, body = await a.post("/patrol/api/answer", {"page": page_a["page"],
                                                           "answer": "accept"})
        assert status == 409 and "taken by team B" in body["error"]
        assert server.dispatcher.committed == {"B": page_b["incident"]}
        await ws_a.close()
        await ws_b.close()


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ALARMPOST, *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


async def test_cli_sets_the_app_password(patrol: tuple[d.Deployment, CentralServer]) -> None:
    dep, _server = patrol
    config = str(dep.server_config)
    done = _cli("patrol", "team", "add", "--config", config, "--id", "C", "--no-credentials",
                "--app-password-stdin", stdin="first password\n")
    assert done.returncode == 0, done.stderr
    assert "/patrol/" in done.stdout and "first password" not in done.stdout + done.stderr
    short = _cli("patrol", "team", "add", "--config", config, "--id", "D", "--no-credentials",
                 "--app-password-stdin", stdin="short\n")
    assert short.returncode == 2 and "8 to 1024" in short.stderr
    assert "D" not in _cli("patrol", "team", "list", "--config", config).stdout
    async with Phone(dep) as c:
        assert (await c.login("C", "first password")).status == 200
        changed = _cli("patrol", "team", "password", "--config", config, "--id", "C",
                       "--password-stdin", stdin="second password\n")
        assert changed.returncode == 0, changed.stderr
        assert (await c.get("/patrol/api/state"))[0] == 401  # logged out by the change
        assert (await c.login("C", "first password")).status == 401
        assert (await c.login("C", "second password")).status == 200
    nobody = _cli("patrol", "team", "password", "--config", config, "--id", "NOPE",
                  "--password-stdin", stdin="some password\n")
    assert nobody.returncode == 2 and "no team" in nobody.stderr
    assert _cli("patrol", "team", "remove", "--config", config, "--id", "C").returncode == 0
    assert db_rows(dep, "SELECT * FROM team_app_passwords WHERE team_id='C'") == []


async def test_a_phone_that_was_away_gets_the_page_when_it_comes_back(
    patrol: tuple[d.Deployment, CentralServer]
) -> None:
    dep, server = patrol
    async with Phone(dep) as a, run_posts(dep, "P001") as posts:
        assert (await a.login("A")).status == 200
        await a.on_duty(*_where(dep, 1.0))
        await posts["P001"].press()  # no WebSocket open: nothing can be pushed
        await until(lambda: server.dispatcher.committed.get("A"), 5, "team A paged")
        (job,) = server.dispatcher.jobs.values()
        (page,) = job.waiting()
        await until(lambda: page.published_at is not None, 5, "page handed to the broker")
        ws = await a.ws()
        hello = await ws.receive_json()
        current = hello["state"]["current"]
        assert current["id"] == page.id and current["phase"] == "paged"
        assert (await _state(a))["current"]["id"] == page.id
        await ws.close()
