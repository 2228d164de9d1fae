"""Helpers for console tests: accounts, a logged-in HTTP client with cookies, the WebSocket."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp

from provisioning import deployment as d
from server.app import CentralServer
from server.console.auth import Accounts

PASSWORD = "correct horse battery"


def add_users(server: CentralServer, *names_roles: tuple[str, str]) -> None:
    accounts = Accounts(server.storage.db)  # type: ignore[attr-defined]
    for name, role in names_roles:
        accounts.add_user(name, role, PASSWORD)


class Console:
    """One browser-like client: its own cookie jar, the CSRF token, same-origin headers."""

    def __init__(self, dep: d.Deployment) -> None:
        self.base = f"http://127.0.0.1:{dep.http_port}"
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def __aenter__(self) -> Console:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    @property
    def origin(self) -> dict[str, str]:
        return {"Origin": self.base}

    async def login(self, name: str, password: str = PASSWORD) -> aiohttp.ClientResponse:
        async with self.http.get(f"{self.base}/console/login") as resp:
            page = await resp.text()
        match = re.search(r'name="csrf" content="([^"]+)"', page)
        assert match, page[:300]
        async with self.http.post(
            f"{self.base}/console/api/login", json={"name": name, "password": password},
            headers={"X-CSRF-Token": match.group(1), **self.origin},
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
                   origin: str | None = None) -> tuple[int, Any]:
        headers = {"Origin": origin if origin is not None else self.base}
        token = self.csrf if csrf is None else csrf
        if token:
            headers["X-CSRF-Token"] = token
        async with self.http.post(f"{self.base}{path}", json=body if body is not None else {},
                                  headers=headers, allow_redirects=False) as resp:
            data = await resp.json() if resp.content_type == "application/json" else await resp.text()
            return resp.status, data

    async def ws(self, *, csrf: str | None = None,
                 origin: str | None = None) -> aiohttp.ClientWebSocketResponse:
        token = self.csrf if csrf is None else csrf
        return await self.http.ws_connect(
            f"{self.base}/console/ws?csrf={token}",
            headers={"Origin": origin if origin is not None else self.base},
        )


async def next_notice(ws: aiohttp.ClientWebSocketResponse, kind: str,
                      within: float = 5.0, **match: Any) -> dict[str, Any]:
    """The next message of type ``kind`` whose fields include ``match``."""

    async def wait() -> dict[str, Any]:
        while True:
            msg = await ws.receive_json()
            if msg.get("type") == kind and all(msg.get(k) == v for k, v in match.items()):
                return dict(msg)

    return await asyncio.wait_for(wait(), within)
