"""The dispatch state machine: incident opened → page → answer or timeout → escalate, broadcast, queue."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from protocol.messages import (
    Page,
    PageWithdrawn,
)
from protocol.ulid import new_ulid
from server.bus import Bus, DispatchQueued, IncidentOpened, IncidentUpdated, Notice, Overflow
from server.config import DispatchSection
from server.dispatch.notifiers import MqttNotifier, Notifier, NotifierUnavailable
from server.dispatch.selection import Choice, TeamIndex
from server.dispatch.state import (
    DispatcherBase,
    DispatchError,
    Job,
    PageRow,
    Reject,
    TeamLive,
    Transition,
)
from server.incidents import CLOSED, InvalidTransition
from server.metrics import Metrics
from server.patrol import (
    Team,
    load_teams,
)
from server.storage import Storage

if TYPE_CHECKING:
    import aiomqtt

log = logging.getLogger("alarmpost.dispatch")

class DispatchMachine(DispatcherBase):
    """Incidents in, pages out: choose, page, time out, escalate, broadcast, queue, drain."""

    def __init__(self, config: DispatchSection, storage: Storage, bus: Bus, metrics: Metrics,
                 transition: Transition, reject: Reject) -> None:
        self.config = config
        self.bus = bus
        self.metrics = metrics
        self.transition = transition
        self.reject = reject
        self.db = storage.db  # for transactions that span stores
        self.store = storage.dispatch
        self.team_store = storage.teams
        self.incidents = storage.incidents
        self.posts = storage.posts
        self.mqtt = MqttNotifier()
        self.notifiers: list[Notifier] = [self.mqtt]
        self.teams: dict[str, Team] = {}
        self.live: dict[str, TeamLive] = {}
        self.index = TeamIndex(())
        self.jobs: dict[str, Job] = {}  # active (not done), by incident id
        self.committed: dict[str, str] = {}  # team id -> incident id (open page or assignment)
        self._notices = bus.subscribe()
        self._tasks: set[asyncio.Task[None]] = set()
        self._data_version = -1
        self._last_reload = 0.0
        self._setup_metrics()
        self.reload_teams()
        self._load_jobs()

    # ------------------------------------------------------------------ setup
    def _setup_metrics(self) -> None:
        m = self.metrics
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
        self.teams = load_teams(self.team_store)
        stored = self.team_store.live()
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
        return self.team_store.version()

    def _load_jobs(self) -> None:
        """Rebuild the in-memory state from the database (server start)."""
        rows = self.store.active_jobs()
        for row in rows:
            job = Job(row["incident_id"], row["post_id"], row["state"], row["opened_at"],
                      row["pressed_at"], row["team_id"], row["attempts"], row["rounds"],
                      row["reason"], row["exclude"])
            for p in row["pages"]:
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
                    log.exception("dispatcher failed on %s", type(notice).__name__)
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
        self.bus.unsubscribe(self._notices)
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

    def _on_notice(self, notice: Notice) -> None:
        if isinstance(notice, IncidentOpened):
            self.incident_opened(notice.incident_id, notice.post_id, notice.pressed_at)
        elif isinstance(notice, IncidentUpdated) and notice.state in CLOSED:
            self._closed(notice.incident_id, notice.state)
        elif isinstance(notice, Overflow):
            self._reconcile()

    def _reconcile(self) -> None:
        """Incidents opened while nobody listened get a job; jobs of closed incidents end."""
        if not self.config.enabled:
            return
        for row in self.incidents.active_not_in_dispatch():
            self.incident_opened(row["id"], row["post_id"], row["pressed_at"])
        for job in list(self.jobs.values()):
            state = self.incidents.state(job.incident_id)
            if state is None or state in CLOSED:
                self._closed(job.incident_id, state or "cancelled")

    # ------------------------------------------------------------------ incidents
    def incident_opened(self, incident_id: str, post_id: str, pressed_at: float | None) -> None:
        if not self.config.enabled or incident_id in self.jobs:
            return
        row = self.incidents.first_event(incident_id)
        if row is None:
            return
        if row["type"] == "test" and not self.config.page_test_events:
            return
        if row["classification"] == "test":  # opened while its post was in test mode: never paged
            return
        now = time.time()
        if not self.store.open_job(incident_id, post_id, pressed_at, row["opened_at"], now):
            return
        job = Job(incident_id, post_id, "queued", row["opened_at"], pressed_at)
        self.jobs[incident_id] = job
        self._dispatch(job)

    def _post(self, post_id: str) -> dict[str, Any]:
        return self.posts.place(post_id)

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
        with self.db.transaction():
            self.store.queue(job.incident_id, reason, now)
            self._note(job.incident_id, "dispatch_queued", reason, now)
        self.metrics.inc("dispatch_queued_total")
        self.bus.publish(DispatchQueued(incident_id=job.incident_id, post_id=job.post_id,
                                        reason=reason))
        log.warning("incident %s queued: %s", job.incident_id, reason)

    def _note(self, incident_id: str, action: str, detail: str, at: float,
              actor: str = "dispatcher") -> None:
        """An audit line that does not change the incident's state."""
        self.incidents.note(incident_id, actor, action, detail)

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
            with self.db.transaction():
                self.store.add_pages(
                    [(r.id, r.incident_id, r.team_id, r.kind, r.sent_at, r.deadline) for r in rows])
                self.store.paging(job.incident_id, job.attempts, job.rounds, now)
                self.transition(job.incident_id, "paged", actor, reason=what)
        except (InvalidTransition, LookupError) as exc:
            if kind == "broadcast":
                job.rounds -= 1
            elif kind == "direct":
                job.attempts -= 1
            state = self.incidents.state(job.incident_id)
            if state is None or state in CLOSED:
                log.info("incident %s closed meanwhile; not paged", job.incident_id)
                self._finish(job, state or "cancelled", now)
                return []
            raise DispatchError(f"incident {job.incident_id} cannot be paged now: {exc}") from None
        job.state, job.reason = "paging", ""
        for r in rows:
            job.pages[r.id] = r
            self._set_committed(r.team_id, job.incident_id)
        self.metrics.inc("pages_sent_total", len(rows), kind=kind)
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
                self.store.published(row.id, row.published_at)

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
            self.metrics.inc("dispatch_errors_total")
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
        with self.db.transaction():
            for p in expired:
                p.state, p.answered_at = "timeout", now
                self.store.set_page(p.id, "timeout", now)
            self._note(incident_id, "page_timeout",
                       f"no answer in {self.config.answer_timeout_s:g} s from "
                       + ", ".join(p.team_id for p in expired), now)
        self.metrics.inc("pages_timed_out_total", len(expired))
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
        with self.db.transaction():
            for p in waiting:
                p.state, p.answered_at = "withdrawn", now
                self.store.set_page(p.id, "withdrawn", now, f"incident {state}")
            self.store.finish(job.incident_id, now)
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
