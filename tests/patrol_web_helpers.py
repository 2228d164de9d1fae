"""Helpers for the patrol web app's tests: app passwords, a phone-like HTTP client."""

from __future__ import annotations

import time

import sqlite_utils

from provisioning import deployment as d
from server.patrol_web import set_app_password
from tests.console_helpers import FromAddress

APP_PASSWORD = "patrol car password"


def give_app_passwords(dep: d.Deployment, *team_ids: str) -> None:
    db = sqlite_utils.Database(dep.directory / "server.db")
    try:
        for team_id in team_ids:
            set_app_password(db, team_id, APP_PASSWORD)
    finally:
        db.close()


class Phone(FromAddress):
    """One team's phone."""

    prefix = "/patrol"
    login_field = "team"
    default_password = APP_PASSWORD

    async def on_duty(self, lat: float, lon: float) -> None:
        status, body = await self.post("/patrol/api/status", {"state": "available"})
        assert status == 200, body
        status, body = await self.post("/patrol/api/position",
                                       {"lat": lat, "lon": lon, "ts": time.time()})
        assert status == 200, body
