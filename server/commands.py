"""Commands to posts with an acknowledgement: send, match the post's answer by id, or time out.

A command is stored (``commands`` table) as ``sent`` before it is published; the post's
:class:`~protocol.messages.CommandResult` with the same id makes it ``confirmed`` (or ``failed``
when the post says it could not); no answer within ``timeout_s`` makes it ``timed_out``. Every
change is published on the server bus as ``command_updated`` so consoles show it live, and a
command sent about an incident is written into that incident's audit timeline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import aiomqtt

from protocol.messages import Command, CommandResult, encode
from protocol.topics import post_topic
from protocol.ulid import new_ulid
from server.bus import Bus, CommandUpdated
from server.storage import CommandStore

log = logging.getLogger("alarmpost.server.commands")

COMMANDS: Final = ("silence", "reset", "strobe_off", "siren_on", "strobe_on")

AuditWriter = Callable[[str, str, str, str], None]  # incident_id, actor, action, detail


class CommandTracker:
    def __init__(self, store: CommandStore, bus: Bus, timeout_s: float,
                 client: Callable[[], aiomqtt.Client | None],
                 audit: AuditWriter | None = None) -> None:
        self.store = store
        self.bus = bus
        self.timeout_s = timeout_s
        self._client = client
        self._audit = audit
        self._timers: dict[str, asyncio.TimerHandle] = {}

    async def send(self, post_id: str, cmd: str, actor: str,
                   incident_id: str | None = None) -> dict[str, Any]:
        """Store and publish ``cmd``; the returned record is ``sent`` (or ``failed`` when the
        broker is not reachable). Raises ``ValueError`` for an unknown command."""
        if cmd not in COMMANDS:
            raise ValueError(f"unknown command {cmd!r}; one of: {', '.join(COMMANDS)}")
        now = time.time()
        command = Command(id=new_ulid(now), post=post_id, cmd=cmd, ts=now)  # type: ignore[arg-type]
        self.store.add(command.id, post_id, cmd, actor, incident_id, now)
        if incident_id and self._audit is not None:
            self._audit(incident_id, actor, f"command_{cmd}", f"command {command.id} sent")
        client = self._client()
        if client is None:
            return self._finish(command.id, "failed", "the server is not connected to the broker")
        try:
            await client.publish(post_topic(post_id, "cmd"), encode(command), qos=1)
        except aiomqtt.MqttError as exc:
            return self._finish(command.id, "failed", f"publish failed: {exc}")
        loop = asyncio.get_running_loop()
        self._timers[command.id] = loop.call_later(self.timeout_s, self._timed_out, command.id)
        log.info("command %s %s to post %s by %s", command.id, cmd, post_id, actor)
        record = self.get(command.id)
        assert record is not None
        self.bus.publish(CommandUpdated(command=record))
        return record

    def on_result(self, result: CommandResult) -> None:
        """The post answered. Unknown, repeated or late answers are counted and logged only."""
        row = self.get(result.id)
        if row is None or row["post_id"] != result.post:
            log.warning("post %s answered unknown command %s", result.post, result.id)
            return
        if row["state"] != "sent":
            log.info("post %s answered command %s again (already %s)", result.post, result.id,
                     row["state"])
            return
        self._finish(result.id, "confirmed" if result.ok else "failed", result.detail)

    def _timed_out(self, command_id: str) -> None:
        self._timers.pop(command_id, None)
        row = self.get(command_id)
        if row is not None and row["state"] == "sent":
            self._finish(command_id, "timed_out", f"no answer from the post in {self.timeout_s:g} s")

    def _finish(self, command_id: str, state: str, detail: str) -> dict[str, Any]:
        timer = self._timers.pop(command_id, None)
        if timer is not None:
            timer.cancel()
        self.store.finish(command_id, state, detail)
        record = self.get(command_id)
        assert record is not None
        log.info("command %s %s to post %s: %s %s", command_id, record["cmd"], record["post_id"],
                 state, detail)
        if record["incident_id"] and self._audit is not None:
            self._audit(record["incident_id"], f"post:{record['post_id']}",
                        f"command_{record['cmd']}_{state}", detail)
        self.bus.publish(CommandUpdated(command=record))
        return record

    def get(self, command_id: str) -> dict[str, Any] | None:
        return self.store.get(command_id)

    def recent(self, post_id: str | None, limit: int) -> list[dict[str, Any]]:
        return self.store.recent(post_id, limit)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
