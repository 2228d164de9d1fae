"""The console's HTTP routes and its WebSocket, mounted under ``/console`` on the server's app.

Every route declares the permission it needs (``@needs(...)``, or ``@needs(PUBLIC)`` for the
login page and form); :func:`console_guard` refuses a route that declares none. Static files
(``/console/static/``) are public: they hold no data.

::

    GET  /console/login                       login page (public)
    POST /console/api/login                   {name, password} + prelogin CSRF (public)
    GET  /console/                            the console (any role)
    GET  /console/api/me                      who am I, my permissions, CSRF token, ICE servers
    POST /console/api/logout
    GET  /console/ws?csrf=...                 live notices; call signaling (see server.calls)
    GET  /console/api/incidents[?state=open]  incidents.view
    GET  /console/api/incidents/{id}          incidents.view
    POST /console/api/incidents/{id}/acknowledge       incidents.handle
    POST /console/api/incidents/{id}/resolve  {classification, note}   incidents.handle
    POST /console/api/incidents/{id}/page     {team_id}   incidents.handle (server.dispatch)
    POST /console/api/incidents/{id}/pages/{page_id}/cancel  {reason?}   incidents.handle
    POST /console/api/incidents/{id}/redispatch              {reason?}   incidents.handle
    GET  /console/api/teams                   incidents.view (patrol teams, for the map)
    GET  /console/api/posts                   posts.view (with open faults)
    GET  /console/api/commands[?post=]        posts.view
    POST /console/api/posts/{id}/command      {cmd, incident_id?}   posts.command
    POST /console/api/posts/{id}/test_mode    {on, reason}   posts.test_mode (technician, admin)
    GET  /console/api/users, POST /console/api/users {name, role, password}   users.manage
    POST /console/api/users/{name}/role       {role}       users.manage
    POST /console/api/users/{name}/disabled   {disabled}   users.manage
    POST /console/api/users/{name}/password   {password}   users.manage
    GET  /console/api/audit                   audit.view
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from protocol.topics import valid_post_id
from server.bus import (
    CallUpdated,
    CommandUpdated,
    DispatchQueued,
    EventJoined,
    IncidentOpened,
    IncidentUpdated,
    Notice,
    Overflow,
    PostState,
    PostTestMode,
    TeamStatusChanged,
)
from server.calls import CallError
from server.incidents import CLASSIFICATIONS, STATES, InvalidTransition
from server.live import with_live
from server.web.auth import (
    PRELOGIN_COOKIE,
    ROLES,
    SESSION_COOKIE,
    Accounts,
    Session,
    User,
    UserError,
    login_limiter,
)
from server.web.host import ServerHost
from server.web.http import (
    BadInput,
    Handler,
    json_body,
    parse_json,
    query_str,
    str_field,
)
from server.web.sessions import PUBLIC, SessionSite, access, route_access

log = logging.getLogger("alarmpost.console")

PREFIX: Final = "/console"
STATIC_DIR: Final = Path(__file__).parent / "console_static"
MAX_WS_MESSAGE: Final = 64 * 1024

H = TypeVar("H", bound=Handler)
T = TypeVar("T")


class ConsoleState(SessionSite[Session, User]):
    """The operators' console: accounts with roles, sessions, the console audit log."""

    name = "console"
    prefix = PREFIX
    session_cookie = SESSION_COOKIE
    prelogin_cookie = PRELOGIN_COOKIE
    login_field = "name"
    refused_metric = "console_refused_total"
    logins_metric = "console_logins_total"

    def __init__(self, server: ServerHost) -> None:
        cfg = server.config.console
        super().__init__(server, login_limiter(server), cfg.session_ttl_s, cfg.secure_cookies)
        self.accounts = Accounts(server.storage.accounts, cfg.session_ttl_s)
        self.sockets: set[web.WebSocketResponse] = set()
        self.socket_users: dict[web.WebSocketResponse, str] = {}

    def find(self, token: str) -> Session | None:
        return self.accounts.session(token)

    def csrf(self, session: Session) -> str:
        return session.csrf

    def refusal(self, session: Session, level: str) -> str | None:
        return None if session.user.may(level) else (
            f"your role ({session.user.role}) may not do this")

    async def verify(self, name: str, password: str) -> User | None:
        return await self.accounts.verify_async(name, password)

    def open(self, who: User) -> tuple[str, Session, dict[str, Any]]:
        token, session = self.accounts.create_session(who)
        return token, session, {"name": who.name, "role": who.role}

    def close(self, token: str, session: Session, remote: str) -> None:
        self.accounts.end_session(token)
        self.accounts.audit(session.user.name, "logout", remote=remote)

    def logged_in(self, who: User, remote: str) -> None:
        self.accounts.audit(who.name, "login", remote=remote)
        log.info("%s (%s) logged in from %s", who.name, who.role, remote)

    def login_failed(self, name: str, remote: str) -> None:
        self.accounts.audit(name, "login_failed", remote=remote)
        log.warning("failed login for %r from %s", name, remote)

    async def close_sockets_of(self, name: str) -> None:
        """Close a user's live WebSockets (disabled, new role, new password): the browser
        reconnects with whatever its session now allows, or is refused."""
        for ws, user in list(self.socket_users.items()):
            if user == name:
                await ws.close(code=4001, message=b"account changed")


