"""Call signaling on the post, light enough for the idle agent: the media stack loads lazily.

:mod:`edge.media` (aiortc, PyAV, OpenCV: ~0.6 s, ~50 MB) is imported in a worker thread when the
post starts ringing (:meth:`Intercom.preload`, called on a press), so that the operator's answer
does not pay for it and the idle agent stays small. An offer that arrives first loads it too.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from protocol.messages import CallSignal

if TYPE_CHECKING:
    from edge.media import MediaEngine, MediaSettings

Publish = Callable[[CallSignal], Awaitable[None]]


class Intercom:
    def __init__(self, settings: MediaSettings | dict[str, Any], publish: Publish,
                 log: logging.Logger | logging.LoggerAdapter) -> None:  # type: ignore[type-arg]
        self._settings = settings
        self._publish = publish
        self.log = log
        self.engine: MediaEngine | None = None
        self._loading: asyncio.Task[Any] | None = None
        self.counters: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def preload(self) -> None:
        """Start importing the media stack in a worker thread (idempotent, never blocks)."""
        if self._loading is None:
            self._loading = asyncio.ensure_future(
                asyncio.to_thread(importlib.import_module, "edge.media"))
            self._loading.add_done_callback(self._loaded)

    def _loaded(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here, so never "never retrieved"
        if exc is not None:
            self._count("media_unavailable")
            self.log.error("media stack unavailable, calls will be refused: %s", exc)

    async def _engine(self) -> MediaEngine:
        if self.engine is None:
            self.preload()
            assert self._loading is not None
            started = time.monotonic()
            media = await self._loading
            if self.engine is None:
                settings = self._settings
                if isinstance(settings, dict):
                    settings = media.MediaSettings(**settings)
                self.engine = media.MediaEngine(settings, on_ended=self._ended)
                self.log.info("media stack ready (waited %.0f ms)",
                              (time.monotonic() - started) * 1000)
        return self.engine

    async def on_signal(self, signal: CallSignal) -> None:
        if signal.kind == "offer":
            try:
                engine = await self._engine()
                sdp = await engine.answer(signal.id, signal.sdp)
            except Exception as exc:  # a bad offer must not take the agent down
                self._count("offers_failed")
                self.log.warning("call %s: could not answer: %s", signal.id, exc)
                await self._send(signal.id, "hangup", reason=f"could not answer: {str(exc)[:150]}")
                return
            self._count("calls_answered")
            self.log.info("call %s answered", signal.id)
            await self._send(signal.id, "answer", sdp=sdp)
        elif signal.kind == "hangup":
            if self.engine is not None and await self.engine.hangup(signal.id):
                self._count("calls_ended")
                self.log.info("call %s ended: %s", signal.id, signal.reason)
        else:
            self._count("rejected")
            self.log.warning("call %s: unexpected %s from the server", signal.id, signal.kind)

    def _ended(self, call_id: str, reason: str) -> None:
        """The media ended by itself (ICE failed): tell the server."""
        self._count("calls_lost")
        self.log.info("call %s lost: %s", call_id, reason)
        task = asyncio.ensure_future(self._send(call_id, "hangup", reason=reason))
        task.add_done_callback(lambda t: t.exception())

    async def _send(self, call_id: str, kind: str, *, sdp: str = "", reason: str = "") -> None:
        try:
            await self._publish(CallSignal(id=call_id, post=self._post_id(), kind=kind,  # type: ignore[arg-type]
                                           sdp=sdp, ts=time.time(), reason=reason))
        except Exception as exc:
            self.log.warning("call %s: could not send %s: %s", call_id, kind, exc)

    def _post_id(self) -> str:
        s = self._settings
        return str(s["post_id"] if isinstance(s, dict) else s.post_id)

    @property
    def active_calls(self) -> int:
        return len(self.engine.calls) if self.engine is not None else 0

    async def end_all(self, reason: str) -> None:
        """Hang up every call locally (the server knows already, or is gone)."""
        if self.engine is not None and self.engine.calls:
            self.log.info("ending %d call(s): %s", len(self.engine.calls), reason)
            for call_id in list(self.engine.calls):
                await self.engine.hangup(call_id)

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.close()
