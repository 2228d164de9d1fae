"""The patrol teams' mobile web app at ``/patrol``, on the same aiohttp app as the API and console.

A team logs in on its phone with its team id and the app password set by
``alarmpost patrol team password --id T1`` (or ``team add --app-password-stdin``). The password is
an argon2id hash, sessions and CSRF work as the console's (:mod:`server.web.auth`: a random
token in an ``HttpOnly; SameSite=Strict`` cookie, only its SHA-256 stored; ``X-CSRF-Token`` on
every POST, ``?csrf=`` on the WebSocket; Origin checked; logins limited by the console's
:class:`~server.web.auth.LoginLimiter`: refused per address, slowed but never locked per
team). A session acts for its own team only: the team id comes from the session, never from
the request.

Everything a phone says goes through :meth:`server.dispatch.Dispatcher.receive` as the same wire
payload an MQTT device publishes (``PageAnswer``, ``TeamPosition``, ``TeamStatus``): the same
validation (impossible, stale or future positions refused and counted in ``rejected_total``), the
same audit (actor ``team:{id}``). Pages and withdrawals reach the phone through a notifier
(:class:`WebNotifier`) beside the MQTT one, over the app's WebSocket; a phone that reconnects
reads its current page or assignment from ``/patrol/api/state``.

::

    GET  /patrol/login            login page (public)
    POST /patrol/api/login        {team, password} + prelogin CSRF (public)
    GET  /patrol/                 the app (a team session)
    GET  /patrol/api/state        team, status, current page or assignment, CSRF token
    POST /patrol/api/answer       {page, answer, classification?, detail?}
    POST /patrol/api/status       {state: available | off_duty}
    POST /patrol/api/position     {lat, lon, ts, accuracy_m?, speed_mps?}
    POST /patrol/api/logout
    GET  /patrol/ws?csrf=...      live: page, withdrawn (taken, timeout, closed, ...)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote

import msgspec
from aiohttp import WSMsgType, web

from protocol.messages import Page, PageWithdrawn, Rejected
from protocol.topics import team_topic, valid_team_id
from server.dispatch import NotifierUnavailable
from server.incidents import CLASSIFICATIONS
from server.patrol import Team, TeamError
from server.storage import TeamStore
from server.web.auth import (
    hash_password,
    login_limiter,
    token_digest,
    verify_password,
)
from server.web.host import ServerHost
from server.web.http import (
    BadInput,
    Handler,
    json_body,
    parse_json,
    str_field,
)
from server.web.sessions import PUBLIC, SessionSite, access

log = logging.getLogger("alarmpost.patrol_web")

PREFIX: Final = "/patrol"
STATIC_DIR: Final = Path(__file__).parent / "patrol_static"
SESSION_COOKIE: Final = "alarmpost_patrol_session"
PRELOGIN_COOKIE: Final = "alarmpost_patrol_prelogin"
TEAM: Final = "team"
MAX_WS_MESSAGE: Final = 4096
# HTTP status for each reason the dispatcher (or the decoder) refuses a team message.
_STATUS: Final[dict[str, int]] = {
    "unknown_page": 404, "not_your_page": 403, "page_closed": 409, "not_assigned": 409,
    "unknown_team": 403, "stale_position": 422, "future_timestamp": 422,
}

H = TypeVar("H", bound=Handler)


# ---------------------------------------------------------------------------- passwords
def set_app_password(store: TeamStore, team_id: str, password: str) -> None:
    """Set (or change) a team's app password; its phones must log in again. Raises
    :class:`TeamError` (no such team) or :class:`UserError` (password too short or long)."""
    if not store.exists(team_id):
        raise TeamError(f"no team {team_id!r} (add it first: alarmpost patrol team add)")
    try:
        store.set_app_password(team_id, hash_password(password))
    except LookupError:
        raise TeamError(f"no team {team_id!r} (add it first: alarmpost patrol team add)") from None


@dataclass(frozen=True)
class TeamSession:
    team_id: str
    csrf: str
    expires_at: float


class TeamLogins:
    """Team app sessions in the server's database. A session outlives neither its team nor a
    password change (it must be newer than the password)."""

    def __init__(self, store: TeamStore, session_ttl_s: float) -> None:
        self.store = store
        self.session_ttl_s = session_ttl_s

    def count(self) -> int:
        return self.store.app_password_count()

    async def verify(self, team_id: str, password: str) -> bool:
        stored = self.store.app_password_hash(team_id) if valid_team_id(team_id) else None
        return await verify_password(stored, password)

    def create_session(self, team_id: str) -> tuple[str, TeamSession]:
        now = time.time()
        token = secrets.token_urlsafe(32)
        session = TeamSession(team_id, secrets.token_urlsafe(32), now + self.session_ttl_s)
        self.store.add_session(token_digest(token), team_id, session.csrf, now, session.expires_at)
        return token, session

    def session(self, token: str) -> TeamSession | None:
        if not token or len(token) > 128 or not token.isascii():
            return None
        row = self.store.session(token_digest(token))
        if row is None or row["expires_at"] < time.time():
            return None
        return TeamSession(row["team_id"], row["csrf"], row["expires_at"])

    def end_session(self, token: str) -> None:
        self.store.end_session(token_digest(token))


# ---------------------------------------------------------------------------- live channel
class WebNotifier:
    """The dispatcher's paging channel to the app: pushes pages and withdrawals to the team's
    open WebSockets. With no phone connected it raises :class:`NotifierUnavailable` (so it never
    counts as delivered); ``optional`` keeps the dispatcher's log quiet about it. A phone that
    connects later reads the page from ``/patrol/api/state``."""

    name = "web"
    optional = True

    def __init__(self, app: PatrolApp) -> None:
        self.app = app

    async def page(self, team: Team | None, page: Page) -> None:
        await self._push(page.team, {"type": "page", "page": page.id, "incident": page.incident,
                                     "broadcast": page.broadcast})

    async def withdraw(self, team: Team | None, notice: PageWithdrawn) -> None:
        await self._push(notice.team, {"type": "withdrawn", "page": notice.page,
                                       "incident": notice.incident, "reason": notice.reason})

    async def _push(self, team_id: str, message: dict[str, Any]) -> None:
        sockets = [ws for ws in self.app.sockets.get(team_id, ()) if not ws.closed]
        if not sockets:
            raise NotifierUnavailable(f"team {team_id} has no patrol app open")
        message["state"] = self.app.state(team_id)
        sent = 0
        for ws in sockets:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_json(message)
                sent += 1
        if not sent:
            raise NotifierUnavailable(f"team {team_id}: the app's connection is gone")
        self.app.server.metrics.inc("patrol_web_pushed_total", kind=message["type"])


class PatrolApp(SessionSite[TeamSession, str]):
    """The patrol teams' phone app: one login per team."""

    name = "patrol"
    prefix = PREFIX
    session_cookie = SESSION_COOKIE
    prelogin_cookie = PRELOGIN_COOKIE
    login_field = "team"
    refused_metric = "patrol_web_refused_total"
    logins_metric = "patrol_web_logins_total"
    count_http_errors = True

    def __init__(self, server: ServerHost) -> None:
        cfg = server.config.patrol_app
        super().__init__(server, login_limiter(server), cfg.session_ttl_s,
                         server.config.console.secure_cookies)
        self.logins = TeamLogins(server.storage.teams, cfg.session_ttl_s)
        self.sockets: dict[str, set[web.WebSocketResponse]] = {}
        self.notifier = WebNotifier(self)

    def find(self, token: str) -> TeamSession | None:
        return self.logins.session(token)

    def csrf(self, session: TeamSession) -> str:
        return session.csrf

    def refusal(self, session: TeamSession, level: str) -> str | None:
        return None if level == TEAM else "not available to a team"

    async def verify(self, name: str, password: str) -> str | None:
        return name if await self.logins.verify(name, password) else None

    def open(self, who: str) -> tuple[str, TeamSession, dict[str, Any]]:
        token, session = self.logins.create_session(who)
        return token, session, {"team": who}

    def close(self, token: str, session: TeamSession, remote: str) -> None:
        self.logins.end_session(token)
        log.info("team %s logged out of the patrol app", session.team_id)

    def logged_in(self, who: str, remote: str) -> None:
        log.info("team %s logged in to the patrol app from %s", who, remote)

    def login_failed(self, name: str, remote: str) -> None:
        log.warning("failed patrol app login for team %r from %s", name, remote)

    def state(self, team_id: str) -> dict[str, Any]:
        """What the team's phone shows: its status, position, and current page or assignment."""
        d = self.server.dispatcher
        live = d.live.get(team_id)
        team = d.teams.get(team_id)
        return {
            "team": team_id, "name": team.name if team else team_id,
            "status": live.status if live else None,
            "position_at": live.position_at if live else None,
            "current": self.current(team_id),
        }

    def current(self, team_id: str) -> dict[str, Any] | None:
        d = self.server.dispatcher
        incident_id = d.committed.get(team_id)
        job = d.jobs.get(incident_id) if incident_id else None
        if job is None:
            return None
        if job.state == "assigned" and job.team_id == team_id:
            pages = [p for p in job.pages.values() if p.team_id == team_id and p.state == "accepted"]
            phase = self._incident_state(job.incident_id)  # accepted, en_route, on_scene
        else:
            pages = [p for p in job.waiting() if p.team_id == team_id]
            phase = "paged"
        if not pages:
            return None
        page = d._page_message(pages[-1])  # the same Page an MQTT device gets
        info: dict[str, Any] = msgspec.to_builtins(page)
        info["phase"] = phase
        info["nav"] = self._nav(page)
        return info

    def _incident_state(self, incident_id: str) -> str:
        return self.server.storage.incidents.state(incident_id) or "unknown"

    def _nav(self, page: Page) -> dict[str, str]:
        if page.lat is None or page.lon is None:
            return {}
        label = page.post_name or page.post
        lat, lon = f"{page.lat:.6f}", f"{page.lon:.6f}"
        nav = {"geo": f"geo:{lat},{lon}?q={lat},{lon}({quote(label)})"}
        template = self.server.config.patrol_app.map_url
        if template:
            nav["map"] = template.replace("{lat}", lat).replace("{lon}", lon).replace(
                "{name}", quote(label))
        return nav


