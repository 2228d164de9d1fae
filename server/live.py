"""What the server knows of each post right now: its state, last heartbeat, health, faults."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LivePost:
    """What the server knows of a post right now (persisted every ``flush_s``)."""

    state: str = "unknown"
    last_seen: float | None = None
    interval_s: float = 10.0
    health: dict[str, object] = field(default_factory=dict)
    deadline: asyncio.TimerHandle | None = None
    dirty: bool = False
    clock_offset_s: float | None = None  # server receipt - post ts, smoothed over heartbeats
    reported_faults: set[str] = field(default_factory=set)  # open, as the post reports them
    fault_opens: collections.deque[float] = field(default_factory=collections.deque)
    session_changes: collections.deque[float] = field(default_factory=collections.deque)
    last_session_change: float = 0.0
    clone_suspected: bool = False


def with_live(live: dict[str, LivePost], row: dict[str, Any]) -> dict[str, Any]:
    """A stored post row with what the server knows of it right now."""
    now = live.get(row["id"])
    if now is not None:
        row["state"] = now.state
        row["last_seen"] = now.last_seen
        row["health"] = now.health or row.get("health")
    return row
