"""What every HTTP surface of the server shares: JSON errors, refusals that are counted and
logged, bounded JSON parsing for bodies and WebSocket frames, query-parameter checks,
same-origin checks, the wrapper that turns any failure of a handler into a clean JSON answer
(never a traceback) with the usual security headers, and the connection handler that gives a
client a deadline to send its request's headers.

Input is bounded before it is parsed: a body is at most :data:`MAX_BODY` bytes (checked on
``Content-Length`` before reading, and while reading) and must arrive within the read deadline;
JSON is at most :data:`MAX_DEPTH` levels deep (counted by a scan before ``json.loads``, so a
deep document never reaches the recursive parser), valid UTF-8, without lone surrogates,
NaN, infinities or integers of more than :data:`MAX_INT_DIGITS` digits. What fails is a
:class:`BadInput`: 400 (413, 408) with a JSON error, counted in
``http_bad_input_total{reason}`` and logged with its size, never a 500."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from protocol.messages import json_depth
from server.logthrottle import LogThrottle, left_out_note

if TYPE_CHECKING:
    from server.metrics import Metrics

log = logging.getLogger("alarmpost.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Refusals are always counted; their log lines are bounded per client address and reason.
_log_throttle = LogThrottle()

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
    allowed, left_out = _log_throttle.allow((request.remote, reason))
    if allowed:
        log.warning("refused %s %s from %s: %s%s", request.method, request.path[:200],
                    request.remote, reason, left_out_note(left_out))
    return error(status, message, **headers)


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of a token a client sent with ours. Header values that were
    not UTF-8 reach us with surrogate escapes: they compare (unequal), never raise."""
    return bool(given) and hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                               expected.encode("utf-8", "surrogateescape"))


def same_origin(request: web.Request, required: bool) -> bool:
    """Browsers send Origin on cross-origin POSTs and on every WebSocket."""
    origin = request.headers.get("Origin")
    if origin is None:
        return not required
    try:
        return urlsplit(origin).netloc == request.host
    except ValueError:  # "http://[::1" and the like: not our origin
        return False


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
    if not same_secret(given, csrf):
        return "csrf", "missing or wrong CSRF token"
    return None


async def run_handler(metrics: Metrics, request: web.Request, handler: Handler, *,
                      on_http_error: Callable[[int], None] | None = None,
                      secure_headers: bool = True) -> web.StreamResponse:
    """Call ``handler``; shape HTTP errors and crashes as JSON, count every answer."""
    try:
        if not all(is_text(v) for v in request.match_info.values()):
            raise BadInput("not_text", "the path holds characters that are not text")
        response = await handler(request)
    except BadInput as exc:
        return bad_input(metrics, request, exc)
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


def bad_input(metrics: Metrics, request: web.Request, exc: BadInput) -> web.Response:
    """Answer a :class:`BadInput`: counted by reason, logged with its size, JSON error."""
    metrics.inc("http_bad_input_total", reason=exc.reason)
    metrics.inc("http_requests_total", status=str(exc.status))
    allowed, left_out = _log_throttle.allow((request.remote, exc.reason))
    if allowed:
        log.warning("bad input %s %s from %s (%s bytes): %s: %s%s", request.method,
                    request.path[:200], request.remote, request.content_length, exc.reason,
                    exc.message, left_out_note(left_out))
    return error(exc.status, exc.message)


async def _read_at_most(request: web.Request, limit: int) -> bytes:
    """The body until its end, or its first ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await request.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object: bounded in size, time and depth before parsing."""
    limits = request.app.get(LIMITS_KEY) or HttpLimits()
    if request.content_length is not None and request.content_length > limits.max_body:
        raise BadInput("too_large", f"the body must be at most {limits.max_body} bytes", 413)
    try:
        raw = await asyncio.wait_for(_read_at_most(request, limits.max_body + 1),
                                     limits.read_timeout_s)
    except TimeoutError:
        raise BadInput("body_timeout", "the body did not arrive in time", 408) from None
    if len(raw) > limits.max_body:
        raise BadInput("too_large", f"the body must be at most {limits.max_body} bytes", 413)
    if not raw:
        return {}  # no body: the same as {} (every field is then checked as missing)
    body = parse_json(raw, max_bytes=limits.max_body)
    if not isinstance(body, dict):
        raise BadInput("not_object", "the body must be a JSON object")
    return body


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter of ASCII digits within [low, high]; else :class:`BadInput`."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9 and low <= int(raw) <= high):
        raise BadInput("bad_parameter", f"{name} must be an integer from {low} to {high}")
    return int(raw)


def query_str(request: web.Request, name: str, max_len: int = 100,
              valid: Callable[[str], bool] | None = None) -> str | None:
    """A text query parameter: at most ``max_len`` characters, no control characters, and
    ``valid`` if given; else :class:`BadInput`."""
    raw = request.query.get(name)
    if raw is None:
        return None
    if (len(raw) > max_len or not raw.isprintable() or "\ufffd" in raw
            or (valid is not None and not valid(raw))):
        raise BadInput("bad_parameter", f"{name} is not valid here")
    return raw