PATROL_KEY: web.AppKey[PatrolApp] = web.AppKey("patrol_app")


# ---------------------------------------------------------------------------- guard
def is_patrol_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


async def patrol_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Team sessions and CSRF for every ``/patrol`` route (called by the API's middleware)."""
    return await request.app[PATROL_KEY].guard(request, handler)


def _session(request: web.Request) -> TeamSession:
    return request.app[PATROL_KEY].session(request)


def _number(body: dict[str, Any], key: str, default: float | None = None) -> float:
    value = body.get(key, default)
    if value is None and default is None:
        raise web.HTTPBadRequest(reason=f"{key!r} is required (a number)")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise web.HTTPBadRequest(reason=f"{key!r} must be a number")
    return float(value)


def _html(name: str, csrf: str) -> web.Response:
    html = (STATIC_DIR / name).read_text().replace("{{csrf}}", csrf)
    return web.Response(text=html, content_type="text/html", headers={
        "Content-Security-Policy": (
            "default-src 'self'; img-src 'self' data:; connect-src 'self'; style-src 'self'; "
            "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        ),
    })


def _submit(request: web.Request, kind: str, fields: dict[str, Any]) -> None:
    """Hand the dispatcher the payload the team's MQTT device would publish; a refusal is
    counted like an MQTT one (``rejected_total``) and becomes a JSON error."""
    app = request.app[PATROL_KEY]
    team_id = _session(request).team_id
    topic = team_topic(team_id, kind)  # type: ignore[arg-type]
    payload = json.dumps({"v": 1, "team": team_id, **fields}).encode()
    try:
        app.server.dispatcher.receive(topic, payload)
    except Rejected as exc:
        app.server.reject(exc.reason, topic, exc.detail)
        app.server.metrics.inc("patrol_web_refused_total", reason=exc.reason)
        raise _Refused(_STATUS.get(exc.reason, 400), f"{exc.reason}: {exc.detail}"[:300],
                       exc.reason) from None


class _Refused(Exception):
    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


def _refused_response(exc: _Refused) -> web.Response:
    return web.json_response({"error": exc.message, "reason": exc.reason}, status=exc.status)


# ---------------------------------------------------------------------------- routes
@access(PUBLIC)
async def root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(f"{PREFIX}/")


@access(PUBLIC)
async def login_page(request: web.Request) -> web.StreamResponse:
    return request.app[PATROL_KEY].prelogin_token(request, lambda token: _html("login.html", token))


@access(PUBLIC)
async def login(request: web.Request) -> web.Response:
    return await request.app[PATROL_KEY].login(request)


@access(TEAM)
async def logout(request: web.Request) -> web.Response:
    return await request.app[PATROL_KEY].logout(request)


@access(TEAM)
async def app_page(request: web.Request) -> web.StreamResponse:
    return _html("patrol.html", _session(request).csrf)


@access(TEAM)
async def state(request: web.Request) -> web.Response:
    app = request.app[PATROL_KEY]
    session = _session(request)
    return web.json_response({**app.state(session.team_id), "csrf": session.csrf,
                              "classifications": list(CLASSIFICATIONS)})


@access(TEAM)
async def answer(request: web.Request) -> web.Response:
    app = request.app[PATROL_KEY]
    body = await json_body(request)
    page_id = str_field(body, "page", 40)
    kind = str_field(body, "answer", 20)
    if kind not in ("accept", "decline", "en_route", "on_scene", "resolved"):
        raise web.HTTPBadRequest(reason="answer must be accept, decline, en_route, on_scene or "
                                        "resolved")
    classification = str_field(body, "classification", 40, required=False)
    if kind == "resolved" and classification not in CLASSIFICATIONS:
        raise web.HTTPBadRequest(
            reason=f"resolving needs a classification, one of: {', '.join(CLASSIFICATIONS)}")
    detail = str_field(body, "detail", 200, required=False)
    row = app.server.storage.dispatch.page(page_id)
    incident_id = body.get("incident", row["incident_id"] if row else "")
    if not isinstance(incident_id, str) or not incident_id:
        app.server.metrics.inc("patrol_web_refused_total", reason="unknown_page")
        return web.json_response({"error": f"unknown_page: no page {page_id[:40]!r}",
                                  "reason": "unknown_page"}, status=404)
    try:
        _submit(request, "answer", {"page": page_id, "incident": incident_id, "answer": kind,
                                    "ts": time.time(), "classification": classification,
                                    "detail": detail})
    except _Refused as exc:
        return _refused_response(exc)
    log.info("team %s: %s on page %s (patrol app)", _session(request).team_id, kind, page_id)
    return web.json_response(app.state(_session(request).team_id))


@access(TEAM)
async def status(request: web.Request) -> web.Response:
    app = request.app[PATROL_KEY]
    body = await json_body(request)
    new = str_field(body, "state", 20)
    if new not in ("available", "off_duty"):
        raise web.HTTPBadRequest(reason="state must be available or off_duty")
    try:
        _submit(request, "status", {"state": new, "ts": time.time(), "reason": "patrol app"})
    except _Refused as exc:
        return _refused_response(exc)
    return web.json_response(app.state(_session(request).team_id))


@access(TEAM)
async def position(request: web.Request) -> web.Response:
    app = request.app[PATROL_KEY]
    body = await json_body(request)
    fields = {"lat": _number(body, "lat"), "lon": _number(body, "lon"), "ts": _number(body, "ts"),
              "accuracy_m": _number(body, "accuracy_m", 0.0),
              "speed_mps": _number(body, "speed_mps", 0.0)}
    try:
        _submit(request, "position", fields)
    except _Refused as exc:
        return _refused_response(exc)
    app.server.metrics.inc("patrol_web_positions_total")
    return web.json_response({"ok": True})


@access(TEAM)
async def websocket(request: web.Request) -> web.StreamResponse:
    app = request.app[PATROL_KEY]
    server = app.server
    team_id = _session(request).team_id
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=MAX_WS_MESSAGE)
    await ws.prepare(request)
    sockets = app.sockets.setdefault(team_id, set())
    sockets.add(ws)
    server.metrics.inc("patrol_web_ws_connections_total")
    try:
        await ws.send_json({"type": "hello", "state": app.state(team_id), "at": time.time()})
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
            if msg.type == WSMsgType.TEXT and _is_ping(msg.data):
                await ws.send_json({"type": "pong"})
            else:
                server.metrics.inc("patrol_web_refused_total", reason="ws_message")
                await ws.send_json({"type": "error",
                                    "error": 'the only message accepted is {"type":"ping"}; '
                                             "use the HTTP API to answer"})
    except (ConnectionError, RuntimeError):
        pass
    except Exception:  # never a traceback onto an upgraded connection: close it cleanly
        server.metrics.inc("patrol_web_refused_total", reason="ws_error")
        log.exception("patrol app ws of team %s failed; closing it", team_id)
        with contextlib.suppress(Exception):
            await ws.close(code=1011, message=b"server error")
    finally:
        sockets.discard(ws)
        if not sockets:
            app.sockets.pop(team_id, None)
    return ws


def _is_ping(raw: str) -> bool:
    """A ``{"type": "ping"}`` frame (parsed within the shared bounds), the only one accepted."""
    try:
        message = parse_json(raw, max_bytes=MAX_WS_MESSAGE)
    except BadInput:
        return False
    return bool(message == {"type": "ping"})


async def _close_sockets(app: web.Application) -> None:
    for sockets in list(app[PATROL_KEY].sockets.values()):
        for ws in list(sockets):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=1001, message=b"server stopping"), 2)


