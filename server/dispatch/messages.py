"""Messages from patrol teams' devices (and the patrol web app): position, status, answers."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from protocol.messages import (
    PageAnswer,
    Rejected,
    TeamPosition,
    TeamStatus,
    decode_from_team,
)
from protocol.topics import TEAM_KINDS
from server.bus import TeamStatusChanged
from server.dispatch.state import DispatcherBase, Job, PageRow
from server.incidents import CLASSIFICATIONS, InvalidTransition

if TYPE_CHECKING:
    pass

log = logging.getLogger("alarmpost.dispatch")

class TeamMessages(DispatcherBase):
    def handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """A message from a team's device. Never raises (bad input is counted and logged)."""
        try:
            self._handle(topic, payload, retained)
        except Exception:
            self.metrics.inc("dispatch_errors_total")
            kind = topic.rsplit("/", 1)[-1]
            self.metrics.inc("handler_errors_total",
                                    kind=f"team_{kind}" if kind in TEAM_KINDS else "other")
            log.exception("dispatcher failed on a message on %s (%d bytes)", topic[:120],
                          len(payload))

    def _handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        try:
            self.receive(topic, payload)
        except Rejected as exc:
            self.reject(exc.reason, topic, exc.detail, retained=retained, size=len(payload))

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
        self.metrics.inc("team_messages_total", kind=topic.rsplit("/", 1)[1])
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
        self.team_store.set_status(team_id, message.state, message.ts)
        self.index.device_ok[self.index.pos[team_id]] = message.state == "available"
        self.bus.publish(TeamStatusChanged(team_id=team_id, status=message.state))
        log.info("team %s: %s%s", team_id, message.state,
                 f" ({message.reason})" if message.reason else "")
        if message.state == "available" and team_id not in self.committed:
            self.drain()

    def _flush_live(self) -> None:
        rows = [(t, lv.lat, lv.lon, lv.position_at) for t, lv in self.live.items() if lv.dirty]
        if not rows:
            return
        self.team_store.save_positions(rows)
        for t, *_ in rows:
            self.live[t].dirty = False

    def _find_page(self, page_id: str) -> tuple[Job | None, PageRow | None]:
        for job in self.jobs.values():
            page = job.pages.get(page_id)
            if page is not None:
                return job, page
        row = self.store.page(page_id)
        return None, PageRow(**row) if row else None

    def answer(self, team_id: str, message: PageAnswer) -> None:
        """Apply a team's answer; raise :class:`Rejected` (counted by the caller) if refused."""
        job, page = self._find_page(message.page)
        if page is None or page.incident_id != message.incident:
            raise Rejected("unknown_page", f"no page {message.page} for incident {message.incident}")
        if page.team_id != team_id:
            raise Rejected("not_your_page", f"page {page.id} was sent to team {page.team_id}")
        self.metrics.inc("page_answers_total", answer=message.answer)
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
                self.transition(job.incident_id, "resolved", actor,
                                       classification=message.classification,
                                       reason=message.detail)
                self._closed(job.incident_id, "resolved")
                return
            column = "en_route_at" if message.answer == "en_route" else "on_scene_at"
            with self.db.transaction():
                self.transition(job.incident_id, message.answer, actor,
                                       reason=message.detail)
                self.store.mark_time(job.incident_id, column, now)
        except InvalidTransition as exc:
            raise Rejected("not_assigned", str(exc)) from None

    def _accept(self, job: Job, page: PageRow, now: float) -> None:
        others = [p for p in job.waiting() if p.id != page.id]
        with self.db.transaction():
            page.state, page.answered_at = "accepted", now
            self.store.set_page(page.id, "accepted", now)
            for p in others:
                p.state, p.answered_at = "withdrawn", now
                self.store.set_page(p.id, "withdrawn", now, f"taken by team {page.team_id}")
            self.store.assign(job.incident_id, page.team_id, now)
            try:
                self.transition(job.incident_id, "accepted", f"team:{page.team_id}",
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
        with self.db.transaction():
            page.state, page.answered_at = "declined", now
            self.store.set_page(page.id, "declined", now, detail)
            self._note(job.incident_id, "page_declined", detail or "declined", now,
                       actor=f"team:{page.team_id}")
        self._set_committed(page.team_id, None)
        log.info("incident %s declined by team %s", job.incident_id, page.team_id)
        self._arm(job)
        self._dispatch(job)
        self.drain()
