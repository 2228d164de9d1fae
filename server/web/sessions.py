"""One login mechanism and one session guard for every browser app of the server.

The console (operators) and the patrol app (teams' phones) are both a :class:`SessionSite`:
a path prefix, a login form, a session cookie, and routes that each declare who may call them
(:func:`access`). What differs — how a password is checked, what a session is, who may do what —
is the site's few methods; the rest is written once here:

- **Login**: the login page sets a pre-login cookie whose value the page sends back as its
  CSRF header (no cross-site login); the check goes through the site's :class:`LoginLimiter`
  (a flood from one address is refused unchecked, a name being guessed at is slowed down); a
  session cookie (HttpOnly, SameSite=Strict, Secure where configured) holds a token of which
  only the digest is stored.
- **Guard**: a route that declares no access is refused (fail closed); a session is required
  unless the route is public; the session's role must allow the route; a state-changing request
  must carry the session's CSRF token and come from our own origin (public ones: our origin).
"""

from __future__ import annotations

import logging
import secrets
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, Final, Generic, TypeVar

from aiohttp import web

from server.web.auth import CSRF_HEADER, LoginLimiter, login_refused, same_token
from server.web.host import ServerHost
from server.web.http import (
    Handler,
    error,
    forgery_refusal,
    json_body,
    refuse,
    run_handler,
    same_origin,
    str_field,
)

log = logging.getLogger("alarmpost.web.sessions")

PUBLIC: Final = "public"

H = TypeVar("H", bound=Handler)
S = TypeVar("S")  # a site's session
W = TypeVar("W")  # who logged in (a console user, a team id)


def access(level: str) -> Callable[[H], H]:
    """Declare who may call a route: :data:`PUBLIC`, or a level the site's
    :meth:`SessionSite.refusal` understands (a console permission, ``team``)."""

    def mark(handler: H) -> H:
        handler.access = level  # type: ignore[attr-defined]
        return handler

    return mark


def route_access(request: web.Request) -> str | None:
    """The level the matched route declared; static files are public."""
    route = request.match_info.route
    if isinstance(route.resource, web.StaticResource):
        return PUBLIC
    return getattr(route.handler, "access", None)


