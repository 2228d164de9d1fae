"""What the console and the API show of dispatch: per incident, per team."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from server.dispatch.state import DispatcherBase
from server.patrol import (
    minute_of_day,
    on_shift,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger("alarmpost.dispatch")

class DispatchViews(DispatcherBase):
    def incident_summary(self, incident_id: str) -> dict[str, Any] | None:
        d = self.store.job(incident_id)
        if d is None:
            return None
        pages = [{k: v for k, v in p.items() if k != "incident_id"}
                 for p in self.store.pages(incident_id)]

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
