"""Who may call which web route: an explicit table, written here and not read from the code.

One row per route; the roles that may call it. Every other role must get 403 and anonymous
callers 401 (or the login page). The table must name every route the server has, so a new route
cannot go untested; the expectations come only from this table.
"""

from __future__ import annotations

import time

import aiohttp
import pytest
from aiohttp import web

from protocol.messages import Event
from protocol.ulid import new_ulid
from provisioning import deployment as d
from server.app import CentralServer
from server.web.api import make_app
from tests.console_helpers import Console, add_users
from tests.patrol_helpers import TeamSpec, add_teams
from tests.patrol_web_helpers import Phone, give_app_passwords

OPERATOR, SUPERVISOR, TECHNICIAN, ADMIN = "operator", "supervisor", "technician", "admin"
EVERYONE = frozenset({OPERATOR, SUPERVISOR, TECHNICIAN, ADMIN})
PUBLIC = "public"

# (method, path): the console roles that may call it, or PUBLIC.
CONSOLE_ROUTES: dict[tuple[str, str], frozenset[str] | str] = {
    ("GET", "/console"): PUBLIC,
    ("GET", "/console/login"): PUBLIC,
    ("POST", "/console/api/login"): PUBLIC,
    ("GET", "/console/"): EVERYONE,
    ("POST", "/console/api/logout"): EVERYONE,
    ("GET", "/console/api/me"): EVERYONE,
    ("GET", "/console/ws"): EVERYONE,
    ("GET", "/console/api/incidents"): frozenset({OPERATOR, SUPERVISOR, ADMIN}),
    ("GET", "/console/api/incidents/{incident_id}"): frozenset({OPERATOR, SUPERVISOR, ADMIN}),
    ("POST", "/console/api/incidents/{incident_id}/acknowledge"): frozenset({OPERATOR, SUPERVISOR}),
    ("POST", "/console/api/incidents/{incident_id}/resolve"): frozenset({OPERATOR, SUPERVISOR}),
    ("POST", "/console/api/incidents/{incident_id}/page"): frozenset({OPERATOR, SUPERVISOR}),
    ("POST", "/console/api/incidents/{incident_id}/pages/{page_id}/cancel"):
        frozenset({OPERATOR, SUPERVISOR}),
    ("POST", "/console/api/incidents/{incident_id}/redispatch"): frozenset({OPERATOR, SUPERVISOR}),
    ("GET", "/console/api/teams"): frozenset({OPERATOR, SUPERVISOR, ADMIN}),
    ("GET", "/console/api/posts"): EVERYONE,
    ("GET", "/console/api/commands"): EVERYONE,
    ("POST", "/console/api/posts/{post_id}/command"): frozenset({OPERATOR, SUPERVISOR, TECHNICIAN}),
    ("POST", "/console/api/posts/{post_id}/test_mode"): frozenset({TECHNICIAN, ADMIN}),
    ("GET", "/console/api/users"): frozenset({ADMIN}),
    ("POST", "/console/api/users"): frozenset({ADMIN}),
    ("POST", "/console/api/users/{name}/role"): frozenset({ADMIN}),
    ("POST", "/console/api/users/{name}/disabled"): frozenset({ADMIN}),
    ("POST", "/console/api/users/{name}/password"): frozenset({ADMIN}),
    ("GET", "/console/api/audit"): frozenset({SUPERVISOR, ADMIN}),
}

# (method, path): PUBLIC, or "team" (a logged-in patrol team).
PATROL_ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/patrol"): PUBLIC,
    ("GET", "/patrol/login"): PUBLIC,
    ("POST", "/patrol/api/login"): PUBLIC,
    ("GET", "/patrol/"): "team",
    ("POST", "/patrol/api/logout"): "team",
    ("GET", "/patrol/api/state"): "team",
    ("POST", "/patrol/api/answer"): "team",
    ("POST", "/patrol/api/status"): "team",
    ("POST", "/patrol/api/position"): "team",
    ("GET", "/patrol/ws"): "team",
}


def _router_routes(server: CentralServer, prefix: str) -> set[tuple[str, str]]:
    out = set()
    for route in make_app(server).router.routes():
        if route.method == "HEAD" or isinstance(route.resource, web.StaticResource):
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or ""
        if path == prefix or path.startswith(prefix + "/"):
            out.add((route.method, path))
    return out


def test_the_tables_name_every_route(server: CentralServer) -> None:
    assert _router_routes(server, "/console") == set(CONSOLE_ROUTES)
    assert _router_routes(server, "/patrol") == set(PATROL_ROUTES)


def _incident(server: CentralServer) -> str:
    now = time.time()
    (res,) = server.storage.incidents.commit_events([(Event(id=new_ulid(), post="P001", seq=1, ts=now), now)])
    return res.incident_id


async def _call(client: Console | Phone, method: str, path: str) -> int:
    if path.endswith("/ws"):
        try:
            ws = await client.http.ws_connect(f"{client.base}{path}?csrf={client.csrf}",
                                              headers=client.origin)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101
    if method == "GET":
        status, _ = await client.get(path)
    else:
        status, _ = await client.post(path, {})
    return status


def _fill(path: str, incident_id: str) -> str:
    return (path.replace("{incident_id}", incident_id).replace("{post_id}", "P001")
            .replace("{page_id}", "nope").replace("{name}", "u-operator"))


@pytest.mark.parametrize("role", [None, OPERATOR, SUPERVISOR, TECHNICIAN, ADMIN])
async def test_console_routes_follow_the_table(server: CentralServer, deployment: d.Deployment,
                                               role: str | None) -> None:
    incident_id = _incident(server)
    add_users(server, *((f"u-{r}", r) for r in sorted(EVERYONE)))
    # Logging out ends the session: call it last.
    rows = sorted(((m, p, who) for (m, p), who in CONSOLE_ROUTES.items() if who != PUBLIC),
                  key=lambda row: row[1] == "/console/api/logout")
    async with Console(deployment) as client:
        if role is not None:
            assert (await client.login(f"u-{role}")).status == 200
        else:
            client.csrf = "not-a-session"
        for method, path, allowed in rows:
            status = await _call(client, method, _fill(path, incident_id))
            if role is None:
                expected = {302} if (method, path) == ("GET", "/console/") else {401}
                assert status in expected, (method, path, status)
            elif role in allowed:
                assert status not in (401, 403), (role, method, path, status)
            else:
                assert status == 403, (role, method, path, status)


async def test_patrol_routes_follow_the_table_and_console_sessions_do_not_open_them(
    server: CentralServer, deployment: d.Deployment
) -> None:
    add_teams(deployment, [TeamSpec("A", 1.0)])
    give_app_passwords(deployment, "A")
    add_users(server, ("u-admin", ADMIN))
    rows = sorted(((m, p) for (m, p), who in PATROL_ROUTES.items() if who == "team"),
                  key=lambda row: row[1] == "/patrol/api/logout")
    async with Phone(deployment) as anonymous, Console(deployment) as admin:
        assert (await admin.login("u-admin")).status == 200
        anonymous.csrf = "not-a-session"
        for method, path in rows:
            expected = {302} if (method, path) == ("GET", "/patrol/") else {401}
            assert await _call(anonymous, method, path) in expected, (method, path)
            # The console's session cookie and CSRF token are worth nothing here.
            admin_status = await _call(admin, method, path)  # type: ignore[arg-type]
            assert admin_status in expected, ("console admin", method, path, admin_status)
    async with Phone(deployment) as phone:
        assert (await phone.login("A")).status == 200
        for method, path in rows:
            status = await _call(phone, method, path)
            assert status not in (401, 403), (method, path, status)
