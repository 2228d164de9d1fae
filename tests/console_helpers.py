"""Helpers for console tests: accounts, a logged-in HTTP client with cookies, the WebSocket."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from server.app import CentralServer
from server.console.auth import Accounts
from tests.helpers import BrowserClient

PASSWORD = "correct horse battery"


def add_users(server: CentralServer, *names_roles: tuple[str, str]) -> None:
    accounts = Accounts(server.storage.db)  # type: ignore[attr-defined]
    for name, role in names_roles:
        accounts.add_user(name, role, PASSWORD)


class Console(BrowserClient):
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
