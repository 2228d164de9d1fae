"""An in-process publish/subscribe bus for what happens in the server.

The console's WebSockets, the dispatcher and the tests subscribe; ingest and the incident
lifecycle publish. A subscriber that falls behind loses its oldest notices, never blocks the
alarm path, and is told so (``{"type": "overflow"}``) so it can reload its view.
"""

from __future__ import annotations

import asyncio
from typing import Any

Notice = dict[str, Any]


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

    def publish(self, kind: str, **data: Any) -> None:
        notice: Notice = {"type": kind, **data}
        for queue in self._subscribers:
            if queue.full():
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait({"type": "overflow"})
            queue.put_nowait(notice)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
