"""Patrol teams: the registry, geometry (great-circle distance, zones, shifts), and the
team API.

A team has an id (also its MQTT user name ``team-{id}``), a name, its members' contacts, the zone
it is responsible for (a polygon ``[[lat, lon], ...]`` or a list of post ids) and its shift hours
(``"HH:MM-HH:MM"`` in the server's local time, may cross midnight; empty = always on duty).

The registry lives in the server's database (:class:`server.storage.TeamStore`), next to the
incidents; ``alarmpost patrol team add/list/remove`` edits it, and a running server notices the
change by itself (see :class:`server.dispatch.Dispatcher`).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from protocol.topics import valid_team_id
from server.storage import TeamExists, TeamStore

EARTH_RADIUS_KM = 6371.0088

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


def add_team(store: TeamStore, team: Team) -> None:
    try:
        store.add(team.id, team.name, team.contacts, team.as_dict()["zone"], team.shift,
                  team.created_at)
    except TeamExists as exc:
        raise TeamError(str(exc)) from None


def remove_team(store: TeamStore, team_id: str) -> bool:
    return store.remove(team_id)


def _row_team(row: dict[str, Any]) -> Team:
    zone = row["zone"]
    return Team(
        id=row["id"], name=row["name"], contacts=tuple(row["contacts"]),
        zone_polygon=tuple((float(a), float(b)) for a, b in zone.get("polygon", [])),
        zone_posts=frozenset(zone.get("posts", [])), shift=row["shift"],
        created_at=row["created_at"],
    )


def load_teams(store: TeamStore) -> dict[str, Team]:
    return {r["id"]: _row_team(r) for r in store.all()}
