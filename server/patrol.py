"""Patrol teams: the registry (SQLite), geometry (great-circle distance, zones, shifts), and the
team API.

A team has an id (also its MQTT user name ``team-{id}``), a name, its members' contacts, the zone
it is responsible for (a polygon ``[[lat, lon], ...]`` or a list of post ids) and its shift hours
(``"HH:MM-HH:MM"`` in the server's local time, may cross midnight; empty = always on duty).

The registry lives in the server's database (tables ``teams`` and ``team_live``), next to the
incidents; ``alarmpost patrol team add/list/remove`` edits it, and a running server notices the
change by itself (see :class:`server.dispatch.Dispatcher`).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlite_utils
from aiohttp import web

from protocol.topics import valid_team_id

if TYPE_CHECKING:
    from server.app import CentralServer

EARTH_RADIUS_KM = 6371.0088

SCHEMA = """
CREATE TABLE IF NOT EXISTS teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    contacts TEXT NOT NULL DEFAULT '[]',
    zone TEXT NOT NULL DEFAULT '{}',
    shift TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS team_live (
    team_id TEXT PRIMARY KEY,
    status TEXT,
    status_at REAL,
    lat REAL,
    lon REAL,
    position_at REAL
);
CREATE TABLE IF NOT EXISTS team_app_passwords (  -- the patrol web app's login (server.patrol_web)
    team_id TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""

_SHIFT_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class TeamError(ValueError):
    """A team definition that cannot be stored; the message says what to fix."""


@dataclass(frozen=True)
class Team:
    id: str
    name: str = ""
    contacts: tuple[str, ...] = ()
    zone_polygon: tuple[tuple[float, float], ...] = ()
    zone_posts: frozenset[str] = field(default_factory=frozenset)
    shift: str = ""
    created_at: float = 0.0

    def holds(self, post_id: str, lat: float | None, lon: float | None) -> bool:
        """Is this post in the team's zone?"""
        if post_id in self.zone_posts:
            return True
        if self.zone_polygon and lat is not None and lon is not None:
            return point_in_polygon(lat, lon, self.zone_polygon)
        return False

    def shift_minutes(self) -> tuple[int, int] | None:
        """(start, end) minute of the day, or None for always on duty."""
        return parse_shift(self.shift)

    def as_dict(self) -> dict[str, Any]:
        zone: dict[str, Any] = {}
        if self.zone_polygon:
            zone["polygon"] = [list(p) for p in self.zone_polygon]
        if self.zone_posts:
            zone["posts"] = sorted(self.zone_posts)
        return {"id": self.id, "name": self.name, "contacts": list(self.contacts), "zone": zone,
                "shift": self.shift, "created_at": self.created_at}


# ---------------------------------------------------------------------------- geometry
def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def point_in_polygon(lat: float, lon: float, polygon: tuple[tuple[float, float], ...]) -> bool:
    """Ray casting on lat/lon as plane coordinates (fine for district-sized zones)."""
    inside = False
    n = len(polygon)
    j = n - 1
    for i in range(n):
        yi, xi = polygon[i]
        yj, xj = polygon[j]
        if (yi > lat) != (yj > lat) and lon < (xj - xi) * (lat - yi) / (yj - yi) + xi:
            inside = not inside
        j = i
    return inside


def parse_shift(shift: str) -> tuple[int, int] | None:
    if not shift:
        return None
    m = _SHIFT_RE.match(shift)
    if m is None:
        raise TeamError(f"shift {shift!r} must look like 07:00-19:00 (24 h, may cross midnight)")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    return h1 * 60 + m1, h2 * 60 + m2


def on_shift(minutes: tuple[int, int] | None, minute_of_day: int) -> bool:
    if minutes is None:
        return True
    start, end = minutes
    if start == end:
        return True
    if start < end:
        return start <= minute_of_day < end
    return minute_of_day >= start or minute_of_day < end


def minute_of_day(now: float) -> int:
    t = time.localtime(now)
    return t.tm_hour * 60 + t.tm_min


def parse_polygon(text: str) -> tuple[tuple[float, float], ...]:
    """``"26.08,119.32;26.09,119.33;..."`` or JSON ``[[26.08,119.32],...]`` -> polygon."""
    text = text.strip()
    try:
        raw = json.loads(text) if text.startswith("[") else [
            [float(x) for x in pair.split(",")] for pair in text.split(";") if pair.strip()
        ]
    except (ValueError, json.JSONDecodeError):
        raise TeamError(f"zone polygon {text[:80]!r}: use 'lat,lon;lat,lon;...'") from None
    return check_polygon(raw)


def check_polygon(raw: object) -> tuple[tuple[float, float], ...]:
    if not isinstance(raw, list | tuple) or len(raw) < 3:
        raise TeamError("a zone polygon needs at least 3 [lat, lon] points")
    points = []
    for p in raw:
        if (not isinstance(p, list | tuple) or len(p) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)):
            raise TeamError(f"zone polygon point {p!r} is not [lat, lon]")
        lat, lon = float(p[0]), float(p[1])
        if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90
                and -180 <= lon <= 180):
            raise TeamError(f"zone polygon point {p!r} is out of range")
        points.append((lat, lon))
    return tuple(points)


