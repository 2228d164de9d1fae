"""Operator overrides from the console: page a chosen team, cancel a page, re-dispatch."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from server.dispatch.selection import Choice
from server.dispatch.state import DispatcherBase, DispatchError, Job
from server.patrol import haversine_km

if TYPE_CHECKING:
    pass

log = logging.getLogger("alarmpost.dispatch")

class OperatorOverrides(DispatcherBase):
    def _job(self, incident_id: str) -> Job:
        job = self.jobs.get(incident_id)
        if job is None:
            raise DispatchError(f"incident {incident_id!r} is not being dispatched "
                                "(unknown, closed, or a test)")
        state = self.incidents.state(incident_id)
        if state not in ("new", "acknowledged", "paged", "accepted", "en_route"):
            raise DispatchError(f"incident {incident_id} is {state or 'gone'}: "
                                "it cannot be paged again")
        return job

    def _release(self, job: Job, actor: str, reason: str, now: float) -> None:
        """Withdraw the open pages and the assignment of ``job`` (operator overrides)."""
        waiting = job.waiting()
        assigned = job.team_id if job.state == "assigned" else None
        with self.db.transaction():
            for p in waiting:
                p.state, p.answered_at = "withdrawn", now
                self.store.set_page(p.id, "withdrawn", now, f"{actor}: {reason}")
            if assigned:
                for p in job.pages.values():
                    if p.state == "accepted":
                        p.state = "withdrawn"
                        self.store.set_page(p.id, "withdrawn", detail=f"{actor}: {reason}")
                self.store.unassign(job.incident_id, now)
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
        with self.db.transaction():
            page.state, page.answered_at = "cancelled", now
            self.store.set_page(page.id, "cancelled", now, f"{actor}: {reason}")
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
        with self.db.transaction():
            self.store.restart(incident_id, job.exclude, now)
            self._note(incident_id, "redispatch", reason or "re-dispatch", now, actor=actor)
        # Pages of the previous rounds no longer count as tried or declined.
        for p in job.pages.values():
            if not p.kind.endswith("-old"):
                p.kind += "-old"
        self._dispatch(job)
        self.drain()