CONSOLE_KEY: web.AppKey[ConsoleState] = web.AppKey("console")
needs = access  # a console route declares the permission it needs


def is_console_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def route_permission(request: web.Request) -> str | None:
    return route_access(request)


async def console_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Sessions, roles and CSRF for every ``/console`` route (called by the API's middleware)."""
    return await request.app[CONSOLE_KEY].guard(request, handler)


def _session(request: web.Request) -> Session:
    return request.app[CONSOLE_KEY].session(request)


def _page(name: str, csrf: str, request: web.Request) -> web.Response:
    html = (STATIC_DIR / name).read_text().replace("{{csrf}}", csrf)
    tiles = request.app[CONSOLE_KEY].server.config.console.tile_url
    img_src = "'self' data:"
    if tiles:
        parts = urlsplit(tiles)
        img_src += f" {parts.scheme}://{parts.netloc}"
    return web.Response(text=html, content_type="text/html", headers={
        "Content-Security-Policy": (
            f"default-src 'self'; img-src {img_src}; connect-src 'self'; "
            "media-src 'self' blob:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        ),
    })


# ---------------------------------------------------------------------------- login / me
@needs(PUBLIC)
async def login_page(request: web.Request) -> web.StreamResponse:
    return request.app[CONSOLE_KEY].prelogin_token(
        request, lambda token: _page("login.html", token, request))


@needs(PUBLIC)
async def login(request: web.Request) -> web.Response:
    return await request.app[CONSOLE_KEY].login(request)


@needs("console")
async def logout(request: web.Request) -> web.Response:
    return await request.app[CONSOLE_KEY].logout(request)


@needs(PUBLIC)
async def console_root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(f"{PREFIX}/")


@needs("console")
async def app_page(request: web.Request) -> web.StreamResponse:
    return _page("console.html", _session(request).csrf, request)


@needs("console")
async def me(request: web.Request) -> web.Response:
    session = _session(request)
    cfg = request.app[CONSOLE_KEY].server.config.console
    ice: list[dict[str, Any]] = []
    for url in cfg.ice_servers:
        entry: dict[str, Any] = {"urls": url}
        if url.startswith("turn") and cfg.ice_username:
            entry.update(username=cfg.ice_username, credential=cfg.ice_password)
        ice.append(entry)
    return web.json_response({
        "name": session.user.name, "role": session.user.role,
        "permissions": sorted(session.user.permissions), "csrf": session.csrf,
        "ice_servers": ice, "tile_url": cfg.tile_url, "classifications": list(CLASSIFICATIONS),
        "roles": list(ROLES),
    })


# ---------------------------------------------------------------------------- incidents
def incident_summary(server: ServerHost, incident_id: str) -> dict[str, Any] | None:
    row = server.storage.incidents.summary(incident_id)
    if row is None:
        return None
    row["call_owner"] = server.calls.owner(row["post_id"])
    return row


@needs("incidents.view")
async def incidents(request: web.Request) -> web.Response:
    server = request.app[CONSOLE_KEY].server
    state = request.query.get("state", "open")
    if state not in ("open", "closed", "all", *STATES):
        raise web.HTTPBadRequest(reason="state must be open, closed, all or an incident state")
    rows = server.storage.incidents.recent(None if state == "all" else state, 200)
    return web.json_response([incident_summary(server, r["id"]) for r in rows])


@needs("incidents.view")
async def incident(request: web.Request) -> web.Response:
    server = request.app[CONSOLE_KEY].server
    incident_id = request.match_info["incident_id"]
    row = server.storage.incidents.get(incident_id)
    if row is None:
        raise web.HTTPNotFound(reason="no such incident")
    summary = incident_summary(server, incident_id) or {}
    row.update({k: summary[k] for k in ("post_name", "school", "address", "call_owner")})
    row["commands"] = [c for c in server.commands.recent(row["post_id"], 50)
                       if c["incident_id"] == incident_id]
    row["dispatch"] = server.dispatcher.incident_summary(incident_id)
    return web.json_response(row)


def _transition(request: web.Request, incident_id: str, to: str, *, note: str = "",
                classification: str | None = None) -> web.Response:
    server = request.app[CONSOLE_KEY].server
    actor = _session(request).user.name
    try:
        row = server.transition(incident_id, to, actor, reason=note, classification=classification)
    except LookupError:
        raise web.HTTPNotFound(reason="no such incident") from None
    except InvalidTransition as exc:
        server.metrics.inc("console_refused_total", reason="transition")
        raise web.HTTPConflict(reason=str(exc)) from None
    return web.json_response(incident_summary(server, incident_id) or row)


@needs("incidents.handle")
async def acknowledge(request: web.Request) -> web.Response:
    return _transition(request, request.match_info["incident_id"], "acknowledged")


@needs("incidents.handle")
async def resolve(request: web.Request) -> web.Response:
    body = await json_body(request)
    classification = str_field(body, "classification", 40)
    if classification not in CLASSIFICATIONS:
        raise web.HTTPBadRequest(reason=f"classification must be one of {', '.join(CLASSIFICATIONS)}")
    note = str_field(body, "note", 500, required=False)
    return _transition(request, request.match_info["incident_id"], "resolved", note=note,
                       classification=classification)


def _dispatch(server: ServerHost, action: Callable[[], T]) -> T:
    """Run an operator override on the dispatcher; what it refuses is a counted 409."""
    from server.dispatch import DispatchError

    try:
        return action()
    except (DispatchError, LookupError) as exc:
        server.metrics.inc("console_refused_total", reason="dispatch")
        raise web.HTTPConflict(reason=str(exc)[:200]) from None


@needs("incidents.handle")
async def page_team(request: web.Request) -> web.Response:
    server = request.app[CONSOLE_KEY].server
    incident_id = request.match_info["incident_id"]
    if server.storage.incidents.get(incident_id) is None:
        raise web.HTTPNotFound(reason="no such incident")
    body = await json_body(request)
    team_id = str_field(body, "team_id", 64)
    user = _session(request).user.name
    page_id = _dispatch(server, lambda: server.dispatcher.page_team(
        incident_id, team_id, user, "paged from the console"))
    return web.json_response({"page_id": page_id,
                              "dispatch": server.dispatcher.incident_summary(incident_id)})


async def _reason(request: web.Request) -> str:
    body = await json_body(request) if request.can_read_body else {}
    return str_field(body, "reason", 200, required=False)


@needs("incidents.handle")
async def cancel_page(request: web.Request) -> web.Response:
    """Stop paging one team (the dispatcher goes on to the next); audited on the incident."""
    server = request.app[CONSOLE_KEY].server
    incident_id, page_id = request.match_info["incident_id"], request.match_info["page_id"]
    summary = server.dispatcher.incident_summary(incident_id)
    if summary is None or not any(p["id"] == page_id for p in summary["pages"]):
        raise web.HTTPNotFound(reason="no such page on this incident")
    reason = await _reason(request)
    user = _session(request).user.name
    _dispatch(server, lambda: server.dispatcher.cancel_page(page_id, user, reason))
    return web.json_response({"dispatch": server.dispatcher.incident_summary(incident_id)})


@needs("incidents.handle")
async def redispatch(request: web.Request) -> web.Response:
    """Start dispatch over, leaving out the team that has or was paged for it."""
    server = request.app[CONSOLE_KEY].server
    incident_id = request.match_info["incident_id"]
    if server.storage.incidents.get(incident_id) is None:
        raise web.HTTPNotFound(reason="no such incident")
    reason = await _reason(request)
    user = _session(request).user.name
    _dispatch(server, lambda: server.dispatcher.redispatch(
        incident_id, user, reason or "re-dispatched from the console"))
    return web.json_response({"dispatch": server.dispatcher.incident_summary(incident_id)})


@needs("incidents.view")
async def teams(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONSOLE_KEY].server.dispatcher.team_views())


# ---------------------------------------------------------------------------- posts
@needs("posts.view")
async def posts(request: web.Request) -> web.Response:
    server = request.app[CONSOLE_KEY].server
    faults: dict[str, list[dict[str, Any]]] = {}
    for fault in server.storage.posts.faults(True, 1000):
        faults.setdefault(fault["post_id"], []).append(fault)
    rows = []
    for row in server.storage.posts.all():
        row = with_live(server.live, row)
        row["faults"] = faults.get(row["id"], [])
        row["call_owner"] = server.calls.owner(row["id"])
        rows.append(row)
    return web.json_response(rows)


@needs("posts.view")
async def commands(request: web.Request) -> web.Response:
    server = request.app[CONSOLE_KEY].server
    post_id = query_str(request, "post", 64, valid_post_id)
    return web.json_response(server.commands.recent(post_id, 100))


@needs("posts.command")
async def command(request: web.Request) -> web.Response:
    state = request.app[CONSOLE_KEY]
    server = state.server
    post_id = request.match_info["post_id"]
    if not valid_post_id(post_id) or post_id not in server.live:
        raise web.HTTPNotFound(reason="no such post")
    body = await json_body(request)
    cmd = str_field(body, "cmd", 20)
    incident_id = body.get("incident_id")
    if incident_id is not None:
        if not isinstance(incident_id, str) or server.storage.incidents.get(incident_id) is None:
            raise web.HTTPBadRequest(reason="incident_id names no incident")
    actor = _session(request).user.name
    try:
        record = await server.commands.send(post_id, cmd, actor, incident_id)
    except ValueError as exc:
        raise web.HTTPBadRequest(reason=str(exc)) from None
    state.accounts.audit(actor, f"command_{cmd}", post_id, f"command {record['id']}",
                         request.remote or "")
    return web.json_response(record, status=202)


@needs("posts.test_mode")
async def test_mode(request: web.Request) -> web.Response:
    """Technicians and admins: put a post in test mode (``on``: true, with a reason) or out."""
    state = request.app[CONSOLE_KEY]
    server = state.server
    post_id = request.match_info["post_id"]
    if not valid_post_id(post_id) or post_id not in server.live:
        raise web.HTTPNotFound(reason="no such post")
    body = await json_body(request)
    on = body.get("on")
    if not isinstance(on, bool):
        raise web.HTTPBadRequest(reason="'on' must be true or false")
    reason = str_field(body, "reason", 200, required=on)
    actor = _session(request).user.name
    row = server.set_test_mode(post_id, on, actor, reason)
    state.accounts.audit(actor, "test_mode_on" if on else "test_mode_off", post_id, reason,
                         request.remote or "")
    return web.json_response(row)


# ---------------------------------------------------------------------------- admin
@needs("users.manage")
async def users(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONSOLE_KEY].accounts.users())