class SessionSite(ABC, Generic[S, W]):
    """A browser app behind a login: the console, the patrol app."""

    name: str  # metrics label ("console", "patrol")
    prefix: str  # "/console"
    session_cookie: str
    prelogin_cookie: str
    login_field: str  # the login form's name field ("name", "team")
    refused_metric: str  # counter of refused requests, by reason
    logins_metric: str  # counter of logins, by result
    count_http_errors = False  # also count a handler's 4xx under refused_metric (http_NNN)

    def __init__(self, server: ServerHost, limiter: LoginLimiter, session_ttl_s: float,
                 secure_cookies: bool) -> None:
        self.server = server
        self.limiter = limiter
        self.session_ttl_s = session_ttl_s
        self.secure_cookies = secure_cookies
        self.session_key: web.RequestKey[Any] = web.RequestKey(f"alarmpost.{self.name}_session",
                                                               object)

    # ------------------------------------------------------------------ what each site says
    @abstractmethod
    def find(self, token: str) -> S | None:
        """The live session of a cookie's token, or None."""

    @abstractmethod
    def csrf(self, session: S) -> str: ...

    @abstractmethod
    def refusal(self, session: S, level: str) -> str | None:
        """Why ``session`` may not call a route of ``level`` (None: it may)."""

    @abstractmethod
    async def verify(self, name: str, password: str) -> W | None: ...

    @abstractmethod
    def open(self, who: W) -> tuple[str, S, dict[str, Any]]:
        """A new session: (token, session, what the login response tells the page)."""

    @abstractmethod
    def close(self, token: str, session: S, remote: str) -> None: ...

    def logged_in(self, who: W, remote: str) -> None:
        log.info("%s: %s logged in from %s", self.name, who, remote)

    def login_failed(self, name: str, remote: str) -> None:
        log.warning("%s: failed login for %r from %s", self.name, name, remote)

    # ------------------------------------------------------------------ written once
    def owns(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")

    def session(self, request: web.Request) -> S:
        """The session the guard found for this request (routes that need one)."""
        session: S = request[self.session_key]
        return session

    def secure(self, request: web.Request) -> bool:
        return request.secure or self.secure_cookies

    def refuse(self, request: web.Request, status: int, reason: str, message: str,
               **headers: str) -> web.Response:
        return refuse(self.server.metrics, self.refused_metric, request, status, reason,
                      message, **headers)

    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Sessions, roles, CSRF and origin for every route under :attr:`prefix`."""
        metrics = self.server.metrics
        if request.match_info.http_exception is not None:
            exc = request.match_info.http_exception
            metrics.inc("http_requests_total", status=str(exc.status))
            return error(exc.status, exc.reason)
        level = route_access(request)
        if level is None:  # fail closed: a route that forgot to declare is nobody's
            log.error("%s route %s declares no access; refused", self.name, request.path)
            return self.refuse(request, 403, "undeclared", "this endpoint is not available")
        changes_state = request.method not in ("GET", "HEAD", "OPTIONS")
        if level != PUBLIC:
            session = self.find(request.cookies.get(self.session_cookie, ""))
            if session is None:
                if request.method == "GET" and request.path in (self.prefix, self.prefix + "/"):
                    raise web.HTTPFound(f"{self.prefix}/login")
                return self.refuse(request, 401, "no_session", "log in first")
            why = self.refusal(session, level)
            if why is not None:
                return self.refuse(request, 403, "role", why)
            forged = forgery_refusal(request, self.csrf(session), CSRF_HEADER, changes_state)
            if forged is not None:
                return self.refuse(request, 403, *forged)
            request[self.session_key] = session
        elif changes_state and not same_origin(request, required=False):
            return self.refuse(request, 403, "origin", "cross-origin request refused")
        if not self.count_http_errors:
            return await run_handler(metrics, request, handler)
        return await run_handler(
            metrics, request, handler,
            on_http_error=lambda status: metrics.inc(self.refused_metric,
                                                     reason=f"http_{status}"))

    def prelogin_token(self, request: web.Request,
                       render: Callable[[str], web.Response]) -> web.Response:
        """The login page, rendered with a fresh pre-login token set as a cookie."""
        token = secrets.token_urlsafe(32)
        response = render(token)
        response.set_cookie(self.prelogin_cookie, token, path=self.prefix, httponly=True,
                            samesite="Strict", secure=self.secure(request), max_age=3600)
        return response

    async def login(self, request: web.Request) -> web.Response:
        """``POST {prefix}/api/login {<login_field>, password}`` with the pre-login token."""
        metrics = self.server.metrics
        prelogin = request.cookies.get(self.prelogin_cookie, "")
        if not prelogin or not same_token(request.headers.get(CSRF_HEADER, ""), prelogin):
            return self.refuse(request, 403, "csrf",
                               "missing or wrong CSRF token: reload the login page")
        body = await json_body(request)
        name = str_field(body, self.login_field, 64).strip()
        password = str_field(body, "password", 1024)
        remote = request.remote or "?"
        check: Callable[[], Awaitable[W | None]] = lambda: self.verify(name, password)  # noqa: E731
        result = await self.limiter.attempt(remote, name, check)
        if result.retry_after > 0:
            metrics.inc(self.logins_metric, result="rate_limited")
            return login_refused(metrics, self.name, remote, name, result.retry_after)
        if result.delay > 0:
            metrics.inc("login_delayed_total", app=self.name)
        if result.value is None:
            metrics.inc(self.logins_metric, result="failed")
            self.login_failed(name, remote)
            return error(401, f"wrong {self.login_field} or password")
        token, session, shown = self.open(result.value)
        metrics.inc(self.logins_metric, result="ok")
        self.logged_in(result.value, remote)
        response = web.json_response({**shown, "csrf": self.csrf(session)})
        response.set_cookie(self.session_cookie, token, path=self.prefix, httponly=True,
                            samesite="Strict", secure=self.secure(request),
                            max_age=int(self.session_ttl_s))
        response.del_cookie(self.prelogin_cookie, path=self.prefix)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        self.close(request.cookies.get(self.session_cookie, ""), self.session(request),
                   request.remote or "")
        response = web.json_response({"ok": True})
        response.del_cookie(self.session_cookie, path=self.prefix)
        return response
