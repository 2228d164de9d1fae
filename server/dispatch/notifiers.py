"""Paging channels: MQTT to the team's device first; the patrol web app and others beside it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from protocol.messages import (
    Page,
    PageWithdrawn,
    encode,
)
from protocol.topics import team_topic
from server.patrol import (
    Team,
)

if TYPE_CHECKING:
    import aiomqtt

log = logging.getLogger("alarmpost.dispatch")

class NotifierUnavailable(RuntimeError):
    """The channel cannot deliver now (e.g. broker disconnected); the page is retried later."""


class Notifier(Protocol):
    """A paging channel. MQTT is the first; SMS or a radio gateway implement the same two calls.

    ``page`` must raise (e.g. :class:`NotifierUnavailable`) when it could not hand the page over;
    the dispatcher then retries it on the next connection. A page may be delivered twice after a
    crash: it carries its id, and devices show a page id once.
    """

    name: str

    async def page(self, team: Team | None, page: Page) -> None: ...
    async def withdraw(self, team: Team | None, notice: PageWithdrawn) -> None: ...


class MqttNotifier:
    """QoS 1 to ``alarmpost/v1/team/team-{id}/page``: queued by the broker for a device that is
    offline (persistent session), delivered when it comes back."""

    name = "mqtt"

    def __init__(self) -> None:
        self.client: aiomqtt.Client | None = None

    async def page(self, team: Team | None, page: Page) -> None:
        await self._publish(team_topic(page.team, "page"), encode(page))

    async def withdraw(self, team: Team | None, notice: PageWithdrawn) -> None:
        await self._publish(team_topic(notice.team, "withdrawn"), encode(notice))

    async def _publish(self, topic: str, payload: bytes) -> None:
        client = self.client
        if client is None:
            raise NotifierUnavailable("not connected to the broker")
        await client.publish(topic, payload, qos=1)
