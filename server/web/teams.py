"""The team registry's HTTP API (behind the API's bearer-token guard):
``GET/POST /api/teams``, ``GET/DELETE /api/teams/{id}``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from server.patrol import TeamError, add_team, make_team, remove_team
from server.web.host import SERVER_KEY, ServerHost
from server.web.http import json_body, str_field


async def _teams(request: web.Request) -> web.Response:
    server = _server(request)
    return web.json_response(server.dispatcher.team_views())


async def _team(request: web.Request) -> web.Response:
    view = _server(request).dispatcher.team_view(request.match_info["team_id"])
    if view is None:
        raise web.HTTPNotFound(reason="no such team")
    return web.json_response(view)


def _strings(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise web.HTTPBadRequest(reason=f"{key!r} must be a list of strings")
    return value


async def _create_team(request: web.Request) -> web.Response:
    """POST /api/teams {id, name?, contacts?, zone_posts? | zone_polygon?, shift?}: register a
    team, as ``alarmpost patrol team add`` does (its device credentials stay a CLI matter)."""
    server = _server(request)
    body = await json_body(request)
    unknown = set(body) - {"id", "name", "contacts", "zone_posts", "zone_polygon", "shift"}
    if unknown:
        raise web.HTTPBadRequest(reason=f"unknown field(s): {', '.join(sorted(unknown))}")
    team_id = str_field(body, "id", 59)
    if team_id in server.dispatcher.teams:
        raise web.HTTPConflict(reason=f"team {team_id!r} already exists")
    try:
        team = make_team(team_id, str_field(body, "name", 100, required=False),
                         _strings(body, "contacts"), body.get("zone_polygon"),
                         _strings(body, "zone_posts"), str_field(body, "shift", 11, required=False))
        add_team(server.storage.teams, team)
    except TeamError as exc:
        raise web.HTTPBadRequest(reason=str(exc)) from None
    server.dispatcher.reload_teams()
    return web.json_response(server.dispatcher.team_view(team.id), status=201)


async def _delete_team(request: web.Request) -> web.Response:
    """DELETE /api/teams/{id}: refused while the team has a page or an assignment open."""
    server = _server(request)
    team_id = request.match_info["team_id"]
    incident = server.dispatcher.committed.get(team_id)
    if incident is not None:
        raise web.HTTPConflict(reason=f"team {team_id!r} is on incident {incident}; cancel its "
                                      "page or close the incident first")
    if not remove_team(server.storage.teams, team_id):
        raise web.HTTPNotFound(reason="no such team")
    server.dispatcher.reload_teams()
    return web.json_response({"removed": team_id})


def _server(request: web.Request) -> ServerHost:
    return request.app[SERVER_KEY]


def add_routes(app: web.Application) -> None:
    """GET/POST /api/teams, GET/DELETE /api/teams/{id} (behind the API's bearer-token guard)."""
    app.router.add_get("/api/teams", _teams)
    app.router.add_post("/api/teams", _create_team)
    app.router.add_get("/api/teams/{team_id}", _team)
    app.router.add_delete("/api/teams/{team_id}", _delete_team)