@needs("users.manage")
async def add_user(request: web.Request) -> web.Response:
    state = request.app[CONSOLE_KEY]
    body = await json_body(request)
    name = str_field(body, "name", 64)
    role = str_field(body, "role", 20)
    password = str_field(body, "password", 1024)
    if role not in ROLES:
        raise web.HTTPBadRequest(reason=f"role must be one of {', '.join(ROLES)}")
    actor = _session(request).user.name
    try:
        password_hash = await asyncio.to_thread(state.accounts.hash_password, password)
        state.accounts.add_user_hashed(name, role, password_hash, actor)
    except UserError as exc:
        raise web.HTTPBadRequest(reason=str(exc)) from None
    return web.json_response({"name": name, "role": role}, status=201)


def _user_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not request.app[CONSOLE_KEY].accounts.exists(name):
        raise web.HTTPNotFound(reason="no such user")
    return name


@needs("users.manage")
async def set_role(request: web.Request) -> web.Response:
    state = request.app[CONSOLE_KEY]
    name = _user_name(request)
    role = str_field(await json_body(request), "role", 20)
    try:
        state.accounts.set_role(name, role, _session(request).user.name, request.remote or "")
    except UserError as exc:
        raise web.HTTPBadRequest(reason=str(exc)) from None
    await state.close_sockets_of(name)
    return web.json_response({"name": name, "role": role})


