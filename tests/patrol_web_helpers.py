"""Helpers for the patrol web app's tests: app passwords, a phone-like HTTP client."""

from __future__ import annotations

import time

from provisioning import deployment as d
from server.web.patrol import set_app_password
from tests.console_helpers import FromAddress
from tests.storage_helpers import server_storage

APP_PASSWORD = "patrol car password"


def give_app_passwords(dep: d.Deployment, *team_ids: str) -> None:
    storage = server_storage(dep.server_config)
    try:
        for team_id in team_ids:
            set_app_password(storage.teams, team_id, APP_PASSWORD)
    finally:
        storage.close()


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