def setup_patrol_app(app: web.Application, server: ServerHost) -> PatrolApp:
    """Mount the patrol app on the server's app (its middleware calls :func:`patrol_guard`) and
    add its paging channel to the dispatcher."""
    state_ = PatrolApp(server)
    app[PATROL_KEY] = state_
    m = server.metrics
    m.counter("patrol_web_refused_total", "Patrol app requests refused, by reason")
    m.counter("patrol_web_logins_total", "Patrol app logins, by result")
    m.counter("patrol_web_ws_connections_total", "Patrol app WebSockets opened")
    m.counter("patrol_web_pushed_total", "Pages and withdrawals pushed to patrol apps")
    m.counter("patrol_web_positions_total", "Positions accepted from patrol apps")
    r = app.router
    r.add_get(PREFIX, root)
    r.add_get(f"{PREFIX}/", app_page)
    r.add_get(f"{PREFIX}/login", login_page)
    r.add_post(f"{PREFIX}/api/login", login)
    r.add_post(f"{PREFIX}/api/logout", logout)
    r.add_get(f"{PREFIX}/api/state", state)
    r.add_post(f"{PREFIX}/api/answer", answer)
    r.add_post(f"{PREFIX}/api/status", status)
    r.add_post(f"{PREFIX}/api/position", position)
    r.add_get(f"{PREFIX}/ws", websocket)
    r.add_static(f"{PREFIX}/static", STATIC_DIR)
    app.on_shutdown.append(_close_sockets)
    # One web channel per server: the app that serves (a second make_app, as tests build to
    # walk the router, must not take the pushes away from it).
    if not any(getattr(n, "name", "") == WebNotifier.name for n in server.dispatcher.notifiers):
        server.dispatcher.notifiers.append(state_.notifier)
    return state_

