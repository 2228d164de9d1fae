"""Helpers for console tests: accounts, a logged-in HTTP client with cookies, the WebSocket."""

from __future__ import annotations

import asyncio
import re
from typing import Any, Self

import aiohttp

from provisioning import deployment as d
from server.app import CentralServer
from server.web.auth import Accounts
from tests.helpers import BrowserClient

PASSWORD = "correct horse battery"


def add_users(server: CentralServer, *names_roles: tuple[str, str]) -> None:
    accounts = Accounts(server.storage.accounts)
    for name, role in names_roles:
        accounts.add_user(name, role, PASSWORD)


class FromAddress(BrowserClient):
    """A browser-like client whose connections leave from ``source`` (another loopback address,
    e.g. "127.0.0.2": Linux answers the whole 127/8 on ``lo``), so the server sees another
    remote address."""

    def __init__(self, dep: d.Deployment, source: str | None = None) -> None:
        super().__init__(dep)
        self.source = source

    async def __aenter__(self) -> Self:
        if self.source is not None:
            await self.http.close()
            self.http = aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True),
                connector=aiohttp.TCPConnector(local_addr=(self.source, 0)))
        return self

    async def login_token(self) -> str:
        """Fetch the login page; its pre-login CSRF token (the cookie is kept)."""
        async with self.http.get(f"{self.base}{self.prefix}/login") as resp:
            page = await resp.text()
        match = re.search(r'name="csrf" content="([^"]+)"', page)
        assert match, page[:300]
        return match.group(1)

    async def try_login(self, token: str, who: str, password: str) -> int:
        """One login POST with a token from :meth:`login_token`; its status."""
        async with self.http.post(
            f"{self.base}{self.prefix}/api/login",
            json={self.login_field: who, "password": password},
            headers={"X-CSRF-Token": token, **self.origin},
        ) as resp:
            await resp.read()
            return resp.status


class Console(FromAddress):
    """One operator's browser."""

    prefix = "/console"
    login_field = "name"
    default_password = PASSWORD


async def next_notice(ws: aiohttp.ClientWebSocketResponse, kind: str,
                      within: float = 5.0, **match: Any) -> dict[str, Any]:
    """The next message of type ``kind`` whose fields include ``match``."""

    async def wait() -> dict[str, Any]:
        while True:
            msg = await ws.receive_json()
            if msg.get("type") == kind and all(msg.get(k) == v for k, v in match.items()):
                return dict(msg)

    return await asyncio.wait_for(wait(), within)