# ---------------------------------------------------------------------------- registry
def ensure_schema(db: sqlite_utils.Database) -> None:
    db.executescript(SCHEMA)


def make_team(team_id: str, name: str = "", contacts: list[str] | tuple[str, ...] = (),
              zone_polygon: object = None, zone_posts: list[str] | tuple[str, ...] = (),
              shift: str = "") -> Team:
    """A validated :class:`Team`; raise :class:`TeamError` with what to fix."""
    if not valid_team_id(team_id):
        raise TeamError(f"invalid team id {team_id!r}: use 1-59 letters, digits, '-' or '_'")
    parse_shift(shift)
    polygon = check_polygon(zone_polygon) if zone_polygon else ()
    for c in contacts:
        if not c or len(c) > 100:
            raise TeamError(f"contact {c!r} must be 1-100 characters")
    if len(name) > 100:
        raise TeamError("team name is longer than 100 characters")
    return Team(id=team_id, name=name or team_id, contacts=tuple(contacts), zone_polygon=polygon,
                zone_posts=frozenset(zone_posts), shift=shift, created_at=time.time())


def add_team(db: sqlite_utils.Database, team: Team) -> None:
    ensure_schema(db)
    zone = team.as_dict()["zone"]
    with db.atomic():
        if db.execute("SELECT 1 FROM teams WHERE id=?", (team.id,)).fetchone():
            raise TeamError(f"team {team.id!r} already exists")
        db.execute(
            "INSERT INTO teams (id, name, contacts, zone, shift, created_at) VALUES (?,?,?,?,?,?)",
            (team.id, team.name, json.dumps(list(team.contacts)), json.dumps(zone), team.shift,
             team.created_at),
        )


def remove_team(db: sqlite_utils.Database, team_id: str) -> bool:
    ensure_schema(db)
    with db.atomic():
        gone = db.execute("DELETE FROM teams WHERE id=?", (team_id,)).rowcount
        db.execute("DELETE FROM team_live WHERE team_id=?", (team_id,))
        db.execute("DELETE FROM team_app_passwords WHERE team_id=?", (team_id,))
    return bool(gone)


def _row_team(row: dict[str, Any]) -> Team:
    zone = json.loads(row["zone"] or "{}")
    return Team(
        id=row["id"], name=row["name"], contacts=tuple(json.loads(row["contacts"] or "[]")),
        zone_polygon=tuple((float(a), float(b)) for a, b in zone.get("polygon", [])),
        zone_posts=frozenset(zone.get("posts", [])), shift=row["shift"],
        created_at=row["created_at"],
    )


def load_teams(db: sqlite_utils.Database) -> dict[str, Team]:
    ensure_schema(db)
    return {r["id"]: _row_team(r) for r in db.query("SELECT * FROM teams ORDER BY id")}


# ---------------------------------------------------------------------------- HTTP API
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
    from server.webutil import json_body, str_field

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
        add_team(server.dispatcher.db, team)
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
    if not remove_team(server.dispatcher.db, team_id):
        raise web.HTTPNotFound(reason="no such team")
    server.dispatcher.reload_teams()
    return web.json_response({"removed": team_id})


def _server(request: web.Request) -> CentralServer:
    from server.api import SERVER_KEY

    return request.app[SERVER_KEY]


def add_routes(app: web.Application) -> None:
    """GET/POST /api/teams, GET/DELETE /api/teams/{id} (behind the API's bearer-token guard)."""
    app.router.add_get("/api/teams", _teams)
    app.router.add_post("/api/teams", _create_team)
    app.router.add_get("/api/teams/{team_id}", _team)
    app.router.add_delete("/api/teams/{team_id}", _delete_team)
