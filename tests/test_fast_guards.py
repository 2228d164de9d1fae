"""The web guards in milliseconds: same origin, CSRF, secrets, sessions, login limits.

The functions every console and patrol-app request passes through, called the way the web layer
calls them: requests built by aiohttp's own test utilities, sessions in a real SQLite file,
the login limiter on an explicit clock. The routes themselves (which guard each one uses) are
checked against an explicit table in tests/test_route_permissions.py; these tests fail within
milliseconds when a guard's own logic is broken, which is what ``alarmpost bench mutation``
needs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from server.config import DatabaseSection
from server.storage import Storage, open_storage
from server.web.auth import (
    CSRF_HEADER,
    ROLE_PERMISSIONS,
    Accounts,
    LoginLimiter,
    LoginResult,
    LoginTicket,
    User,
)
from server.web.http import forgery_refusal, same_origin, same_secret

HOST = "console.example:8443"


def _request(method: str = "POST", path: str = "/api/x", **headers: str):  # type: ignore[no-untyped-def]
    return make_mocked_request(method, path, headers=CIMultiDict({"Host": HOST, **headers}))


# ---------------------------------------------------------------------------- secrets, origin
def test_same_secret_is_true_only_for_the_same_non_empty_text() -> None:
    assert same_secret("s3cret-token", "s3cret-token") is True
    assert same_secret("s3cret-token", "s3cret-tokeN") is False
    assert same_secret("s3cret", "s3cret-token") is False
    assert same_secret("", "") is False  # no token is never a match, not even for no secret
    assert same_secret("", "s3cret") is False
    # A header that was not UTF-8 arrives with surrogate escapes: unequal, never an exception.
    assert same_secret("tok\udcff", "token") is False
    assert same_secret("tok\udcff", "tok\udcff") is True
    assert same_secret("jeton-é", "jeton-é") is True


def test_same_origin_compares_the_origin_with_the_host() -> None:
    assert same_origin(_request(Origin=f"https://{HOST}"), required=True) is True
    assert same_origin(_request(Origin=f"http://{HOST}"), required=False) is True
    assert same_origin(_request(Origin="https://evil.example:8443"), required=False) is False
    assert same_origin(_request(Origin="https://console.example"), required=True) is False
    assert same_origin(_request(Origin="http://[::1"), required=False) is False
    assert same_origin(_request(Origin="null"), required=False) is False
    # No Origin at all: a same-origin request of an older browser, or a script; only a
    # WebSocket (which always has one from a browser) must have it.
    assert same_origin(_request(), required=False) is True
    assert same_origin(_request(), required=True) is False


# ------------------------------------------------------------------------------------ CSRF
CSRF = "the-sessions-csrf-token"


def test_reads_need_neither_origin_nor_token() -> None:
    request = _request("GET", Origin="https://evil.example")
    assert forgery_refusal(request, CSRF, CSRF_HEADER, changes_state=False) is None


def test_a_state_change_needs_our_origin_and_the_sessions_token() -> None:
    ok = {"Origin": f"https://{HOST}", CSRF_HEADER: CSRF}
    assert forgery_refusal(_request(**ok), CSRF, CSRF_HEADER, changes_state=True) is None
    no_origin = {CSRF_HEADER: CSRF}  # a script: no Origin, but it knows the token
    assert forgery_refusal(_request(**no_origin), CSRF, CSRF_HEADER, changes_state=True) is None
    cross = {"Origin": "https://evil.example", CSRF_HEADER: CSRF}
    assert forgery_refusal(_request(**cross), CSRF, CSRF_HEADER, changes_state=True) == (
        "origin", "cross-origin request refused")
    wrong = {"Origin": f"https://{HOST}", CSRF_HEADER: "guessed"}
    assert forgery_refusal(_request(**wrong), CSRF, CSRF_HEADER, changes_state=True) == (
        "csrf", "missing or wrong CSRF token")
    missing = {"Origin": f"https://{HOST}"}
    assert forgery_refusal(_request(**missing), CSRF, CSRF_HEADER, changes_state=True) == (
        "csrf", "missing or wrong CSRF token")
    other_header = {"Origin": f"https://{HOST}", "X-Other": CSRF}
    assert forgery_refusal(_request(**other_header), CSRF, "X-Other", changes_state=True) is None
    assert forgery_refusal(_request(**other_header), CSRF, CSRF_HEADER,
                           changes_state=True) is not None


def test_a_websocket_needs_our_origin_and_the_token_in_its_query() -> None:
    def ws(path: str, **headers: str):  # type: ignore[no-untyped-def]
        return _request("GET", path, Upgrade="WebSocket", Connection="Upgrade", **headers)

    origin = {"Origin": f"https://{HOST}"}
    assert forgery_refusal(ws(f"/ws?csrf={CSRF}", **origin), CSRF, CSRF_HEADER,
                           changes_state=False) is None
    assert forgery_refusal(ws(f"/ws?csrf={CSRF}"), CSRF, CSRF_HEADER,
                           changes_state=False) == ("origin", "cross-origin request refused")
    assert forgery_refusal(ws("/ws?csrf=guessed", **origin), CSRF, CSRF_HEADER,
                           changes_state=False) == ("csrf", "missing or wrong CSRF token")
    # A header is no use to a WebSocket: browsers cannot set one on it.
    assert forgery_refusal(ws("/ws", **origin, **{CSRF_HEADER: CSRF}), CSRF, CSRF_HEADER,
                           changes_state=False) == ("csrf", "missing or wrong CSRF token")


# --------------------------------------------------------------------------- roles, sessions
def test_each_role_may_exactly_what_its_row_says() -> None:
    assert User("ann", "operator").may("incidents.handle") is True
    assert User("ann", "operator").may("users.manage") is False
    assert User("ann", "admin").may("users.manage") is True
    assert User("ann", "technician").may("incidents.view") is False
    assert User("ann", "retired").may("console") is False  # an unknown role may nothing
    for role, allowed in ROLE_PERMISSIONS.items():
        assert User("x", role).permissions == allowed


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    store = open_storage(DatabaseSection(backend="sqlite", path=str(tmp_path / "server.db")))
    yield store
    store.close()


def test_a_session_opens_for_its_token_only_and_ends_at_its_expiry(storage: Storage) -> None:
    accounts = Accounts(storage.accounts, session_ttl_s=100.0)
    accounts.add_user_hashed("ann", "operator", "$argon2id$not-checked-here")
    user = accounts.user("ann")
    assert user is not None
    token, session = accounts.create_session(user, now=1000.0)
    assert session.expires_at == 1100.0 and session.user == User("ann", "operator")
    assert len(token) >= 40 and len(session.csrf) >= 40 and token != session.csrf
    found = accounts.session(token, now=1099.0)
    assert found is not None
    assert (found.user, found.csrf, found.expires_at) == (user, session.csrf, 1100.0)
    assert accounts.session(token, now=1100.5) is None  # expired
    assert accounts.session(token[:-1], now=1000.0) is None
    assert accounts.session("", now=1000.0) is None
    assert accounts.session(token + "é", now=1000.0) is None  # not ASCII: never looked up
    assert accounts.session("a" * 129, now=1000.0) is None
    other, _ = accounts.create_session(user, now=1000.0)
    assert other != token  # every login gets a token of its own
    accounts.end_session(token)
    assert accounts.session(token, now=1000.0) is None
    assert accounts.session(other, now=1000.0) is not None


def test_a_session_is_read_with_the_role_the_user_has_now(storage: Storage) -> None:
    accounts = Accounts(storage.accounts)
    accounts.add_user_hashed("bob", "admin", "$argon2id$x")
    accounts.add_user_hashed("root", "admin", "$argon2id$x")
    bob = accounts.user("bob")
    assert bob is not None
    token, _ = accounts.create_session(bob)
    accounts.set_role("bob", "operator", actor="root")
    session = accounts.session(token)
    assert session is not None and session.user.role == "operator"


# ------------------------------------------------------------------------------ login limits
def test_an_address_gets_its_attempts_then_waits_for_the_oldest_failure_to_age_out() -> None:
    limiter = LoginLimiter(attempts=3, window_s=60.0, delay_s=0.5, free=10)
    for at in (0.0, 1.0, 2.0):
        ticket = limiter.begin("10.0.0.9", f"user{at}", now=at)
        assert ticket.admitted and ticket.delay == 0.0
        limiter.failed(ticket, now=at)
    refused = limiter.begin("10.0.0.9", "ann", now=10.0)
    assert not refused.admitted and refused.retry_after == 50.0  # the first failure + 60 s
    assert refused.open is False
    assert limiter.begin("10.0.0.8", "ann", now=10.0).admitted  # another address is not held
    again = limiter.begin("10.0.0.9", "ann", now=60.0)  # the first failure has aged out
    assert again.admitted


def test_attempts_under_way_count_before_their_check() -> None:
    limiter = LoginLimiter(attempts=2, window_s=60.0, free=10)
    first = limiter.begin("10.0.0.9", "ann", now=0.0)
    second = limiter.begin("10.0.0.9", "ann", now=0.0)
    assert first.admitted and second.admitted
    third = limiter.begin("10.0.0.9", "ann", now=0.0)
    assert not third.admitted and third.retry_after == 60.0  # none has failed yet: the window
    limiter.succeeded(first, now=1.0)  # a success gives its place back
    assert limiter.begin("10.0.0.9", "ann", now=1.0).admitted
    limiter.failed(second, now=2.0)
    limiter.failed(second, now=2.0)  # reported twice: counted once
    refused = limiter.begin("10.0.0.9", "ann", now=3.0)  # one failure, one under way
    assert not refused.admitted and refused.retry_after == 59.0  # that failure + 60 s


def test_a_guessed_name_is_slowed_down_doubling_to_a_ceiling_never_locked() -> None:
    limiter = LoginLimiter(attempts=1000, window_s=60.0, delay_s=0.5, max_delay_s=4.0, free=2)
    delays = []
    for n in range(7):
        ticket = limiter.begin(f"10.0.0.{n}", " Ann ", now=float(n))
        delays.append(ticket.delay)
        limiter.failed(ticket, now=float(n))
    assert delays == [0.0, 0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert limiter.begin("10.0.1.1", "bob", now=7.0).delay == 0.0  # other names are free
    right = limiter.begin("10.0.1.2", "ANN", now=8.0)
    assert right.admitted and right.delay == 4.0
    limiter.succeeded(right, now=8.0)  # the operator is in: the name is cleared
    assert limiter.begin("10.0.1.3", "ann", now=9.0).delay == 0.0


async def test_attempt_checks_after_the_delay_and_records_the_outcome() -> None:
    limiter = LoginLimiter(attempts=2, window_s=60.0, delay_s=0.01, max_delay_s=0.01, free=1)
    calls: list[str] = []

    async def wrong() -> str | None:
        calls.append("wrong")
        return None

    async def right() -> str | None:
        calls.append("right")
        return "ann"

    first = await limiter.attempt("10.0.0.9", "ann", wrong)
    assert (first.value, first.retry_after, first.delay) == (None, 0.0, 0.0)
    second = await limiter.attempt("10.0.0.9", "ann", right)
    assert (second.value, second.delay) == ("ann", 0.01)  # one failure on the name: slowed
    third = await limiter.attempt("10.0.0.9", "ann", right)
    assert third.value == "ann"
    fourth = await limiter.attempt("10.0.0.9", "ann", wrong)
    assert fourth.value is None
    refused = await limiter.attempt("10.0.0.9", "ann", right)
    assert refused.value is None and refused.retry_after > 0
    assert calls == ["wrong", "right", "right", "wrong"]  # refused: never checked

    async def gone() -> str | None:
        raise asyncio.CancelledError  # the client went away during the check

    other = LoginLimiter(attempts=1, window_s=60.0, free=10)
    with pytest.raises(asyncio.CancelledError):
        await other.attempt("10.0.0.7", "ann", gone)
    assert (await other.attempt("10.0.0.7", "ann", right)).retry_after > 0  # counted as failed


def test_only_tokens_within_the_bound_are_looked_up(storage: Storage) -> None:
    accounts = Accounts(storage.accounts)
    looked_up: list[str] = []
    lookup = storage.accounts.session

    def recording(digest: str) -> Any:
        looked_up.append(digest)
        return lookup(digest)

    accounts.store.session = recording  # type: ignore[method-assign]
    # Empty, over-long, not ASCII (a lone surrogate cannot even be hashed): refused unread.
    for token in ("", "a" * 129, "jeton-é", "\ud800", "tok\udcff"):
        assert accounts.session(token) is None
    assert looked_up == []
    for token in ("a" * 128, "b"):  # within the bound: looked up (and unknown)
        assert accounts.session(token) is None
    assert len(looked_up) == 2


def test_a_refused_ticket_names_the_attempt_and_waits_at_least_a_second() -> None:
    limiter = LoginLimiter(attempts=1, window_s=60.0, free=10)
    limiter.failed(limiter.begin("10.0.0.9", "ann", now=0.0), now=0.0)
    refused = limiter.begin("10.0.0.9", "bob", now=59.5)  # that failure ages out in 0.5 s
    assert refused == LoginTicket("10.0.0.9", "bob", admitted=False, retry_after=1.0, open=False)
    assert refused.admitted is False


async def test_attempt_refuses_per_address_without_a_check_or_a_delay() -> None:
    limiter = LoginLimiter(attempts=1, window_s=60.0, free=10)
    checked: list[str] = []

    async def wrong() -> str | None:
        checked.append("wrong")
        return None

    assert await limiter.attempt("10.0.0.9", "ann", wrong) == LoginResult(None, 0.0, 0.0)
    refused = await limiter.attempt("10.0.0.9", "ann", wrong)
    assert refused == LoginResult(None, refused.retry_after, 0.0) and refused.retry_after > 0
    assert isinstance(refused.delay, float) and checked == ["wrong"]
    other = await limiter.attempt("10.0.0.8", "ann", wrong)  # another address: limits of its own
    assert other.retry_after == 0.0 and checked == ["wrong", "wrong"]


async def test_a_delay_under_a_second_is_waited_before_the_check() -> None:
    limiter = LoginLimiter(attempts=100, window_s=60.0, delay_s=0.05, max_delay_s=0.05, free=0)
    checked_at: list[float] = []

    async def check() -> str | None:
        checked_at.append(time.monotonic())
        return None

    started = time.monotonic()
    result = await limiter.attempt("10.0.0.9", "ann", check)
    assert result.delay == 0.05
    assert checked_at[0] - started >= 0.05
