"""Console security: every endpoint wants a session and the right role, CSRF, Origin, login limits."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from protocol.messages import Event
from protocol.ulid import new_ulid
from provisioning import deployment as d
from server.app import CentralServer
from server.web.api import make_app
from server.web.auth import ROLE_PERMISSIONS, Accounts, LoginLimiter, UserError
from server.web.console import PUBLIC
from tests.console_helpers import PASSWORD, Console, add_users
from tests.helpers import ALARMPOST, db_rows
from tests.storage_helpers import sqlite_storage

PUBLIC_ROUTES = {("GET", "/console"), ("GET", "/console/login"), ("POST", "/console/api/login")}


def _console_routes(server: CentralServer) -> list[tuple[str, str, str]]:
    """(method, path template, permission) of every console route, from the real router."""
    app = make_app(server)
    out = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix", "")
        if not path.startswith("/console") or route.method == "HEAD":
            continue
        if isinstance(route.resource, web.StaticResource):
            continue
        permission = getattr(route.handler, "access", None)
        out.append((route.method, path, permission))
    return out


def _incident(server: CentralServer) -> str:
    now = time.time()
    (res,) = server.storage.incidents.commit_events([(Event(id=new_ulid(), post="P001", seq=1, ts=now), now)])
    return res.incident_id


async def test_every_console_route_declares_a_permission(server: CentralServer) -> None:
    routes = _console_routes(server)
    assert len(routes) >= 15
    for method, path, permission in routes:
        assert permission is not None, f"{method} {path} declares no permission"
        assert permission == PUBLIC or any(permission in p for p in ROLE_PERMISSIONS.values())
    assert {(m, p) for m, p, perm in routes if perm == PUBLIC} == PUBLIC_ROUTES


async def test_csrf_and_origin_are_enforced(server: CentralServer,
                                            deployment: d.Deployment) -> None:
    incident_id = _incident(server)
    add_users(server, ("alice", "operator"))
    path = f"/console/api/incidents/{incident_id}/acknowledge"
    async with Console(deployment) as alice:
        assert (await alice.login("alice")).status == 200
        assert (await alice.post(path, csrf=""))[0] == 403  # no token
        status, body = await alice.post(path, csrf="forged-token")
        assert status == 403 and "CSRF" in body["error"]
        assert (await alice.post(path, origin="http://evil.example"))[0] == 403
        for bad in ("forged", ""):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await alice.ws(csrf=bad)
            assert refused.value.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await alice.ws(origin="http://evil.example")
        assert server.storage.incidents.get(incident_id)["state"] == "new"  # nothing happened
        status, body = await alice.post(path)
        assert status == 200 and body["state"] == "acknowledged"
        assert body["acknowledged_by"] == "alice"
        ws = await alice.ws()
        assert (await ws.receive_json())["type"] == "hello"
        await ws.close()
    # The login form has its own (pre-session) token.
    async with aiohttp.ClientSession() as raw:
        async with raw.post(f"http://127.0.0.1:{deployment.http_port}/console/api/login",
                            json={"name": "alice", "password": PASSWORD}) as resp:
            assert resp.status == 403
    assert server.metrics.value("console_refused_total", reason="csrf") >= 3


async def test_login_logout_and_session_cookie(server: CentralServer,
                                               deployment: d.Deployment) -> None:
    add_users(server, ("bob", "supervisor"))
    async with Console(deployment) as bob:
        resp = await bob.login("bob")
        assert resp.status == 200
        cookie = resp.cookies["alarmpost_session"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/console"
        assert not cookie["secure"]  # plain HTTP here; HTTPS or [console] secure_cookies sets it
        status, me = await bob.get("/console/api/me")
        assert status == 200 and me["role"] == "supervisor" and "calls" in me["permissions"]
        assert me["ice_servers"] == []  # none configured: none used, never a public default
        status, page = await bob.get("/console/")
        assert status == 200 and bob.csrf in page
        assert (await bob.post("/console/api/logout"))[0] == 200
        assert (await bob.get("/console/api/me"))[0] == 401
    async with Console(deployment) as eve:
        assert (await eve.login("bob", "wrong password")).status == 401
        assert (await eve.login("nobody", PASSWORD)).status == 401
    # Only the token's hash is stored; the audit has the logins.
    rows = db_rows(deployment, "SELECT actor, action FROM console_audit ORDER BY id")
    assert ("bob", "login") in rows and ("bob", "logout") in rows and ("bob", "login_failed") in rows
    assert all(len(r[0]) == 64 for r in db_rows(deployment, "SELECT token_hash FROM console_sessions"))


async def test_login_is_rate_limited(server: CentralServer, deployment: d.Deployment) -> None:
    add_users(server, ("carol", "operator"))
    async with Console(deployment) as guesser:
        for _ in range(5):
            assert (await guesser.login("carol", "guess-guess")).status == 401
        resp = await guesser.login("carol")  # even the right password waits now
        assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    assert server.metrics.value("console_logins_total", result="rate_limited") == 1


def test_limiter_window_slides() -> None:
    limiter = LoginLimiter(attempts=2, window_s=10)
    limiter.failed(limiter.begin("1.2.3.4", "a", now=0), now=0)
    limiter.failed(limiter.begin("1.2.3.4", "b", now=1), now=1)
    refused = limiter.begin("1.2.3.4", "c", now=2)
    assert not refused.admitted and refused.retry_after == pytest.approx(8)  # by address
    other = limiter.begin("5.6.7.8", "a", now=2)
    assert other.admitted and other.delay == 0  # one failure on "a": no delay yet
    assert limiter.begin("1.2.3.4", "c", now=10.5).admitted


def test_accounts_reject_bad_input(tmp_path) -> None:
    storage = sqlite_storage(tmp_path / "a.db")
    accounts = Accounts(storage.accounts)
    with pytest.raises(UserError, match="role"):
        accounts.add_user("x", "god", PASSWORD)
    with pytest.raises(UserError, match="user name"):
        accounts.add_user("a/b", "operator", PASSWORD)
    with pytest.raises(UserError, match="password"):
        accounts.add_user("x", "operator", "short")
    accounts.add_user("x", "operator", PASSWORD)
    with pytest.raises(UserError, match="exists"):
        accounts.add_user("x", "admin", PASSWORD)
    stored = storage.db.value("SELECT password_hash FROM console_users")
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


def test_cli_creates_users_and_the_server_says_how(
    deployment: d.Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="alarmpost.console"):
        from server.config import load_server_config

        make_app(CentralServer(load_server_config(deployment.server_config)))
    assert "alarmpost server user add --config" in caplog.text
    cmd = [*ALARMPOST, "server", "user", "add", "--config", str(deployment.server_config),
           "dora", "--role", "operator", "--password-stdin"]
    done = subprocess.run(cmd, input=f"{PASSWORD}\n", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    again = subprocess.run(cmd, input=f"{PASSWORD}\n", capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = subprocess.run([*cmd[:-4], "eve", "--role", "operator", "--password-stdin"],
                         input="short\n", capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "password" in bad.stderr and "Traceback" not in bad.stderr
    assert db_rows(deployment, "SELECT name, role FROM console_users") == [("dora", "operator")]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "console.crt", directory / "console.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_over_https_the_session_cookie_is_secure(deployment: d.Deployment,
                                                       tmp_path: Path) -> None:
    import re

    from tests.helpers import run_server

    cert, key = _self_signed(tmp_path)
    with deployment.server_config.open("a") as fh:
        fh.write(f'\n[console]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n')
    base = f"https://127.0.0.1:{deployment.http_port}"
    async with run_server(deployment) as server, aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), connector=aiohttp.TCPConnector(ssl=False)
    ) as http:
        add_users(server, ("alice", "operator"))
        async with http.get(f"{base}/console/login") as resp:
            token = re.search(r'name="csrf" content="([^"]+)"', await resp.text())
            assert token and resp.cookies["alarmpost_prelogin"]["secure"]
        async with http.post(f"{base}/console/api/login",
                             json={"name": "alice", "password": PASSWORD},
                             headers={"X-CSRF-Token": token.group(1), "Origin": base}) as resp:
            assert resp.status == 200
            cookie = resp.cookies["alarmpost_session"]
            assert cookie["secure"] and cookie["httponly"] and cookie["samesite"] == "Strict"
        async with http.get(f"{base}/console/api/me") as resp:
            assert resp.status == 200  # the Secure cookie goes back over HTTPS


async def test_origin_is_required_on_websockets_and_checked_when_sent(
    server: CentralServer, deployment: d.Deployment
) -> None:
    """A WebSocket must name our origin (browsers always send it); a state-changing request
    without Origin (a script with the session's cookie and CSRF token) passes, one with a
    foreign or malformed Origin does not. Each refusal is counted by its reason."""
    incident_id = _incident(server)
    add_users(server, ("alice", "operator"))
    base = f"http://127.0.0.1:{deployment.http_port}"
    async with Console(deployment) as alice:
        assert (await alice.login("alice")).status == 200
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await alice.http.ws_connect(f"{base}/console/ws?csrf={alice.csrf}")  # no Origin
        assert refused.value.status == 403
        assert server.metrics.value("console_refused_total", reason="origin") == 1
        path = f"/console/api/incidents/{incident_id}/acknowledge"
        for bad in ("http://[::1", "null", "http://127.0.0.1.evil.example"):
            assert (await alice.post(path, origin=bad))[0] == 403, bad
        assert server.metrics.value("console_refused_total", reason="origin") == 4
        async with alice.http.post(f"{base}{path}", json={},
                                   headers={"X-CSRF-Token": alice.csrf}) as resp:  # no Origin
            assert resp.status == 200
        assert server.metrics.value("console_refused_total", reason="csrf") == 0