@needs("users.manage")
async def set_disabled(request: web.Request) -> web.Response:
    state = request.app[CONSOLE_KEY]
    name = _user_name(request)
    disabled = (await json_body(request)).get("disabled")
    if not isinstance(disabled, bool):
        raise web.HTTPBadRequest(reason="'disabled' must be true or false")
    try:
        state.accounts.set_disabled(name, disabled, _session(request).user.name,
                                    request.remote or "")
    except UserError as exc:
        raise web.HTTPBadRequest(reason=str(exc)) from None
    if disabled:
        await state.close_sockets_of(name)
    return web.json_response({"name": name, "disabled": disabled})


@needs("users.manage")
async def reset_password(request: web.Request) -> web.Response:
    state = request.app[CONSOLE_KEY]
    name = _user_name(request)
    password = str_field(await json_body(request), "password", 1024)
    try:
        password_hash = await asyncio.to_thread(state.accounts.hash_password, password)
    except UserError as exc:
        raise web.HTTPBadRequest(reason=str(exc)) from None
    state.accounts.set_password_hashed(name, password_hash, _session(request).user.name,
                                       request.remote or "")
    await state.close_sockets_of(name)
    return web.json_response({"name": name, "password_reset": True})


@needs("audit.view")
async def audit(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONSOLE_KEY].accounts.audit_log(500))


