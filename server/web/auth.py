"""People on the console: accounts, password hashing, sessions, CSRF, roles, login rate limit.

Machines use the API token (``Authorization: Bearer``, :mod:`server.web.api`); people use sessions.

* Passwords are hashed with argon2id (argon2-cffi defaults, RFC 9106 low-memory profile). Hashing
  and verifying take ~0.1 s of CPU and run in a worker thread, never on the alarm path's loop.
* A session is a random 256-bit token in an ``HttpOnly; SameSite=Strict`` cookie (``Secure`` when
  the console is served over HTTPS). The database keeps only its SHA-256, so a copy of the
  database cannot be replayed as a login.
* CSRF: every state-changing request carries ``X-CSRF-Token`` equal to the session's token
  (synchronizer pattern); the login form, which has no session yet, uses a double-submit cookie.
  The ``Origin`` header, when present, must name this server (and always for WebSockets).
* Roles grant permissions (:data:`ROLE_PERMISSIONS`); every console endpoint declares the one it
  needs, and a test walks the router to prove none is missing.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import re
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import argon2
from aiohttp import web

from server.storage import AccountStore
from server.web.host import ServerHost
from server.web.http import same_secret

if TYPE_CHECKING:
    from server.metrics import Metrics

log = logging.getLogger("alarmpost.console.auth")

ROLES: Final = ("operator", "supervisor", "technician", "admin")

ROLE_PERMISSIONS: Final[dict[str, frozenset[str]]] = {
    # handles alarms: the queue, incidents, calls, siren/reset commands
    "operator": frozenset({"console", "incidents.view", "incidents.handle", "posts.view",
                           "posts.command", "calls"}),
    # an operator who also sees the audit of the console itself
    "supervisor": frozenset({"console", "incidents.view", "incidents.handle", "posts.view",
                             "posts.command", "calls", "audit.view"}),
    # commissioning: posts, their commands, camera and test mode; never incidents
    "technician": frozenset({"console", "posts.view", "posts.command", "posts.test_mode"}),
    # accounts and the audit; reads incidents, does not handle them; may set test mode
    "admin": frozenset({"console", "incidents.view", "posts.view", "posts.test_mode",
                        "users.manage", "audit.view"}),
}
PERMISSIONS: Final = frozenset().union(*ROLE_PERMISSIONS.values())

SESSION_COOKIE: Final = "alarmpost_session"
PRELOGIN_COOKIE: Final = "alarmpost_prelogin"
CSRF_HEADER: Final = "X-CSRF-Token"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD: Final = 8
MAX_PASSWORD: Final = 1024



T = TypeVar("T")


class UserError(ValueError):
    """A bad account name, role or password; the message says what to change."""


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def permissions(self) -> frozenset[str]:
        return ROLE_PERMISSIONS.get(self.role, frozenset())

    def may(self, permission: str) -> bool:
        assert permission in PERMISSIONS, permission
        return permission in self.permissions


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str
    expires_at: float


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


token_digest = _digest  # what a sessions table stores instead of the token (patrol app too)

_HASHER: Final = argon2.PasswordHasher()
_dummy_hash: str | None = None
# Password checks under way at once (each ~0.1 s of a core): a flood of logins queues here
# instead of taking every core from the alarm path.
CHECK_SLOTS: Final = 2
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary())


def _check_slots() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    slots = _slots.get(loop)
    if slots is None:
        slots = _slots[loop] = asyncio.Semaphore(CHECK_SLOTS)
    return slots


def hash_password(password: str) -> str:
    """argon2id hash of an acceptable password (blocking, ~0.1 s); raise :class:`UserError`.
    Console accounts and patrol teams' app logins (``server.web.patrol``) both use it."""
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise UserError(f"the password must have {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return str(_HASHER.hash(password))


async def verify_password(stored: str | None, password: str) -> bool:
    """Check ``password`` against an argon2 hash in a worker thread. ``stored=None`` (no such
    account) costs the same as a wrong password (no enumeration by timing) and is False."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = await asyncio.to_thread(_HASHER.hash, secrets.token_hex(16))
    target = stored if stored is not None else _dummy_hash

    def check() -> bool:
        try:
            return bool(_HASHER.verify(target, password))
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False

    async with _check_slots():
        return await asyncio.to_thread(check) and stored is not None


class Accounts:
    """Console users, their sessions and the console audit log (:class:`AccountStore`)."""

    def __init__(self, store: AccountStore, session_ttl_s: float = 12 * 3600) -> None:
        self.store = store
        self.session_ttl_s = session_ttl_s
        self.hasher = _HASHER

    # ------------------------------------------------------------------ users
    def hash_password(self, password: str) -> str:
        """argon2id hash of an acceptable password (blocking, ~0.1 s); raise :class:`UserError`."""
        return hash_password(password)

    def add_user(self, name: str, role: str, password: str, actor: str = "cli") -> User:
        return self.add_user_hashed(name, role, self.hash_password(password), actor)

    def add_user_hashed(self, name: str, role: str, password_hash: str,
                        actor: str = "cli") -> User:
        if not _NAME_RE.match(name):
            raise UserError(
                f"invalid user name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-'"
            )
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}; one of: {', '.join(ROLES)}")
        if not self.store.add_user(name, role, password_hash):
            raise UserError(f"user {name!r} already exists")
        self.audit(actor, "user_added", name, f"role {role}")
        return User(name, role)

    def user(self, name: str) -> User | None:
        row = self.store.user(name)
        return User(row["name"], row["role"]) if row and not row["disabled"] else None

    def exists(self, name: str) -> bool:
        return self.store.user(name) is not None

    def users(self) -> list[dict[str, Any]]:
        return self.store.users()

    def count(self) -> int:
        return self.store.count()

    def _account(self, name: str) -> tuple[str, bool]:
        row = self.store.user(name)
        if row is None:
            raise LookupError(f"no user {name!r}")
        return row["role"], bool(row["disabled"])

    def _keeps_an_admin(self, name: str) -> None:
        """Refuse a change that would leave no enabled admin (nobody could manage accounts)."""
        if not self.store.enabled_admins_besides(name):
            raise UserError(f"{name} is the last enabled admin: make another admin first")

    def set_role(self, name: str, role: str, actor: str, remote: str = "") -> None:
        """Change a user's role; it applies to their open sessions at once."""
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}; one of: {', '.join(ROLES)}")
        old, disabled = self._account(name)
        if old == role:
            return
        if old == "admin" and not disabled:
            self._keeps_an_admin(name)
        self.store.set_role(name, role)
        self.audit(actor, "user_role", name, f"{old} -> {role}", remote)

    def set_disabled(self, name: str, disabled: bool, actor: str, remote: str = "") -> None:
        """Disable (ends every session: it can no longer log in) or enable a user."""
        role, was = self._account(name)
        if was == disabled:
            return
        if disabled and role == "admin":
            self._keeps_an_admin(name)
        self.store.set_disabled(name, disabled)
        self.audit(actor, "user_disabled" if disabled else "user_enabled", name, "", remote)

    def set_password_hashed(self, name: str, password_hash: str, actor: str,
                            remote: str = "") -> None:
        """Reset a password (hash it with :func:`hash_password`); ends the user's sessions."""
        self._account(name)
        self.store.set_password_hash(name, password_hash)
        self.audit(actor, "user_password_reset", name, "", remote)

    # ------------------------------------------------------------------ sessions
    def create_session(self, user: User, now: float | None = None) -> tuple[str, Session]:
        now = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), now + self.session_ttl_s)
        self.store.add_session(_digest(token), user.name, session.csrf, now, session.expires_at)
        return token, session

    def session(self, token: str, now: float | None = None) -> Session | None:
        if not token or len(token) > 128 or not token.isascii():
            return None
        now = time.time() if now is None else now
        row = self.store.session(_digest(token))
        if row is None or row["expires_at"] < now:
            return None
        return Session(User(row["name"], row["role"]), row["csrf"], row["expires_at"])

    def end_session(self, token: str) -> None:
        self.store.end_session(_digest(token))

    # ------------------------------------------------------------------ audit
    def audit(self, actor: str, action: str, target: str = "", detail: str = "",
              remote: str = "") -> None:
        self.store.audit(actor, action, target, detail, remote)

    def audit_log(self, limit: int) -> list[dict[str, Any]]:
        return self.store.audit_log(limit)

    async def verify_async(self, name: str, password: str) -> User | None:
        """The user if the password is right; the hash check runs in a worker thread. An
        unknown name costs the same as a wrong password (no user enumeration by timing)."""
        # The database is read here (its connection stays on this thread), verified in a thread.
        row = self.store.user(name) if _NAME_RE.fullmatch(name) else None
        if row is not None and row["disabled"]:
            row = None
        ok = await verify_password(row["password_hash"] if row else None, password)
        return User(row["name"], row["role"]) if (ok and row) else None


