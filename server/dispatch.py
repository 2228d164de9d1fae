"""The dispatcher: page the nearest available patrol team, escalate, broadcast, queue.

When an alarm opens an incident (bus notice ``incident_opened``):

1. Pick the nearest *available* team (status ``available`` from its device, on shift, not
   committed to another incident, position known), by great-circle distance; a team whose own
   zone holds the post wins if it is at most ``zone_margin_km`` farther (:func:`choose`). A free
   team whose position is unknown is paged only when no team with a known position is free.
2. Page it at once (a row in ``pages`` first, then the notifiers: MQTT QoS 1 to its device).
3. Wait ``answer_timeout_s``. A decline or a timeout pages the next nearest team not yet tried.
4. After ``direct_pages`` (K) unanswered pages, or when no untried team is left, broadcast to
   every available team within ``broadcast_radius_km``: the first to accept takes the incident,
   the others get a :class:`PageWithdrawn` ("taken"). Rounds repeat until someone accepts.
5. With no team to page the incident is *queued*; the reason is on the incident (API) and the
   bus (``dispatch_queued``), and it is paged the moment a team frees up (oldest first).

A team has at most one open page or assignment at a time: it is never committed to two
incidents. Every incident state change goes through ``CentralServer.transition`` (audited);
dispatcher notes that do not change the state (timeouts, declines, queueing) are appended to
the same audit log. Dispatch state (``dispatch`` and ``pages`` tables) is written before any page
is sent, so after a restart the timers resume from the stored deadlines, pages not yet handed
to the broker are sent, and none is sent twice (a device also deduplicates by page id).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from protocol.messages import (
    Page,
    PageAnswer,
    PageWithdrawn,
    Rejected,
    TeamPosition,
    TeamStatus,
    decode_from_team,
    encode,
)
from protocol.topics import TEAM_KINDS, team_topic
from protocol.ulid import new_ulid
from server.config import DispatchSection
from server.incidents import CLASSIFICATIONS, CLOSED, InvalidTransition
from server.patrol import (
    EARTH_RADIUS_KM,
    Team,
    ensure_schema,
    load_teams,
    minute_of_day,
    on_shift,
)

if TYPE_CHECKING:
    import aiomqtt

    from server.app import CentralServer

log = logging.getLogger("alarmpost.dispatch")

SCHEMA = """
CREATE TABLE IF NOT EXISTS dispatch (
    incident_id TEXT PRIMARY KEY,
    post_id TEXT NOT NULL,
    state TEXT NOT NULL,            -- queued | paging | assigned | done
    team_id TEXT,                   -- the team that accepted
    attempts INTEGER NOT NULL DEFAULT 0,   -- direct pages sent
    rounds INTEGER NOT NULL DEFAULT 0,     -- broadcast rounds sent
    reason TEXT NOT NULL DEFAULT '',       -- why it is queued
    exclude TEXT NOT NULL DEFAULT '[]',    -- teams an operator took off this incident
    pressed_at REAL,
    opened_at REAL NOT NULL,
    first_page_at REAL,
    accepted_at REAL,
    en_route_at REAL,
    on_scene_at REAL,
    closed_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dispatch_active ON dispatch(state) WHERE state != 'done';
CREATE TABLE IF NOT EXISTS pages (
    id TEXT PRIMARY KEY,
    incident_id TEXT NOT NULL,
    team_id TEXT NOT NULL,
    kind TEXT NOT NULL,             -- direct | broadcast | operator
    sent_at REAL NOT NULL,
    deadline REAL NOT NULL,
    state TEXT NOT NULL,            -- waiting | accepted | declined | timeout | withdrawn | cancelled
    published_at REAL,              -- handed to the broker (QoS 1 PUBACK)
    answered_at REAL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS pages_incident ON pages(incident_id);
CREATE INDEX IF NOT EXISTS pages_waiting ON pages(state) WHERE state = 'waiting';
"""

_BIG = 1e12  # cost of a free team whose position is unknown


class DispatchError(ValueError):
    """An operator override that cannot be done; the message says why."""


# ---------------------------------------------------------------------------- notifiers
class NotifierUnavailable(RuntimeError):
    """The channel cannot deliver now (e.g. broker disconnected); the page is retried later."""


class Notifier(Protocol):
    """A paging channel. MQTT is the first; SMS or a radio gateway implement the same two calls.

    ``page`` must raise (e.g. :class:`NotifierUnavailable`) when it could not hand the page over;
    the dispatcher then retries it on the next connection. A page may be delivered twice after a
    crash: it carries its id, and devices show a page id once.
    """

    name: str

    async def page(self, team: Team | None, page: Page) -> None: ...
    async def withdraw(self, team: Team | None, notice: PageWithdrawn) -> None: ...


class MqttNotifier:
    """QoS 1 to ``alarmpost/v1/team/team-{id}/page``: queued by the broker for a device that is
    offline (persistent session), delivered when it comes back."""

    name = "mqtt"

    def __init__(self) -> None:
        self.client: aiomqtt.Client | None = None

    async def page(self, team: Team | None, page: Page) -> None:
        await self._publish(team_topic(page.team, "page"), encode(page))

    async def withdraw(self, team: Team | None, notice: PageWithdrawn) -> None:
        await self._publish(team_topic(notice.team, "withdrawn"), encode(notice))

    async def _publish(self, topic: str, payload: bytes) -> None:
        client = self.client
        if client is None:
            raise NotifierUnavailable("not connected to the broker")
        await client.publish(topic, payload, qos=1)


# ---------------------------------------------------------------------------- selection
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


# ---------------------------------------------------------------------------- state
@dataclass
class TeamLive:
    status: str | None = None
    status_at: float | None = None
    lat: float | None = None
    lon: float | None = None
    position_at: float | None = None
    dirty: bool = False


@dataclass
class PageRow:
    id: str
    incident_id: str
    team_id: str
    kind: str
    sent_at: float
    deadline: float
    state: str = "waiting"
    published_at: float | None = None
    answered_at: float | None = None
    detail: str = ""


@dataclass
class Job:
    """One incident the dispatcher is working on (a row of ``dispatch`` not ``done``)."""

    incident_id: str
    post_id: str
    state: str
    opened_at: float
    pressed_at: float | None = None
    team_id: str | None = None
    attempts: int = 0
    rounds: int = 0
    reason: str = ""
    exclude: set[str] = field(default_factory=set)
    pages: dict[str, PageRow] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None

    def waiting(self) -> list[PageRow]:
        return [p for p in self.pages.values() if p.state == "waiting"]

    def tried(self) -> set[str]:
        return {p.team_id for p in self.pages.values() if p.kind in ("direct", "operator")}

    def declined(self) -> set[str]:
        """Teams that declined, or whose page an operator cancelled, since the last re-dispatch."""
        return {p.team_id for p in self.pages.values()
                if p.state in ("declined", "cancelled") and not p.kind.endswith("-old")}


class Dispatcher:
    """Lives inside :class:`server.app.CentralServer` (``server.dispatcher``)."""

    def __init__(self, server: CentralServer) -> None:
        self.server = server
        self.config: DispatchSection = server.config.dispatch
        self.db = server.storage.db  # type: ignore[attr-defined]
        ensure_schema(self.db)
        self.db.executescript(SCHEMA)
        self.mqtt = MqttNotifier()
        self.notifiers: list[Notifier] = [self.mqtt]
        self.teams: dict[str, Team] = {}
        self.live: dict[str, TeamLive] = {}
        self.index = TeamIndex(())
        self.jobs: dict[str, Job] = {}  # active (not done), by incident id
        self.committed: dict[str, str] = {}  # team id -> incident id (open page or assignment)
        self._notices = server.bus.subscribe()
        self._tasks: set[asyncio.Task[None]] = set()
        self._data_version = -1
        self._last_reload = 0.0
        self._setup_metrics()
        self.reload_teams()
        self._load_jobs()

    # ------------------------------------------------------------------ setup
    def _setup_metrics(self) -> None:
        m = self.server.metrics
        m.counter("pages_sent_total", "Pages sent to patrol teams, by kind")
        m.counter("page_answers_total", "Answers from patrol teams, by answer")
        m.counter("pages_timed_out_total", "Pages nobody answered in time")
        m.counter("dispatch_queued_total", "Times an incident was queued for want of a team")
        m.counter("team_messages_total", "MQTT messages from patrol teams, by kind")
        m.counter("dispatch_errors_total", "Unexpected dispatcher errors (see the log)")
        m.gauge("teams_known", "Patrol teams in the registry", lambda: len(self.teams))
        m.gauge("teams_available", "Patrol teams that could be paged now",
                lambda: int(self.index.available_mask(time.time()).sum()) if len(self.index) else 0)
        m.gauge("incidents_queued", "Incidents waiting for a free team",
                lambda: sum(1 for j in self.jobs.values() if j.state == "queued"))
        self.select_latency = m.histogram(
            "dispatch_select_seconds", "Time to choose a team",
            (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01),
        )

    def reload_teams(self) -> None:
        """Re-read the registry (after ``alarmpost patrol team add/remove``)."""
        self.teams = load_teams(self.db)
        stored = {r["team_id"]: r for r in self.db.query("SELECT * FROM team_live")}
        for team_id in self.teams:
            if team_id not in self.live:
                row = stored.get(team_id, {})
                self.live[team_id] = TeamLive(row.get("status"), row.get("status_at"),
                                              row.get("lat"), row.get("lon"),
                                              row.get("position_at"))
        for gone in set(self.live) - set(self.teams):
            del self.live[gone]
        self.index = TeamIndex(self.teams.values())
        for team_id, live in self.live.items():
            self._index_team(team_id, live)
        self._data_version = self._db_version()
        self._last_reload = time.monotonic()
        log.info("team registry: %d teams", len(self.teams))

    def _index_team(self, team_id: str, live: TeamLive) -> None:
        i = self.index.pos.get(team_id)
        if i is None:
            return
        if live.lat is not None and live.lon is not None and live.position_at is not None:
            self.index.set_position(team_id, live.lat, live.lon, live.position_at)
        self.index.device_ok[i] = live.status == "available"
        self.index.free[i] = team_id not in self.committed

    def _set_committed(self, team_id: str, incident_id: str | None) -> None:
        if incident_id is None:
            self.committed.pop(team_id, None)
        else:
            self.committed[team_id] = incident_id
        i = self.index.pos.get(team_id)
        if i is not None:
            self.index.free[i] = incident_id is None

    def _db_version(self) -> int:
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def _load_jobs(self) -> None:
        """Rebuild the in-memory state from the database (server start)."""
        rows = list(self.db.query("SELECT * FROM dispatch WHERE state != 'done'"))
        for row in rows:
            job = Job(row["incident_id"], row["post_id"], row["state"], row["opened_at"],
                      row["pressed_at"], row["team_id"], row["attempts"], row["rounds"],
                      row["reason"], set(json.loads(row["exclude"])))
            for p in self.db.query("SELECT * FROM pages WHERE incident_id=?", (job.incident_id,)):
                job.pages[p["id"]] = PageRow(**p)
            self.jobs[job.incident_id] = job
            if job.state == "assigned" and job.team_id:
                self._set_committed(job.team_id, job.incident_id)
            for page in job.waiting():
                self._set_committed(page.team_id, job.incident_id)
        if rows:
            log.info("dispatch: resumed %d incidents (%d pages waiting)", len(rows),
                     sum(len(j.waiting()) for j in self.jobs.values()))

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Consume bus notices; tick for timers that need no event (stale positions, shifts)."""
        self._reconcile()
        for job in list(self.jobs.values()):
            self._arm(job)
        tick = asyncio.create_task(self._tick_loop())
        try:
            while True:
                notice = await self._notices.get()
                try:
                    self._on_notice(notice)
                except Exception:
                    log.exception("dispatcher failed on %s", notice.get("type"))
        finally:
            tick.cancel()
            await asyncio.gather(tick, return_exceptions=True)
            self.close()

    def close(self) -> None:
        for job in self.jobs.values():
            if job.timer is not None:
                job.timer.cancel()
                job.timer = None
        self._flush_live()
        self.server.bus.unsubscribe(self._notices)
        for task in list(self._tasks):
            task.cancel()

    def on_connected(self, client: aiomqtt.Client | None) -> None:
        """The server (re)connected (or lost the broker: ``None``): send what is unsent."""
        self.mqtt.client = client
        if client is None:
            return
        unsent = [p for j in self.jobs.values() for p in j.waiting() if p.published_at is None]
        if unsent:
            log.info("dispatch: sending %d pages not yet handed to the broker", len(unsent))
            self._spawn(self._publish_pages(unsent))

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                if self._db_version() != self._data_version:
                    self.reload_teams()
                    self.drain()
                elif any(j.state == "queued" for j in self.jobs.values()):
                    self.drain()
                self._flush_live()
            except Exception:
                log.exception("dispatcher tick failed")

    def _on_notice(self, notice: dict[str, Any]) -> None:
        kind = notice.get("type")
        if kind == "incident_opened":
            self.incident_opened(notice["incident_id"], notice["post_id"], notice.get("pressed_at"))
        elif kind == "incident_updated" and notice.get("state") in CLOSED:
            self._closed(notice["incident_id"], notice["state"])
        elif kind == "overflow":
            self._reconcile()

    def _reconcile(self) -> None:
        """Incidents opened while nobody listened get a job; jobs of closed incidents end."""
        if not self.config.enabled:
            return
        for row in self.db.query(
            "SELECT i.id, i.post_id, i.opened_at, i.state, e.type, e.pressed_at FROM incidents i "
            "JOIN events e ON e.post_id = i.post_id AND e.id = i.first_event_id "
            "WHERE i.state NOT IN ('resolved', 'cancelled') "
            "AND i.id NOT IN (SELECT incident_id FROM dispatch) ORDER BY i.opened_at"
        ):
            self.incident_opened(row["id"], row["post_id"], row["pressed_at"])
        for job in list(self.jobs.values()):
            incident = self.db.execute("SELECT state FROM incidents WHERE id=?",
                                       (job.incident_id,)).fetchone()
            if incident is None or incident[0] in CLOSED:
                self._closed(job.incident_id, incident[0] if incident else "cancelled")

    # ------------------------------------------------------------------ incidents
    def incident_opened(self, incident_id: str, post_id: str, pressed_at: float | None) -> None:
        if not self.config.enabled or incident_id in self.jobs:
            return
        row = self.db.execute(
            "SELECT e.type, i.opened_at, i.classification FROM incidents i "
            "JOIN events e ON e.post_id = i.post_id AND e.id = i.first_event_id WHERE i.id=?",
            (incident_id,)).fetchone()
        if row is None:
            return
        if row[0] == "test" and not self.config.page_test_events:
            return
        if row[2] == "test":  # opened while its post was in test mode: never paged
            return
        now = time.time()
        with self.db.atomic():
            inserted = self.db.execute(
                "INSERT OR IGNORE INTO dispatch (incident_id, post_id, state, pressed_at, "
                "opened_at, updated_at) VALUES (?, ?, 'queued', ?, ?, ?)",
                (incident_id, post_id, pressed_at, row[1], now)).rowcount
        if not inserted:
            return
        job = Job(incident_id, post_id, "queued", row[1], pressed_at)
        self.jobs[incident_id] = job
        self._dispatch(job)

    def _post(self, post_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT name, school, address, lat, lon FROM posts WHERE id=?",
                              (post_id,)).fetchone()
        if row is None:
            return {"name": "", "school": "", "address": "", "lat": None, "lon": None}
        return dict(zip(("name", "school", "address", "lat", "lon"), row, strict=True))

    def _dispatch(self, job: Job) -> None:
        """Page the next team(s) for ``job`` if nothing is pending, or queue it."""
        if job.state in ("assigned", "done") or job.waiting():
            return
        now = time.time()
        post = self._post(job.post_id)
        cfg = self.config
        declined = job.declined() | job.exclude
        if job.attempts < cfg.direct_pages:
            t0 = time.perf_counter()
            choice = self.index.choose(job.post_id, post["lat"], post["lon"], now=now,
                                       max_age_s=cfg.position_max_age_s,
                                       zone_margin_km=cfg.zone_margin_km,
                                       exclude=job.tried() | declined)
            self.select_latency.observe(time.perf_counter() - t0)
            if choice is not None:
                self._send(job, post, [choice], "direct", now)
                return
        targets = self.index.within(post["lat"], post["lon"], cfg.broadcast_radius_km, now=now,
                                    max_age_s=cfg.position_max_age_s, exclude=declined)
        if targets:
            self._send(job, post, targets, "broadcast", now)
            return
        self._queue(job, self._why_none(job, post, now), now)

    def _why_none(self, job: Job, post: dict[str, Any], now: float) -> str:
        if not self.teams:
            return "no patrol teams registered"
        counts: dict[str, int] = {}
        on = self.index.on_shift_mask(now)
        declined = job.declined() | job.exclude
        for i, team_id in enumerate(self.index.ids):
            live = self.live[team_id]
            if team_id in declined:
                why = "declined"
            elif team_id in self.committed:
                why = "busy"
            elif not on[i]:
                why = "off shift"
            elif live.status != "available":
                why = "off duty" if live.status == "off_duty" else f"status {live.status or 'unknown'}"
            elif live.position_at is None or live.position_at < now - self.config.position_max_age_s:
                why = "position unknown"
            else:
                why = f"beyond {self.config.broadcast_radius_km:g} km"
            counts[why] = counts.get(why, 0) + 1
        detail = ", ".join(f"{n} {why}" for why, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return f"no team available ({detail})"

    def _queue(self, job: Job, reason: str, now: float) -> None:
        changed = job.state != "queued" or job.reason != reason
        job.state, job.reason = "queued", reason
        if not changed:
            return
        with self.db.atomic():
            self.db.execute("UPDATE dispatch SET state='queued', reason=?, updated_at=? "
                            "WHERE incident_id=?", (reason, now, job.incident_id))
            self._note(job.incident_id, "dispatch_queued", reason, now)
        self.server.metrics.inc("dispatch_queued_total")
        self.server.bus.publish("dispatch_queued", incident_id=job.incident_id,
                                post_id=job.post_id, reason=reason)
        log.warning("incident %s queued: %s", job.incident_id, reason)

    def _note(self, incident_id: str, action: str, detail: str, at: float,
              actor: str = "dispatcher") -> None:
        """An audit line that does not change the incident's state."""
        self.server.storage.note(incident_id, actor, action, detail)

    def _send(self, job: Job, post: dict[str, Any], targets: Sequence[Choice], kind: str,
              now: float, actor: str = "dispatcher") -> list[PageRow]:
        deadline = now + self.config.answer_timeout_s
        rows = [PageRow(new_ulid(now), job.incident_id, c.team_id, kind, now, deadline)
                for c in targets]
        if kind == "broadcast":
            job.rounds += 1
            what = (f"broadcast round {job.rounds} to {len(rows)} teams within "
                    f"{self.config.broadcast_radius_km:g} km: {', '.join(r.team_id for r in rows)}")
        else:
            job.attempts += kind == "direct"
            c = targets[0]
            where = (f"{c.distance_km:.2f} km, ETA {c.distance_km / self.config.speed_kmh * 60:.0f} min"
                     if c.distance_km is not None else "position unknown")
            what = f"paged team {c.team_id} ({where}{', own zone' if c.in_zone else ''})"
        try:
            with self.db.atomic():
                self.db.conn.executemany(
                    "INSERT INTO pages (id, incident_id, team_id, kind, sent_at, deadline, state) "
                    "VALUES (?, ?, ?, ?, ?, ?, 'waiting')",
                    [(r.id, r.incident_id, r.team_id, r.kind, r.sent_at, r.deadline) for r in rows])
                self.db.execute(
                    "UPDATE dispatch SET state='paging', reason='', attempts=?, rounds=?, "
                    "first_page_at=coalesce(first_page_at, ?), updated_at=? WHERE incident_id=?",
                    (job.attempts, job.rounds, now, now, job.incident_id))
                self.server.transition(job.incident_id, "paged", actor, reason=what)
        except (InvalidTransition, LookupError) as exc:
            if kind == "broadcast":
                job.rounds -= 1
            elif kind == "direct":
                job.attempts -= 1
            row = self.db.execute("SELECT state FROM incidents WHERE id=?",
                                  (job.incident_id,)).fetchone()
            if row is None or row[0] in CLOSED:
                log.info("incident %s closed meanwhile; not paged", job.incident_id)
                self._finish(job, row[0] if row else "cancelled", now)
                return []
            raise DispatchError(f"incident {job.incident_id} cannot be paged now: {exc}") from None
        job.state, job.reason = "paging", ""
        for r in rows:
            job.pages[r.id] = r
            self._set_committed(r.team_id, job.incident_id)
        self.server.metrics.inc("pages_sent_total", len(rows), kind=kind)
        self._arm(job)
        self._spawn(self._publish_pages(rows, post))
        return rows

    def _page_message(self, row: PageRow, post: dict[str, Any] | None = None) -> Page:
        post = post or self._post(self.jobs[row.incident_id].post_id)
        job = self.jobs[row.incident_id]
        return Page(id=row.id, team=row.team_id, incident=row.incident_id, post=job.post_id,
                    post_name=post["name"][:200], school=post["school"][:200],
                    address=post["address"][:200], lat=post["lat"], lon=post["lon"],
                    what="alarm: the button at the school gate was pressed", ts=row.sent_at,
                    deadline=row.deadline, broadcast=row.kind == "broadcast")

    async def _publish_pages(self, rows: list[PageRow], post: dict[str, Any] | None = None) -> None:
        for row in rows:
            if row.state != "waiting" or row.incident_id not in self.jobs:
                continue
            message = self._page_message(row, post)
            team = self.teams.get(row.team_id)
            ok = False
            for notifier in self.notifiers:
                try:
                    await notifier.page(team, message)
                    ok = True
                except Exception as exc:
                    # An optional channel (the patrol web app with no phone connected) is quiet.
                    quiet = getattr(notifier, "optional", False) and isinstance(
                        exc, NotifierUnavailable)
                    log.log(logging.DEBUG if quiet else logging.WARNING,
                            "page %s to team %s via %s not sent: %s", row.id, row.team_id,
                            notifier.name, exc)
            if ok and row.published_at is None:
                row.published_at = time.time()
                self.db.execute("UPDATE pages SET published_at=? WHERE id=?",
                                (row.published_at, row.id))

    def _withdraw(self, rows: Iterable[PageRow], reason: str) -> None:
        now = time.time()
        notices = [PageWithdrawn(page=r.id, team=r.team_id, incident=r.incident_id,
                                 reason=reason, ts=now) for r in rows]  # type: ignore[arg-type]
        if notices:
            self._spawn(self._publish_withdrawals(notices))

    async def _publish_withdrawals(self, notices: list[PageWithdrawn]) -> None:
        for notice in notices:
            for notifier in self.notifiers:
                try:
                    await notifier.withdraw(self.teams.get(notice.team), notice)
                except Exception as exc:
                    log.info("withdrawal of page %s not sent via %s: %s", notice.page,
                             notifier.name, exc)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _arm(self, job: Job) -> None:
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        waiting = job.waiting()
        if not waiting:
            return
        delay = max(min(p.deadline for p in waiting) - time.time(), 0.0)
        job.timer = asyncio.get_running_loop().call_later(delay, self._deadline, job.incident_id)

    def _deadline(self, incident_id: str) -> None:
        try:
            self._expire(incident_id)
        except Exception:
            self.server.metrics.inc("dispatch_errors_total")
            log.exception("dispatcher failed on the deadline of incident %s", incident_id)

    def _expire(self, incident_id: str) -> None:
        job = self.jobs.get(incident_id)
        if job is None:
            return
        job.timer = None
        now = time.time()
        expired = [p for p in job.waiting() if p.deadline <= now + 0.001]
        if not expired:
            self._arm(job)
            return
        with self.db.atomic():
            for p in expired:
                p.state, p.answered_at = "timeout", now
                self.db.execute("UPDATE pages SET state='timeout', answered_at=? WHERE id=?",
                                (now, p.id))
            self._note(incident_id, "page_timeout",
                       f"no answer in {self.config.answer_timeout_s:g} s from "
                       + ", ".join(p.team_id for p in expired), now)
        self.server.metrics.inc("pages_timed_out_total", len(expired))
        for p in expired:
            self._set_committed(p.team_id, None)
        self._withdraw(expired, "timeout")
        log.info("incident %s: %d pages timed out", incident_id, len(expired))
        self._dispatch(job)
        self.drain()

    def drain(self) -> None:
        """Page queued incidents (oldest first) while teams are free."""
        for job in sorted((j for j in self.jobs.values() if j.state == "queued"),
                          key=lambda j: j.opened_at):
            if not (self.index.device_ok & self.index.free).any():
                return
            self._dispatch(job)

    def _closed(self, incident_id: str, state: str) -> None:
        job = self.jobs.get(incident_id)
        if job is None:
            return
        self._finish(job, state, time.time())
        self.drain()

    def _finish(self, job: Job, state: str, now: float) -> None:
        waiting = job.waiting()
        with self.db.atomic():
            for p in waiting:
                p.state, p.answered_at = "withdrawn", now
                self.db.execute("UPDATE pages SET state='withdrawn', answered_at=?, detail=? "
                                "WHERE id=?", (now, f"incident {state}", p.id))
            self.db.execute("UPDATE dispatch SET state='done', closed_at=?, updated_at=? "
                            "WHERE incident_id=?", (now, now, job.incident_id))
        if job.timer is not None:
            job.timer.cancel()
        for p in waiting:
            self._set_committed(p.team_id, None)
        if job.team_id and self.committed.get(job.team_id) == job.incident_id:
            self._set_committed(job.team_id, None)
        accepted = [p for p in job.pages.values() if p.state == "accepted"]
        self._withdraw(waiting + accepted, "closed")  # the assigned team is free again too
        job.state = "done"
        self.jobs.pop(job.incident_id, None)

    # ------------------------------------------------------------------ team messages
    def handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """A message from a team's device. Never raises (bad input is counted and logged)."""
        try:
            self._handle(topic, payload, retained)
        except Exception:
            self.server.metrics.inc("dispatch_errors_total")
            kind = topic.rsplit("/", 1)[-1]
            self.server.metrics.inc("handler_errors_total",
                                    kind=f"team_{kind}" if kind in TEAM_KINDS else "other")
            log.exception("dispatcher failed on a message on %s (%d bytes)", topic[:120],
                          len(payload))

    def _handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        try:
            self.receive(topic, payload)
        except Rejected as exc:
            self.server.reject(exc.reason, topic, exc.detail, retained=retained, size=len(payload))

    def receive(self, topic: str, payload: bytes) -> None:
        """Decode, check and apply one team message (MQTT, or the patrol web app, which builds
        the same payload); raise :class:`Rejected` with the reason if refused."""
        team_id, message = decode_from_team(topic, payload)
        if team_id not in self.teams and time.monotonic() - self._last_reload > 1.0:
            self.reload_teams()  # added a moment ago by `alarmpost patrol team add`?
        if team_id not in self.teams:
            raise Rejected("unknown_team", f"team {team_id!r} is not registered")
        now = time.time()
        if message.ts > now + self.config.max_clock_skew_s:
            raise Rejected("future_timestamp", f"ts {message.ts:.0f} is ahead of now")
        self.server.metrics.inc("team_messages_total", kind=topic.rsplit("/", 1)[1])
        if isinstance(message, TeamPosition):
            self._position(team_id, message, now)
        elif isinstance(message, TeamStatus):
            self._status(team_id, message)
        elif isinstance(message, PageAnswer):
            self.answer(team_id, message)

    def _position(self, team_id: str, message: TeamPosition, now: float) -> None:
        if message.ts < now - self.config.position_max_age_s:
            raise Rejected("stale_position", f"position is {now - message.ts:.0f} s old "
                           f"(max {self.config.position_max_age_s:g} s)")
        live = self.live[team_id]
        if live.position_at is not None and message.ts < live.position_at:
            return  # an older position arriving late
        was_known = live.position_at is not None and live.position_at >= now - self.config.position_max_age_s
        live.lat, live.lon, live.position_at, live.dirty = message.lat, message.lon, message.ts, True
        self.index.set_position(team_id, message.lat, message.lon, message.ts)
        if not was_known and live.status == "available" and team_id not in self.committed:
            self.drain()

    def _status(self, team_id: str, message: TeamStatus) -> None:
        live = self.live[team_id]
        if live.status == message.state:
            return
        live.status, live.status_at = message.state, message.ts
        self.db.execute(
            "INSERT INTO team_live (team_id, status, status_at) VALUES (?, ?, ?) "
            "ON CONFLICT(team_id) DO UPDATE SET status=excluded.status, status_at=excluded.status_at",
            (team_id, message.state, message.ts))
        self.index.device_ok[self.index.pos[team_id]] = message.state == "available"
        self.server.bus.publish("team_status", team_id=team_id, status=message.state)
        log.info("team %s: %s%s", team_id, message.state,
                 f" ({message.reason})" if message.reason else "")
        if message.state == "available" and team_id not in self.committed:
            self.drain()

    def _flush_live(self) -> None:
        rows = [(t, lv.lat, lv.lon, lv.position_at) for t, lv in self.live.items() if lv.dirty]
        if not rows:
            return
        with self.db.atomic():
            self.db.conn.executemany(
                "INSERT INTO team_live (team_id, lat, lon, position_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(team_id) DO UPDATE SET lat=excluded.lat, lon=excluded.lon, "
                "position_at=excluded.position_at", rows)
        for t, *_ in rows:
            self.live[t].dirty = False

    def _find_page(self, page_id: str) -> tuple[Job | None, PageRow | None]:
        for job in self.jobs.values():
            page = job.pages.get(page_id)
            if page is not None:
                return job, page
        rows = list(self.db.query("SELECT * FROM pages WHERE id=?", (page_id,)))
        return None, PageRow(**rows[0]) if rows else None

    def answer(self, team_id: str, message: PageAnswer) -> None:
        """Apply a team's answer; raise :class:`Rejected` (counted by the caller) if refused."""
        job, page = self._find_page(message.page)
        if page is None or page.incident_id != message.incident:
            raise Rejected("unknown_page", f"no page {message.page} for incident {message.incident}")
        if page.team_id != team_id:
            raise Rejected("not_your_page", f"page {page.id} was sent to team {page.team_id}")
        self.server.metrics.inc("page_answers_total", answer=message.answer)
        now = time.time()
        if message.answer in ("accept", "decline"):
            if job is None or page.state != "waiting":
                state = page.state
                if job is not None and job.team_id and job.team_id != team_id:
                    state = f"taken by team {job.team_id}"
                raise Rejected("page_closed", f"page {page.id} is no longer open ({state})")
            if message.answer == "accept":
                self._accept(job, page, now)
            else:
                self._decline(job, page, message.detail, now)
            return
        if job is None or job.state != "assigned" or job.team_id != team_id \
                or page.state != "accepted":
            raise Rejected("not_assigned", f"team {team_id} is not assigned to incident "
                           f"{message.incident}")
        actor = f"team:{team_id}"
        try:
            if message.answer == "resolved":
                if message.classification not in CLASSIFICATIONS:
                    raise Rejected("classification_required",
                                   f"resolving needs one of: {', '.join(CLASSIFICATIONS)}")
                self.server.transition(job.incident_id, "resolved", actor,
                                       classification=message.classification,
                                       reason=message.detail)
                self._closed(job.incident_id, "resolved")
                return
            column = "en_route_at" if message.answer == "en_route" else "on_scene_at"
            with self.db.atomic():
                self.server.transition(job.incident_id, message.answer, actor,
                                       reason=message.detail)
                self.db.execute(f"UPDATE dispatch SET {column}=coalesce({column}, ?), "
                                "updated_at=? WHERE incident_id=?", (now, now, job.incident_id))
        except InvalidTransition as exc:
            raise Rejected("not_assigned", str(exc)) from None

    def _accept(self, job: Job, page: PageRow, now: float) -> None:
        others = [p for p in job.waiting() if p.id != page.id]
        with self.db.atomic():
            page.state, page.answered_at = "accepted", now
            self.db.execute("UPDATE pages SET state='accepted', answered_at=? WHERE id=?",
                            (now, page.id))
            for p in others:
                p.state, p.answered_at = "withdrawn", now
                self.db.execute("UPDATE pages SET state='withdrawn', answered_at=?, detail=? "
                                "WHERE id=?", (now, f"taken by team {page.team_id}", p.id))
            self.db.execute("UPDATE dispatch SET state='assigned', team_id=?, accepted_at=?, "
                            "updated_at=? WHERE incident_id=?",
                            (page.team_id, now, now, job.incident_id))
            try:
                self.server.transition(job.incident_id, "accepted", f"team:{page.team_id}",
                                       reason=f"page {page.id}")
            except InvalidTransition as exc:
                page.state = "waiting"
                for p in others:
                    p.state = "waiting"
                raise Rejected("page_closed", str(exc)) from None
        job.state, job.team_id = "assigned", page.team_id
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        for p in others:
            self._set_committed(p.team_id, None)
        self._withdraw(others, "taken")
        log.info("incident %s accepted by team %s", job.incident_id, page.team_id)
        if others:
            self.drain()

    def _decline(self, job: Job, page: PageRow, detail: str, now: float) -> None:
        with self.db.atomic():
            page.state, page.answered_at = "declined", now
            self.db.execute("UPDATE pages SET state='declined', answered_at=?, detail=? "
                            "WHERE id=?", (now, detail, page.id))
            self._note(job.incident_id, "page_declined", detail or "declined", now,
                       actor=f"team:{page.team_id}")
        self._set_committed(page.team_id, None)
        log.info("incident %s declined by team %s", job.incident_id, page.team_id)
        self._arm(job)
        self._dispatch(job)
        self.drain()

    # ------------------------------------------------------------------ operator overrides
    def _job(self, incident_id: str) -> Job:
        job = self.jobs.get(incident_id)
        if job is None:
            raise DispatchError(f"incident {incident_id!r} is not being dispatched "
                                "(unknown, closed, or a test)")
        row = self.db.execute("SELECT state FROM incidents WHERE id=?", (incident_id,)).fetchone()
        if row is None or row[0] not in ("new", "acknowledged", "paged", "accepted", "en_route"):
            raise DispatchError(f"incident {incident_id} is {row[0] if row else 'gone'}: "
                                "it cannot be paged again")
        return job

    def _release(self, job: Job, actor: str, reason: str, now: float) -> None:
        """Withdraw the open pages and the assignment of ``job`` (operator overrides)."""
        waiting = job.waiting()
        assigned = job.team_id if job.state == "assigned" else None
        with self.db.atomic():
            for p in waiting:
                p.state, p.answered_at = "withdrawn", now
                self.db.execute("UPDATE pages SET state='withdrawn', answered_at=?, detail=? "
                                "WHERE id=?", (now, f"{actor}: {reason}", p.id))
            if assigned:
                for p in job.pages.values():
                    if p.state == "accepted":
                        p.state = "withdrawn"
                        self.db.execute("UPDATE pages SET state='withdrawn', detail=? WHERE id=?",
                                        (f"{actor}: {reason}", p.id))
                self.db.execute("UPDATE dispatch SET team_id=NULL, state='queued', updated_at=? "
                                "WHERE incident_id=?", (now, job.incident_id))
        for p in waiting:
            self._set_committed(p.team_id, None)
        notices = list(waiting)
        if assigned:
            self._set_committed(assigned, None)
            notices += [p for p in job.pages.values()
                        if p.team_id == assigned and p.state == "withdrawn"][-1:]
        self._withdraw(notices, "reassigned")
        job.team_id, job.state = None, "queued"
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None

    def page_team(self, incident_id: str, team_id: str, actor: str, reason: str = "") -> str:
        """Operator: page this team now (open pages and any assignment are withdrawn).
        Returns the page id; raises :class:`DispatchError`."""
        job = self._job(incident_id)
        if team_id not in self.teams:
            raise DispatchError(f"no team {team_id!r}")
        busy = self.committed.get(team_id)
        if busy is not None and busy != incident_id:
            raise DispatchError(f"team {team_id} is busy with incident {busy}")
        now = time.time()
        self._release(job, actor, reason or f"operator paged team {team_id}", now)
        live = self.live[team_id]
        dist = None
        post = self._post(job.post_id)
        if live.lat is not None and post["lat"] is not None:
            from server.patrol import haversine_km

            dist = haversine_km(live.lat, live.lon or 0.0, post["lat"], post["lon"])
        job.exclude.discard(team_id)
        rows = self._send(job, post, [Choice(team_id, dist, False)], "operator", now, actor=actor)
        if not rows:
            raise DispatchError(f"incident {incident_id} is closed")
        return rows[0].id

    def cancel_page(self, page_id: str, actor: str, reason: str = "") -> None:
        """Operator: stop paging this team; the incident goes on to the next team."""
        job, page = self._find_page(page_id)
        if job is None or page is None or page.state != "waiting":
            raise DispatchError(f"page {page_id!r} is not waiting for an answer")
        now = time.time()
        with self.db.atomic():
            page.state, page.answered_at = "cancelled", now
            self.db.execute("UPDATE pages SET state='cancelled', answered_at=?, detail=? "
                            "WHERE id=?", (now, f"{actor}: {reason}", page.id))
            self._note(job.incident_id, "page_cancelled",
                       f"page to team {page.team_id} cancelled{': ' + reason if reason else ''}",
                       now, actor=actor)
        self._set_committed(page.team_id, None)
        self._withdraw([page], "cancelled")
        self._arm(job)
        self._dispatch(job)
        self.drain()

    def redispatch(self, incident_id: str, actor: str, reason: str = "",
                   exclude_current: bool = True) -> None:
        """Operator: start over (the current team, if any, is released and left out)."""
        job = self._job(incident_id)
        now = time.time()
        previous = job.team_id or next((p.team_id for p in job.waiting()), None)
        self._release(job, actor, reason or "re-dispatch", now)
        if exclude_current and previous:
            job.exclude.add(previous)
        job.attempts = 0
        with self.db.atomic():
            self.db.execute("UPDATE dispatch SET attempts=0, exclude=?, updated_at=? "
                            "WHERE incident_id=?",
                            (json.dumps(sorted(job.exclude)), now, incident_id))
            self._note(incident_id, "redispatch", reason or "re-dispatch", now, actor=actor)
        # Pages of the previous rounds no longer count as tried or declined.
        for p in job.pages.values():
            if not p.kind.endswith("-old"):
                p.kind += "-old"
        self.db.execute("UPDATE pages SET kind = kind || '-old' WHERE incident_id=? "
                        "AND kind NOT LIKE '%-old'", (incident_id,))
        self._dispatch(job)
        self.drain()

    # ------------------------------------------------------------------ views
    def incident_summary(self, incident_id: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM dispatch WHERE incident_id=?", (incident_id,)))
        if not rows:
            return None
        d = rows[0]
        pages = list(self.db.query(
            "SELECT id, team_id, kind, sent_at, deadline, state, published_at, answered_at, detail "
            "FROM pages WHERE incident_id=? ORDER BY sent_at, id", (incident_id,)))

        def span(a: float | None, b: float | None) -> float | None:
            return round(b - a, 3) if a is not None and b is not None else None

        return {
            "state": d["state"], "team_id": d["team_id"], "reason": d["reason"],
            "direct_pages": d["attempts"], "broadcast_rounds": d["rounds"],
            "times": {
                "press_to_page_s": span(d["pressed_at"], d["first_page_at"]),
                "page_to_accept_s": span(d["first_page_at"], d["accepted_at"]),
                "accept_to_on_scene_s": span(d["accepted_at"], d["on_scene_at"]),
                "pressed_at": d["pressed_at"], "first_page_at": d["first_page_at"],
                "accepted_at": d["accepted_at"], "en_route_at": d["en_route_at"],
                "on_scene_at": d["on_scene_at"], "closed_at": d["closed_at"],
            },
            "pages": pages,
        }

    def team_view(self, team_id: str) -> dict[str, Any] | None:
        team = self.teams.get(team_id)
        if team is None:
            return None
        live = self.live[team_id]
        now = time.time()
        known = live.position_at is not None and live.position_at >= now - self.config.position_max_age_s
        busy = self.committed.get(team_id)
        job = self.jobs.get(busy) if busy else None
        if not on_shift(team.shift_minutes(), minute_of_day(now)):
            state = "off_shift"
        elif job is not None and job.state == "assigned" and job.team_id == team_id:
            state = "assigned"
        elif job is not None:
            state = "paged"
        else:
            state = live.status or "unknown"
        return {
            **team.as_dict(),
            "state": state, "device_status": live.status, "status_at": live.status_at,
            "incident_id": busy,
            "position": {"lat": live.lat, "lon": live.lon, "at": live.position_at,
                         "known": known},
        }

    def team_views(self) -> list[dict[str, Any]]:
        return [v for t in sorted(self.teams) if (v := self.team_view(t)) is not None]
