"""Helpers for the patrol web app's tests: app passwords, a phone-like HTTP client."""

from __future__ import annotations

import re
import time
from typing import Any

import aiohttp
import sqlite_utils

from provisioning import deployment as d
from server.patrol_web import set_app_password

APP_PASSWORD = "patrol car password"


def give_app_passwords(dep: d.Deployment, *team_ids: str) -> None:
    db = sqlite_utils.Database(dep.directory / "server.db")
    try:
        for team_id in team_ids:
            set_app_password(db, team_id, APP_PASSWORD)
    finally:
        db.close()


class Phone:
    """One team's phone: its own cookie jar, the CSRF token, same-origin headers."""

    def __init__(self, dep: d.Deployment) -> None:
        self.base = f"http://127.0.0.1:{dep.http_port}"
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def __aenter__(self) -> Phone:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    async def login(self, team: str, password: str = APP_PASSWORD) -> aiohttp.ClientResponse:
        async with self.http.get(f"{self.base}/patrol/login") as resp:
            page = await resp.text()
        match = re.search(r'name="csrf" content="([^"]+)"', page)
        assert match, page[:300]
        async with self.http.post(
            f"{self.base}/patrol/api/login", json={"team": team, "password": password},
            headers={"X-CSRF-Token": match.group(1), "Origin": self.base},
        ) as resp:
            if resp.status == 200:
                self.csrf = (await resp.json())["csrf"]
            await resp.read()
            return resp

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(f"{self.base}{path}", allow_redirects=False) as resp:
            body = await resp.json() if resp.content_type == "application/json" else await resp.text()
            return resp.status, body

    async def post(self, path: str, body: Any = None, *, csrf: str | None = None,
                   origin: str | None = None, raw: bytes | None = None) -> tuple[int, Any]:
        headers = {"Origin": origin if origin is not None else self.base}
        token = self.csrf if csrf is None else csrf
        if token:
            headers["X-CSRF-Token"] = token
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else {
            "json": body if body is not None else {}}
        async with self.http.post(f"{self.base}{path}", headers=headers, allow_redirects=False,
                                  **kwargs) as resp:
            data = await resp.json() if resp.content_type == "application/json" else await resp.text()
            return resp.status, data

    async def on_duty(self, lat: float, lon: float) -> None:
        status, body = await self.post("/patrol/api/status", {"state": "available"})
        assert status == 200, body
        status, body = await self.post("/patrol/api/position",
                                       {"lat": lat, "lon": lon, "ts": time.time()})
        assert status == 200, body

    async def ws(self, *, csrf: str | None = None,
                 origin: str | None = None) -> aiohttp.ClientWebSocketResponse:
        token = self.csrf if csrf is None else csrf
        return await self.http.ws_connect(
            f"{self.base}/patrol/ws?csrf={token}",
            headers={"Origin": origin if origin is not None else self.base},
        )
