"""What every HTTP surface of the server shares: JSON errors, refusals that are counted and
logged, request-body checks, same-origin checks, and the wrapper that turns any failure of a
handler into a clean JSON answer (never a traceback) with the usual security headers."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

if TYPE_CHECKING:
    from server.metrics import Metrics

log = logging.getLogger("alarmpost.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def refuse(metrics: Metrics, counter: str, request: web.Request, status: int, reason: str,
           message: str, **headers: str) -> web.Response:
    """Refuse a request: counted under ``counter{reason}``, logged, answered in JSON."""
    metrics.inc(counter, reason=reason)
    metrics.inc("http_requests_total", status=str(status))
    log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, reason)
    return error(status, message, **headers)


def same_origin(request: web.Request, required: bool) -> bool:
    """Browsers send Origin on cross-origin POSTs and on every WebSocket."""
    origin = request.headers.get("Origin")
    if origin is None:
        return not required
    return urlsplit(origin).netloc == request.host


def forgery_refusal(request: web.Request, csrf: str, header: str,
                    changes_state: bool) -> tuple[str, str] | None:
    """For a request made in a session: a WebSocket, or a request that changes state, must come
    from our own origin and carry the session's CSRF token (in ``header``, or ``?csrf=`` on a
    WebSocket, which cannot set headers). ``(reason, message)`` to refuse, or None."""
    websocket = request.headers.get("Upgrade", "").lower() == "websocket"
    if not (changes_state or websocket):
        return None
    if not same_origin(request, required=websocket):
        return "origin", "cross-origin request refused"
    given = request.query.get("csrf", "") if websocket else request.headers.get(header, "")
    if not (given and hmac.compare_digest(given.encode(), csrf.encode())):
        return "csrf", "missing or wrong CSRF token"
    return None


async def run_handler(metrics: Metrics, request: web.Request, handler: Handler, *,
                      on_http_error: Callable[[int], None] | None = None,
                      secure_headers: bool = True) -> web.StreamResponse:
    """Call ``handler``; shape HTTP errors and crashes as JSON, count every answer."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if on_http_error is not None:
            on_http_error(exc.status)
        metrics.inc("http_requests_total", status=str(exc.status))
        return error(exc.status, exc.reason)
    except Exception:
        metrics.inc("http_requests_total", status="500")
        log.exception("error serving %s %s", request.method, request.path)
        return error(500, "internal error; see the server log")
    metrics.inc("http_requests_total", status=str(response.status))
    if secure_headers and not response.prepared:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
    return response


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(reason="the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(reason="the body must be a JSON object")
    return body


def str_field(body: dict[str, Any], key: str, max_len: int = 200, required: bool = True) -> str:
    value = body.get(key, "")
    if not isinstance(value, str) or len(value) > max_len or (required and not value):
        raise web.HTTPBadRequest(reason=f"{key!r} must be a string of 1-{max_len} characters")
    return value
