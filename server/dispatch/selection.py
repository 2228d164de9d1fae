"""Choosing teams: the nearest available one, own zone first; those within a radius."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from server.patrol import (
    EARTH_RADIUS_KM,
    Team,
    minute_of_day,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger("alarmpost.dispatch")

_BIG = 1e12  # cost of a free team whose position is unknown


def haversine_np(lat: float, lon: float, lats: npt.NDArray[np.float64],
                 lons: npt.NDArray[np.float64],
                 cos_lats: npt.NDArray[np.float64] | None = None) -> npt.NDArray[np.float64]:
    """Great-circle km from one point (degrees) to arrays of points (radians)."""
    p1, l1 = math.radians(lat), math.radians(lon)
    if cos_lats is None:
        cos_lats = np.cos(lats)
    a = np.sin((lats - p1) / 2) ** 2 + math.cos(p1) * cos_lats * np.sin((lons - l1) / 2) ** 2
    result: npt.NDArray[np.float64] = 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.minimum(a, 1.0)))
    return result


@dataclass(frozen=True)
class Choice:
    team_id: str
    distance_km: float | None  # None: position unknown
    in_zone: bool


class TeamIndex:
    """Positions and availability of every team in numpy arrays, so choosing among 10,000 teams
    costs well under a millisecond. Order: team ids sorted (ties go to the smaller id)."""

    def __init__(self, teams: Iterable[Team]) -> None:
        self.teams = sorted(teams, key=lambda t: t.id)
        self.ids = [t.id for t in self.teams]
        self.pos = {t: i for i, t in enumerate(self.ids)}
        n = len(self.ids)
        self.lat = np.zeros(n)  # radians
        self.lon = np.zeros(n)
        self.cos_lat = np.ones(n)
        self.lat_deg = np.zeros(n)
        self.lon_deg = np.zeros(n)
        self.position_at = np.full(n, -np.inf)
        self.device_ok = np.zeros(n, dtype=bool)  # its device says "available"
        self.free = np.ones(n, dtype=bool)  # not committed to an incident
        shifts = [t.shift_minutes() for t in self.teams]
        self.shift_start = np.array([s[0] if s else -1 for s in shifts], dtype=np.int64)
        self.shift_end = np.array([s[1] if s else -1 for s in shifts], dtype=np.int64)
        self._zones: dict[str, npt.NDArray[np.bool_]] = {}
        self._any_shift = bool((self.shift_start >= 0).any())
        self._shift_cache: tuple[int, npt.NDArray[np.bool_]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def set_position(self, team_id: str, lat: float, lon: float, at: float) -> None:
        i = self.pos[team_id]
        self.lat_deg[i], self.lon_deg[i] = lat, lon
        self.lat[i], self.lon[i] = math.radians(lat), math.radians(lon)
        self.cos_lat[i] = math.cos(self.lat[i])
        self.position_at[i] = at

    def zone_mask(self, post_id: str, lat: float | None, lon: float | None) -> npt.NDArray[np.bool_]:
        mask = self._zones.get(post_id)
        if mask is None:
            mask = np.array([t.holds(post_id, lat, lon) for t in self.teams], dtype=bool)
            self._zones[post_id] = mask
        return mask

    def on_shift_mask(self, now: float) -> npt.NDArray[np.bool_]:
        m = minute_of_day(now)
        if self._shift_cache is not None and self._shift_cache[0] == m:
            return self._shift_cache[1]
        s, e = self.shift_start, self.shift_end
        always = (s < 0) | (s == e)
        day = (s < e) & (s <= m) & (m < e)
        night = (s > e) & ((m >= s) | (m < e))
        result: npt.NDArray[np.bool_] = always | day | night
        self._shift_cache = (m, result)
        return result

    def available_mask(self, now: float, exclude: Iterable[str] = ()) -> npt.NDArray[np.bool_]:
        mask = self.device_ok & self.free
        if self._any_shift:
            mask &= self.on_shift_mask(now)
        for team_id in exclude:
            i = self.pos.get(team_id)
            if i is not None:
                mask[i] = False
        return mask

    def choose(self, post_id: str, lat: float | None, lon: float | None, *, now: float,
               max_age_s: float, zone_margin_km: float, exclude: Iterable[str] = ()
               ) -> Choice | None:
        """The team to page by the rule (module docstring), or None."""
        if not self.ids:
            return None
        idx = np.flatnonzero(self.available_mask(now, exclude))
        if not len(idx):
            return None
        fresh = self.position_at[idx] >= now - max_age_s
        zone = self.zone_mask(post_id, lat, lon)[idx]
        if lat is None or lon is None:
            dist = np.zeros(len(idx))
        else:
            dist = haversine_np(lat, lon, self.lat[idx], self.lon[idx], self.cos_lat[idx])
        cost = np.where(fresh, dist, _BIG) - zone_margin_km * zone
        k = int(np.argmin(cost))  # the first minimum: ties go to the smaller id
        i = int(idx[k])
        return Choice(self.ids[i], float(dist[k]) if fresh[k] else None, bool(zone[k]))

    def within(self, lat: float | None, lon: float | None, radius_km: float, *, now: float,
               max_age_s: float, exclude: Iterable[str] = ()) -> list[Choice]:
        """Every available team with a fresh position within ``radius_km``, nearest first."""
        if not self.ids or lat is None or lon is None:
            return []
        avail = self.available_mask(now, exclude) & (self.position_at >= now - max_age_s)
        dist = haversine_np(lat, lon, self.lat, self.lon, self.cos_lat)
        idx = np.nonzero(avail & (dist <= radius_km))[0]
        idx = idx[np.argsort(dist[idx], kind="stable")]
        return [Choice(self.ids[i], float(dist[i]), False) for i in idx]