@dataclass
class LoginTicket:
    """One login attempt, taken from :meth:`LoginLimiter.begin` before the password is checked.

    ``admitted`` False: refuse it (429), ``retry_after`` seconds from now. Admitted: wait
    ``delay`` seconds (the name is being guessed at), check the password, then report the
    outcome with :meth:`LoginLimiter.failed` or :meth:`LoginLimiter.succeeded`."""

    remote: str
    name: str
    admitted: bool
    retry_after: float = 0.0
    delay: float = 0.0
    open: bool = True


class _Recent:
    """Failures within the window, plus attempts under way (counted before they are checked)."""

    __slots__ = ("failures", "pending")

    def __init__(self) -> None:
        self.failures: collections.deque[float] = collections.deque()
        self.pending = 0

    def slide(self, now: float, window_s: float) -> int:
        while self.failures and self.failures[0] <= now - window_s:
            self.failures.popleft()
        return len(self.failures) + self.pending


class LoginLimiter:
    """The one login limit of the console and the patrol app.

    * Counted before the check: :meth:`begin` takes the attempt's place synchronously (no await
      between reading the count and taking the place), so any number of concurrent attempts
      see each other; a slow password hash cannot let a burst through.
    * Per remote address, refusing: at most ``attempts`` failed or unfinished logins within
      ``window_s``; past that, 429 with Retry-After. A success gives its place back (an office
      behind one address can log in all its operators), failures keep theirs for the window.
    * Per name, slowing down, never locking: once a name has ``free`` recent failures (or
      attempts under way), each attempt at it waits ``delay_s``, doubling, at most
      ``max_delay_s``, before its password is checked. A stranger who knows an operator's name
      cannot keep the operator out: the operator, from another address, with the right password,
      is in after at most ``max_delay_s``. A success clears the name.
    * Bounded memory: at most ``max_keys`` addresses and ``max_keys`` names are remembered; past
      that the oldest idle ones are forgotten first.
    """

    def __init__(self, attempts: int = 5, window_s: float = 60.0, delay_s: float = 0.5,
                 max_delay_s: float = 8.0, free: int = 3, max_keys: int = 10_000) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self.delay_s = delay_s
        self.max_delay_s = max_delay_s
        self.free = free
        self.max_keys = max_keys
        self._addresses: dict[str, _Recent] = {}
        self._names: dict[str, _Recent] = {}

    @staticmethod
    def _name_key(name: str) -> str:
        return name.strip().lower()[:128]

    def _entry(self, table: dict[str, _Recent], key: str, now: float) -> _Recent:
        entry = table.get(key)
        if entry is None:
            if len(table) >= self.max_keys:
                self._prune(table, now)
            entry = table[key] = _Recent()
        return entry

    def _prune(self, table: dict[str, _Recent], now: float) -> None:
        for key in [k for k, e in table.items() if not e.slide(now, self.window_s)]:
            del table[key]
        if len(table) >= self.max_keys:  # still full: forget the oldest idle entries
            idle = [k for k, e in table.items() if not e.pending]
            for key in idle[: len(table) - self.max_keys * 3 // 4]:
                del table[key]

    def begin(self, remote: str, name: str, now: float | None = None) -> LoginTicket:
        now = time.monotonic() if now is None else now
        address = self._entry(self._addresses, remote, now)
        used = address.slide(now, self.window_s)
        if used >= self.attempts:
            # The wait until enough failures age out, assuming the attempts under way fail.
            needed = used - self.attempts + 1
            if needed <= len(address.failures):
                wait = address.failures[needed - 1] + self.window_s - now
            else:
                wait = self.window_s
            return LoginTicket(remote, name, admitted=False, retry_after=max(wait, 1.0),
                               open=False)
        named = self._entry(self._names, self._name_key(name), now)
        seen = named.slide(now, self.window_s)
        delay = 0.0
        if seen >= self.free:
            delay = min(self.max_delay_s, self.delay_s * 2 ** min(seen - self.free, 30))
        address.pending += 1
        named.pending += 1
        return LoginTicket(remote, name, admitted=True, delay=delay)

    def _finish(self, ticket: LoginTicket) -> tuple[_Recent | None, _Recent | None]:
        if not ticket.open:
            return None, None
        ticket.open = False
        address = self._addresses.get(ticket.remote)
        named = self._names.get(self._name_key(ticket.name))
        for entry in (address, named):
            if entry is not None and entry.pending > 0:
                entry.pending -= 1
        return address, named

    def failed(self, ticket: LoginTicket, now: float | None = None) -> None:
        """A wrong password (or an attempt abandoned on the way): it counts for the window."""
        now = time.monotonic() if now is None else now
        address, named = self._finish(ticket)
        for entry in (address, named):
            if entry is not None:
                entry.failures.append(now)

    def succeeded(self, ticket: LoginTicket, now: float | None = None) -> None:
        """The right password: the address's place is given back, the name's failures cleared."""
        _, named = self._finish(ticket)
        if named is not None:
            named.failures.clear()

    def size(self) -> int:
        """Addresses and names remembered (bounded by ``2 * max_keys``)."""
        return len(self._addresses) + len(self._names)

    async def attempt(self, remote: str, name: str,
                      check: Callable[[], Awaitable[T | None]]) -> LoginResult[T]:
        """Take the attempt's place, wait the name's delay, run ``check`` (None: wrong
        password), record the outcome. An attempt abandoned on the way (the client went away
        during the delay) counts as failed."""
        ticket = self.begin(remote, name)
        if not ticket.admitted:
            return LoginResult(None, ticket.retry_after, 0.0)
        try:
            if ticket.delay > 0:
                await asyncio.sleep(ticket.delay)
            value = await check()
        except BaseException:
            self.failed(ticket)
            raise
        if value is None:
            self.failed(ticket)
        else:
            self.succeeded(ticket)
        return LoginResult(value, 0.0, ticket.delay)


@dataclass(frozen=True)
class LoginResult(Generic[T]):
    """What :meth:`LoginLimiter.attempt` found: ``retry_after`` > 0, refused without a check;
    else ``value`` (None: wrong name or password), after waiting ``delay`` seconds."""

    value: T | None
    retry_after: float
    delay: float


def login_limiter(server: ServerHost) -> LoginLimiter:
    """The login limit of one app (console, patrol app) from the [console] settings."""
    cfg = server.config.console
    return LoginLimiter(cfg.login_attempts, cfg.login_window_s, cfg.login_delay_s,
                        cfg.login_max_delay_s)


def login_refused(metrics: Metrics, app: str, remote: str, name: str,
                  retry_after: float) -> web.Response:
    """429 for a login refused unchecked: too many failed or unfinished logins from ``remote``."""
    metrics.inc("login_refused_total", app=app, reason="address")
    seconds = str(int(retry_after) + 1)
    log.warning("%s login of %r from %s refused: too many attempts from there (%s s)", app,
                name[:64], remote, seconds)
    return web.json_response({"error": f"too many failed logins; try again in {seconds} s"},
                             status=429, headers={"Retry-After": seconds})


def same_token(given: str, expected: str) -> bool:
    return same_secret(given, expected)
