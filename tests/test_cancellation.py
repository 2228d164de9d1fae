"""A task that is cancelled as the event it waits for is set must still end.

In Python 3.11 ``asyncio.wait_for(event.wait(), t)`` returns the event's result, swallowing the
cancellation, when the cancellation arrives after the event was set: a ``while True`` loop
around it then never ends, and whatever waits for it (a post shutting down, a connection being
closed) hangs. The loops wait with ``asyncio.timeout`` instead; these tests set the event and
cancel in the same turn of the event loop, over and over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from tests.test_fast_agent import _make_post

ROUNDS = 50


async def _cancelled_as_woken(start: Callable[[], Coroutine[Any, Any, None]],
                              wake: asyncio.Event) -> int:
    """Start a waiting loop, set its event and cancel it at once; how many did not end."""
    hung = 0
    for i in range(ROUNDS):
        task = asyncio.create_task(start())
        for _ in range(3):
            await asyncio.sleep(0)  # let it reach its wait
        wake.set()
        for _ in range(i % 3):  # and cancel it on the same turn, or one or two later
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done:
            hung += 1
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
    return hung


async def test_the_event_sender_ends_when_cancelled_as_it_wakes(tmp_path: Path) -> None:
    post = _make_post(tmp_path)
    try:
        hung = await _cancelled_as_woken(lambda: post.agent._sender(post.client),  # type: ignore[arg-type]
                                         post.agent._wake)
    finally:
        post.agent.store.close()
    assert hung == 0, f"the sender swallowed {hung} of {ROUNDS} cancellations"


async def test_the_heartbeat_loop_ends_when_cancelled_as_it_wakes(tmp_path: Path) -> None:
    post = _make_post(tmp_path)
    try:
        hung = await _cancelled_as_woken(lambda: post.agent._heartbeats(post.client),  # type: ignore[arg-type]
                                         post.agent._beat_now)
    finally:
        post.agent.store.close()
    assert hung == 0, f"the heartbeat loop swallowed {hung} of {ROUNDS} cancellations"