_NOT_TEXT: Final = re.compile("[\x00\ud800-\udfff]")


def is_text(value: str) -> bool:
    """No NUL and no lone surrogate: what any database can store and any client can read."""
    return _NOT_TEXT.search(value) is None


def str_field(body: dict[str, Any], key: str, max_len: int = 200, required: bool = True) -> str:
    value = body.get(key, "")
    if not isinstance(value, str) or len(value) > max_len or (required and not value):
        raise web.HTTPBadRequest(reason=f"{key!r} must be a string of 1-{max_len} characters")
    if not is_text(value):
        raise BadInput("not_text", f"{key!r} holds characters that are not text (NUL, surrogates)")
    return value


# ---------------------------------------------------------------------------- bounded JSON
MAX_BODY: Final = 64 * 1024  # a JSON body or WebSocket message, in bytes
MAX_DEPTH: Final = 16  # nesting of objects and arrays; the deepest legitimate body has 3
MAX_INT_DIGITS: Final = 30


class BadInput(Exception):
    """Input refused before or while parsing: ``reason`` (the metric label), ``message``
    (for the client), ``status`` (400, or 413 too large, 408 too slow)."""

    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason, self.message, self.status = reason, message, status


@dataclass(frozen=True)
class HttpLimits:
    max_body: int = MAX_BODY
    read_timeout_s: float = 10.0  # the request's headers, and then its body, within this


LIMITS_KEY: web.AppKey[HttpLimits] = web.AppKey("http_limits", HttpLimits)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("numbers must be finite")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integers have at most {MAX_INT_DIGITS} digits")
    return int(text)


def _constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def parse_json(raw: bytes | str, max_bytes: int = MAX_BODY, max_depth: int = MAX_DEPTH) -> Any:
    """Parse a JSON document bounded before parsing: size, UTF-8, depth; then no lone
    surrogates, no NaN or infinities, no huge integers. Raises :class:`BadInput`."""
    if len(raw) > max_bytes:
        raise BadInput("too_large", f"at most {max_bytes} bytes", 413)
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput("encoding", "the body must be UTF-8 text") from None
    else:
        text = raw
    scanned = raw if isinstance(raw, bytes) else text.encode("utf-8", "surrogatepass")
    if json_depth(scanned, limit=max_depth) > max_depth:
        raise BadInput("too_deep", f"JSON nested deeper than {max_depth} levels")
    try:
        value = json.loads(text, parse_float=_float, parse_int=_int, parse_constant=_constant)
        # Lone surrogates ("\ud800") parse, but no database or encoder will take them.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput("encoding", "strings must be valid Unicode") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise BadInput("malformed", f"not valid JSON: {str(exc)[:100]}") from None
    return value


# ---------------------------------------------------------------------------- slow clients
class DeadlineRequestHandler(RequestHandler):
    """aiohttp's connection handler with a deadline for a request's headers.

    aiohttp has none: a client that sends its headers one byte at a time holds a connection
    (and its memory) for as long as it likes. Here a timer is armed when the connection is made
    and, on a kept-alive connection, when the first byte of the next request arrives; it is
    cancelled as soon as a request's headers have been parsed. When it fires, the client gets
    ``408`` and the connection is closed. Idle kept-alive connections are aiohttp's own
    ``keepalive_timeout``."""

    header_timeout_s: float = 10.0
    on_timeout: Callable[[], None] | None = None
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._deadline is None and self.header_timeout_s > 0:
            self._deadline = self._loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data: bytes) -> None:
        waiting = self._waiter is not None and not self._waiter.done()
        if data and waiting and self._deadline is None:
            self._arm()  # the first byte of a new request on a kept-alive connection
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            self._disarm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _expired(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.on_timeout is not None:
            self.on_timeout()
        log.warning("closed a connection from %s: request headers not complete after %.0f s",
                    self.peername, self.header_timeout_s)
        transport.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                        b"Content-Type: text/plain\r\nContent-Length: 25\r\n\r\n"
                        b"request headers too slow\n")
        self.force_close()
        transport.close()


class DeadlineServer(web.Server):
    """A :class:`aiohttp.web.Server` whose connections are :class:`DeadlineRequestHandler`."""

    def __init__(self, *args: Any, header_timeout_s: float,
                 on_timeout: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.on_timeout = on_timeout

    def __call__(self) -> RequestHandler:
        handler = DeadlineRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout_s = self.header_timeout_s
        handler.on_timeout = self.on_timeout
        return handler


class DeadlineAppRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` serving through a :class:`DeadlineServer`."""

    def __init__(self, app: web.Application, *, header_timeout_s: float,
                 on_timeout: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._on_timeout = on_timeout

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return DeadlineServer(
            plain.request_handler, request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation, loop=plain._loop,
            header_timeout_s=self._header_timeout_s, on_timeout=self._on_timeout,
            **plain._kwargs)
