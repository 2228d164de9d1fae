"""What the web package needs of the server, and nothing more.

:class:`server.app.CentralServer` provides it; the web modules are typed against this interface,
so none of them imports the server's application module (no import cycle inside server/).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from aiohttp import web

from server.bus import Bus
from server.calls import CallRelay
from server.commands import CommandTracker
from server.config import ServerConfig
from server.dispatch import Dispatcher
from server.live import LivePost
from server.metrics import Metrics
from server.storage import Storage


class ServerHost(Protocol):
    config: ServerConfig
    storage: Storage
    metrics: Metrics
    bus: Bus
    calls: CallRelay
    commands: CommandTracker
    dispatcher: Dispatcher
    live: dict[str, LivePost]
    ready: asyncio.Event

    def transition(self, incident_id: str, to: str, actor: str, *, reason: str = "",
                   classification: str | None = None) -> dict[str, object]: ...

    def set_test_mode(self, post_id: str, on: bool, actor: str,
                      reason: str) -> dict[str, object]: ...

    def reject(self, reason: str, topic: str, detail: str, *, retained: bool = False,
               size: int = -1) -> None: ...


SERVER_KEY: web.AppKey[ServerHost] = web.AppKey("server")
