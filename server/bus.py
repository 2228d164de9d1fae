"""An in-process publish/subscribe bus for what happens in the server, with typed notices.

The console's WebSockets, the dispatcher and the tests subscribe; ingest and the incident
lifecycle publish. A subscriber that falls behind loses its oldest notices, never blocks the
alarm path, and is told so (:class:`Overflow`) so it can reload its view.

Notices are msgspec Structs like the wire messages, tagged by ``type``:
``msgspec.to_builtins(notice)`` is what a console receives (``{"type": "incident_opened", ...}``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec


class Notice(msgspec.Struct, tag_field="type", kw_only=True):
    """Something that happened in the server."""

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = msgspec.to_builtins(self)
        return data


class _Press(Notice):
    """A committed press: the fields of the two notices below."""

    incident_id: str
    post_id: str
    event_id: str
    pressed_at: float
    test: bool = False


class IncidentOpened(_Press, tag="incident_opened"):
    """A press that opened an incident."""


class EventJoined(_Press, tag="event_joined"):
    """Another press of a post whose incident is open."""


class IncidentUpdated(Notice, tag="incident_updated"):
    incident_id: str
    state: str
    action: str
    actor: str


class PostState(Notice, tag="post_state"):
    post_id: str
    state: str  # online | offline
    reason: str = ""


class PostTestMode(Notice, tag="post_test_mode"):
    post_id: str
    test_mode: bool
    actor: str
    reason: str = ""


class CommandUpdated(Notice, tag="command_updated"):
    command: dict[str, Any]  # the stored command record


class CallUpdated(Notice, tag="call_updated"):
    call_id: str
    post_id: str
    user: str
    incident_id: str | None
    state: str
    mode: str
    started_at: float
    reason: str = ""


class TeamStatusChanged(Notice, tag="team_status"):
    team_id: str
    status: str


class DispatchQueued(Notice, tag="dispatch_queued"):
    incident_id: str
    post_id: str
    reason: str


class Overflow(Notice, tag="overflow"):
    """This subscriber fell behind: notices were dropped; reload the view."""


class Bus:
    def __init__(self, queue_size: int = 1000) -> None:
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue[Notice]] = set()

    def subscribe(self) -> asyncio.Queue[Notice]:
        queue: asyncio.Queue[Notice] = asyncio.Queue(self._queue_size)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Notice]) -> None:
        self._subscribers.discard(queue)

    def publish(self, notice: Notice) -> None:
        for queue in self._subscribers:
            if queue.full():
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(Overflow())
            queue.put_nowait(notice)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
