"""The HTTP API (JSON) and ``/metrics``. Every endpoint wants the bearer token.

GET /api/posts                    every registered post with its live state and health
GET /api/posts/{id}
GET /api/incidents?state=open&limit=100    open, closed, or a state (server.incidents)
GET /api/incidents/{id}           with its events and audit timeline
GET /api/events?post=P001&limit=100
GET /api/faults?open=1&limit=100
GET /api/teams                    patrol teams with live status, position and current incident
GET /api/teams/{id}
POST /api/teams                   register a team (as `alarmpost patrol team add`)
DELETE /api/teams/{id}            remove a team (409 while it has a page or an assignment)
GET /metrics                      Prometheus text format
GET /healthz                      "ok" once connected to the broker

The operators' console (``/console/...``, :mod:`server.web.console`) uses sessions and CSRF
tokens instead of the bearer token: machines use the token, people log in. So does the patrol
teams' phone app (``/patrol/...``, :mod:`server.web.patrol`), with one login per team.
"""

from __future__ import annotations

import logging

from aiohttp import web

from protocol.topics import valid_post_id
from server.incidents import STATES
from server.live import with_live
from server.web.console import console_guard, is_console_path, setup_console
from server.web.host import SERVER_KEY, ServerHost
from server.web.http import (
    LIMITS_KEY,
    BadInput,
    DeadlineAppRunner,
    Handler,
    HttpLimits,
    bad_input,
    error,
    query_int,
    query_str,
    run_handler,
    same_secret,
)
from server.web.patrol import is_patrol_path, patrol_guard, setup_patrol_app
from server.web.teams import add_routes as add_team_routes

log = logging.getLogger("alarmpost.http")

KEEPALIVE_S = 75.0  # an idle kept-alive connection is closed after this


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication, error shaping and request counting for every endpoint. Nothing a
    client sends escapes it: input errors are a counted 4xx; anything else, a logged 500."""
    server = request.app[SERVER_KEY]
    try:
        return await _guarded(server, request, handler)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        server.metrics.inc("http_requests_total", status=str(exc.status))
        return error(exc.status, exc.reason)
    except BadInput as exc:
        return bad_input(server.metrics, request, exc)
    except Exception:
        server.metrics.inc("http_requests_total", status="500")
        log.exception("error guarding %s %s", request.method, request.path[:200])
        return error(500, "internal error; see the server log")


async def _guarded(server: ServerHost, request: web.Request,
                   handler: Handler) -> web.StreamResponse:
    if is_console_path(request.path):
        return await console_guard(request, handler)
    if is_patrol_path(request.path):  # the patrol teams' app: team sessions (server.web.patrol)
        return await patrol_guard(request, handler)
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header.startswith("Bearer ") else ""
    if not same_secret(given, server.config.http.api_token):
        server.metrics.inc("http_requests_total", status="401")
        log.warning("unauthenticated %s %s from %s", request.method, request.path, request.remote)
        return error(401, "missing or wrong token: send 'Authorization: Bearer <api_token>'",
                      **{"WWW-Authenticate": 'Bearer realm="alarmpost"'})
    return await run_handler(server.metrics, request, handler)


def _limit(request: web.Request) -> int:
    return query_int(request, "limit", 100, 1, 1000)


async def posts(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    return web.json_response([with_live(server.live, r) for r in server.storage.posts.all()])


async def post(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    row = server.storage.posts.get(request.match_info["post_id"])
    if row is None:
        raise web.HTTPNotFound(reason="no such post")
    return web.json_response(with_live(server.live, row))


async def incidents(request: web.Request) -> web.Response:
    state = request.query.get("state")
    if state is not None and state not in ("open", "closed", *STATES):
        raise web.HTTPBadRequest(reason=f"state must be open, closed or one of {', '.join(STATES)}")
    server = request.app[SERVER_KEY]
    return web.json_response(server.storage.incidents.recent(state, _limit(request)))


async def incident(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    row = server.storage.incidents.get(request.match_info["incident_id"])
    if row is None:
        raise web.HTTPNotFound(reason="no such incident")
    row["dispatch"] = server.dispatcher.incident_summary(row["id"])  # teams paged, key times
    return web.json_response(row)


async def events(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    post_id = query_str(request, "post", 64, valid_post_id)
    return web.json_response(server.storage.incidents.events(post_id, _limit(request)))


async def faults(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    open_only = query_str(request, "open", 5) in {"1", "true", "yes"}
    return web.json_response(server.storage.posts.faults(open_only, _limit(request)))


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[SERVER_KEY].metrics.render(),
                        content_type="text/plain", charset="utf-8")


async def healthz(request: web.Request) -> web.Response:
    ready = request.app[SERVER_KEY].ready.is_set()
    return web.json_response({"ok": ready}, status=200 if ready else 503)


def make_app(server: ServerHost) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    app[SERVER_KEY] = server
    app[LIMITS_KEY] = HttpLimits(read_timeout_s=server.config.http.read_timeout_s)
    m = server.metrics
    m.counter("http_bad_input_total", "HTTP bodies, parameters and WebSocket messages refused "
              "before use, by reason")
    m.counter("http_refused_total", "HTTP connections refused, by reason (header_timeout)")
    m.counter("login_refused_total", "Login attempts refused unchecked (429), by app and reason")
    m.counter("login_delayed_total", "Login attempts slowed down (a name being guessed at), by app")
    app.router.add_get("/api/posts", posts)
    app.router.add_get("/api/posts/{post_id}", post)
    app.router.add_get("/api/incidents", incidents)
    app.router.add_get("/api/incidents/{incident_id}", incident)
    app.router.add_get("/api/events", events)
    app.router.add_get("/api/faults", faults)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    setup_console(app, server)
    setup_patrol_app(app, server)  # /patrol: the patrol teams' phone app
    add_team_routes(app)  # /api/teams, /api/teams/{id}
    return app


async def start_http(server: ServerHost) -> web.AppRunner:
    runner = DeadlineAppRunner(
        make_app(server), access_log=None, handle_signals=False, keepalive_timeout=KEEPALIVE_S,
        header_timeout_s=server.config.http.read_timeout_s,
        on_timeout=lambda: server.metrics.inc("http_refused_total", reason="header_timeout"))
    await runner.setup()
    console = server.config.console
    tls = None
    if console.tls_cert_file:
        import ssl

        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(console.tls_cert_file, console.tls_key_file or None)
    site = web.TCPSite(runner, server.config.http.host, server.config.http.port, ssl_context=tls)
    await site.start()
    scheme = "https" if tls else "http"
    log.info("HTTP API on %s://%s:%d/, console on %s://%s:%d/console/, patrol app on "
             "%s://%s:%d/patrol/", scheme, server.config.http.host, server.config.http.port,
             scheme, server.config.http.host, server.config.http.port,
             scheme, server.config.http.host, server.config.http.port)
    return runner
