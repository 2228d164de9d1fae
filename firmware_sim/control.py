"""``alarmpost sim``: simulated posts in one process, driven at random or from stdin.

Every accepted event (with its sequence number and epoch), every publish the broker took (``sent``)
and every ACK is printed on stdout as one JSON line, so a script (or a test) can drive the fleet and
watch it: ``{"type": "ack", "post": ..., "event_id": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from firmware_sim.fleet import Fleet, SimPost

log = logging.getLogger("alarmpost.sim")


@dataclass(frozen=True)
class SimOptions:
    """What ``alarmpost sim`` runs (the CLI parses its arguments into this)."""

    deployment: Path  # a deployment directory (``alarmpost provision init``)
    posts: int | None = None  # only the first N posts
    only: Sequence[str] = ()  # only these post ids
    press_every: float = 0.0  # mean seconds between random presses; 0: none
    control: bool = False  # read commands from stdin
    seed: int = 1  # for the random presses


def _emit_sent(post_id: str, event_id: str, attempt: int) -> None:
    emit(type="sent", post=post_id, event_id=event_id, attempt=attempt)


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def _control(fleet: Fleet, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while not stop.is_set():
        line = await reader.readline()
        if not line:
            break
        words = line.decode(errors="replace").split()
        if not words:
            continue
        cmd, rest = words[0], words[1:]
        if cmd == "quit":
            break
        post = fleet.posts.get(rest[0]) if rest else None
        if cmd in {"press", "brush"} and post is None:
            emit(type="error", detail=f"unknown post in {line.decode(errors='replace')!r}")
            continue
        try:
            if cmd == "press" and post is not None:
                hold = int(rest[1]) / 1000 if len(rest) > 1 else None
                bounce = int(rest[2]) if len(rest) > 2 else 0
                await post.press(hold, bounce)
            elif cmd == "brush" and post is not None:
                await post.brush()
            else:
                emit(type="error", detail=f"unknown command {cmd!r}")
        except ValueError:
            emit(type="error", detail=f"bad numbers in {line.decode(errors='replace')!r}")
    stop.set()


def run_sim(options: SimOptions) -> int:
    from provisioning.deployment import open_deployment

    dep = open_deployment(options.deployment)
    ids = [p.id for p in dep.posts]
    if options.only:
        ids = [i for i in ids if i in set(options.only)]
    if options.posts:
        ids = ids[: options.posts]

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        fleet = Fleet(SimPost.from_file(dep.post_config(i)) for i in ids)
        for post in fleet.posts.values():
            post.agent.ack_listeners.append(
                lambda ack, at: emit(type="ack", post=ack.post, event_id=ack.event_id,
                                     incident_id=ack.incident_id, at=at)
            )
            post.agent.press_listeners.append(
                lambda ev: emit(type="event", post=ev.post, event_id=ev.id, seq=ev.seq,
                                epoch=ev.epoch, at=ev.ts)
            )
            post.agent.sent_listeners.append(partial(_emit_sent, post.post_id))
        fleet.start()
        tasks = []
        if options.control:
            tasks.append(asyncio.create_task(_control(fleet, stop)))
        if options.press_every > 0:
            tasks.append(asyncio.create_task(
                fleet.random_presses(options.press_every, random.Random(options.seed))))
        emit(type="started", posts=len(fleet.posts))
        try:
            await fleet.wait_connected(within_s=60)
            emit(type="ready", posts=len(fleet.posts))
        except TimeoutError:
            emit(type="not_connected", detail="not every post connected within 60 s")
        await stop.wait()
        for task in tasks:
            task.cancel()
        await fleet.stop()
        emit(type="stopped", at=time.time())
        return 0

    return asyncio.run(main())