# ---------------------------------------------------------------------------- WebSocket
def _visible(notice: Notice, session: Session) -> bool:
    if isinstance(notice, IncidentOpened | IncidentUpdated | EventJoined | DispatchQueued
                  | TeamStatusChanged):
        return session.user.may("incidents.view")
    if isinstance(notice, PostState | CommandUpdated | PostTestMode):
        return session.user.may("posts.view")
    if isinstance(notice, CallUpdated):
        return session.user.may("incidents.view") or session.user.may("calls")
    return isinstance(notice, Overflow)


class ConsoleSocket:
    """One browser's WebSocket: bus notices out, call signaling in."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, session: Session) -> None:
        self.request = request
        self.ws = ws
        self.session = session
        self.state = request.app[CONSOLE_KEY]
        self.server = self.state.server
        self.calls: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def send(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_json(message)

    def _enrich(self, notice: Notice) -> dict[str, Any]:
        message = notice.as_dict()
        if "incident_id" in message and not isinstance(notice, CallUpdated):
            message["incident"] = incident_summary(self.server, message["incident_id"])
        return message

    async def pump(self, queue: asyncio.Queue[Notice]) -> None:
        while True:
            notice = await queue.get()
            try:
                if _visible(notice, self.session):
                    await self.send(self._enrich(notice))
            except Exception:  # one notice that fails must not stop the live queue
                self.server.metrics.inc("console_ws_rejected_total", reason="notice_error")
                log.exception("console ws of %s: could not send a %r notice",
                              self.session.user.name, type(notice).__name__)

    def reject(self, reason: str, detail: str) -> None:
        self.server.metrics.inc("console_ws_rejected_total", reason=reason)
        log.warning("console ws of %s: rejected %s: %s", self.session.user.name, reason, detail[:200])

    async def on_message(self, raw: str) -> None:
        try:
            message = parse_json(raw, max_bytes=MAX_WS_MESSAGE)
        except BadInput as exc:
            self.reject("malformed", f"{exc.reason}, {len(raw)} characters")
            await self.send({"type": "error", "error": f"messages must be JSON objects: "
                                                       f"{exc.message}"})
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self.reject("malformed", raw[:80])
            await self.send({"type": "error", "error": "messages must be JSON objects with a type"})
            return
        kind = message["type"]
        if kind == "ping":
            await self.send({"type": "pong"})
        elif kind in ("call.start", "call.hangup"):
            if not self.session.user.may("calls"):
                self.reject("role", kind)
                await self.send({"type": "error", "error": "your role may not make calls"})
                return
            if kind == "call.start":
                task = asyncio.create_task(self.start_call(message))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            else:
                await self.hangup_call(message)
        else:
            self.reject("unknown_type", kind)
            await self.send({"type": "error", "error": f"unknown message type {kind[:40]!r}"})

    async def start_call(self, message: dict[str, Any]) -> None:
        post_id, sdp = message.get("post_id"), message.get("sdp")
        incident_id = message.get("incident_id")
        if not isinstance(post_id, str) or post_id not in self.server.live:
            self.reject("bad_call", "unknown post")
            post_id = post_id[:64] if isinstance(post_id, str) else None  # never echo a structure
            await self.send({"type": "call.error", "post_id": post_id, "reason": "invalid",
                             "error": "unknown post"})
            return
        if not isinstance(sdp, str) or not 0 < len(sdp) <= 30000 or "v=0" not in sdp[:10]:
            self.reject("bad_call", "bad sdp")
            await self.send({"type": "call.error", "post_id": post_id, "reason": "invalid",
                             "error": "the offer must be an SDP of at most 30000 characters"})
            return
        mode = message.get("mode", "call")
        if mode not in ("call", "view"):
            self.reject("bad_call", "bad mode")
            await self.send({"type": "call.error", "post_id": post_id, "reason": "invalid",
                             "error": "mode must be call or view"})
            return
        if incident_id is not None and not isinstance(incident_id, str):
            incident_id = None
        if self.server.live[post_id].state == "offline":
            await self.send({"type": "call.error", "post_id": post_id, "mode": mode,
                             "reason": "offline", "error": f"post {post_id} is offline"})
            return
        user = self.session.user.name
        self.state.accounts.audit(user, "camera_view" if mode == "view" else "call_start",
                                  post_id, incident_id or "", self.request.remote or "")
        try:
            call_id, answer = await self.server.calls.start(
                post_id, user, sdp, incident_id=incident_id, on_end=self._call_ended, mode=mode)
        except CallError as exc:
            await self.send({"type": "call.error", "post_id": post_id, "mode": mode,
                             "reason": exc.reason, "error": str(exc), "taken_by": exc.taken_by})
            return
        if self.ws.closed:  # the browser left while the post was answering
            await self.server.calls.hangup(call_id, "console closed", by=user)
            return
        self.calls.add(call_id)
        await self.send({"type": "call.answer", "post_id": post_id, "call_id": call_id,
                         "mode": mode, "sdp": answer})

    def _call_ended(self, call_id: str, reason: str) -> None:
        if call_id in self.calls:
            self.calls.discard(call_id)
            task = asyncio.ensure_future(self.send({"type": "call.ended", "call_id": call_id,
                                                     "reason": reason}))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def hangup_call(self, message: dict[str, Any]) -> None:
        call_id = message.get("call_id")
        if not isinstance(call_id, str) or call_id not in self.calls:
            self.reject("bad_call", "hangup of a call that is not this console's")
            await self.send({"type": "error", "error": "no such call on this console"})
            return
        self.calls.discard(call_id)
        await self.server.calls.hangup(call_id, "operator hung up", by=self.session.user.name)
        await self.send({"type": "call.ended", "call_id": call_id, "reason": "hung up"})

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for call_id in list(self.calls):
            await self.server.calls.hangup(call_id, "console closed", by=self.session.user.name)
        self.calls.clear()


@needs("console")
async def websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[CONSOLE_KEY]
    server = state.server
    session = _session(request)
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=MAX_WS_MESSAGE)
    await ws.prepare(request)
    sock = ConsoleSocket(request, ws, session)
    queue = server.bus.subscribe()
    state.sockets.add(ws)
    state.socket_users[ws] = session.user.name
    pump = asyncio.create_task(sock.pump(queue))
    server.metrics.inc("console_ws_connections_total")
    try:
        await sock.send({"type": "hello", "user": session.user.name, "role": session.user.role,
                         "calls": server.calls.active(), "at": time.time()})
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                try:
                    await sock.on_message(msg.data)
                except Exception:  # a message must never end the socket's loop
                    sock.reject("error", f"{len(msg.data)} characters")
                    log.exception("console ws of %s: error handling a message",
                                  session.user.name)
                    await sock.send({"type": "error", "error": "that message failed; see the "
                                                               "server log"})
            elif msg.type == WSMsgType.BINARY:
                sock.reject("binary", "")
                await sock.send({"type": "error", "error": "text messages only"})
            elif msg.type == WSMsgType.ERROR:
                break
    except Exception:  # never a traceback onto an upgraded connection: close it cleanly
        sock.reject("error", "the socket's loop failed")
        log.exception("console ws of %s failed; closing it", session.user.name)
        with contextlib.suppress(Exception):
            await ws.close(code=1011, message=b"server error")
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        server.bus.unsubscribe(queue)
        state.sockets.discard(ws)
        state.socket_users.pop(ws, None)
        await sock.close()
    return ws


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[CONSOLE_KEY].sockets):
        await ws.close(code=1001, message=b"server stopping")


def setup_console(app: web.Application, server: ServerHost) -> ConsoleState:
    """Mount the console on the server's app (its middleware calls :func:`console_guard`)."""
    state = ConsoleState(server)
    app[CONSOLE_KEY] = state
    m = server.metrics
    m.counter("console_refused_total", "Console requests refused, by reason")
    m.counter("console_logins_total", "Console logins, by result")
    m.counter("console_ws_connections_total", "Console WebSockets opened")
    m.counter("console_ws_rejected_total", "Console WebSocket messages rejected, by reason")
    r = app.router
    r.add_get(PREFIX, console_root)
    r.add_get(f"{PREFIX}/", app_page)
    r.add_get(f"{PREFIX}/login", login_page)
    r.add_post(f"{PREFIX}/api/login", login)
    r.add_post(f"{PREFIX}/api/logout", logout)
    r.add_get(f"{PREFIX}/api/me", me)
    r.add_get(f"{PREFIX}/ws", websocket)
    r.add_get(f"{PREFIX}/api/incidents", incidents)
    r.add_get(f"{PREFIX}/api/incidents/{{incident_id}}", incident)
    r.add_post(f"{PREFIX}/api/incidents/{{incident_id}}/acknowledge", acknowledge)
    r.add_post(f"{PREFIX}/api/incidents/{{incident_id}}/resolve", resolve)
    r.add_post(f"{PREFIX}/api/incidents/{{incident_id}}/page", page_team)
    r.add_post(f"{PREFIX}/api/incidents/{{incident_id}}/pages/{{page_id}}/cancel", cancel_page)
    r.add_post(f"{PREFIX}/api/incidents/{{incident_id}}/redispatch", redispatch)
    r.add_get(f"{PREFIX}/api/teams", teams)
    r.add_get(f"{PREFIX}/api/posts", posts)
    r.add_get(f"{PREFIX}/api/commands", commands)
    r.add_post(f"{PREFIX}/api/posts/{{post_id}}/command", command)
    r.add_post(f"{PREFIX}/api/posts/{{post_id}}/test_mode", test_mode)
    r.add_get(f"{PREFIX}/api/users", users)
    r.add_post(f"{PREFIX}/api/users", add_user)
    r.add_post(f"{PREFIX}/api/users/{{name}}/role", set_role)
    r.add_post(f"{PREFIX}/api/users/{{name}}/disabled", set_disabled)
    r.add_post(f"{PREFIX}/api/users/{{name}}/password", reset_password)
    r.add_get(f"{PREFIX}/api/audit", audit)
    r.add_static(f"{PREFIX}/static", STATIC_DIR)
    app.on_shutdown.append(_close_sockets)
    if state.accounts.count() == 0:
        source = server.config.source or "server.toml"
        log.warning(
            "no console users yet: create one with `alarmpost server user add --config %s NAME "
            "--role admin` (roles: %s)", source, ", ".join(ROLES))
    return state
