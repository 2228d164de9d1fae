"""Video intercom signaling on the server: browser (WebSocket) ⇄ server ⇄ MQTT ⇄ post.

No trickle: the browser gathers its ICE candidates, sends one offer; the server forwards it to
the post (``call``, QoS 1, expiring after the call timeout) and waits for one answer
(``callstate``). A post has at most one call: the first operator to answer takes it, and
everyone else is told who did (``call_updated`` on the bus). Besides that one call, operators
may *view* a post's camera (``mode="view"``: no one's call, any number of viewers; the post
serves them all from one camera through MediaRelay).

A call ends on hang-up from either side, on the console's WebSocket closing, when the post
starts a new MQTT session (it rebooted or reconnected: its media is gone) or goes offline, and
the post is always told so it frees the camera.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.messages import MAX_CALL_PAYLOAD_BYTES, CallSignal, encode
from protocol.topics import post_topic
from protocol.ulid import new_ulid
from server.bus import Bus, CallUpdated

log = logging.getLogger("alarmpost.server.calls")

EndListener = Callable[[str, str], None]  # call_id, reason
AuditWriter = Callable[[str, str, str, str], None]


class CallError(Exception):
    """The call could not be set up; ``reason`` is a short label, the message says why."""

    def __init__(self, reason: str, message: str, taken_by: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.taken_by = taken_by


@dataclass
class Call:
    id: str
    post_id: str
    user: str
    incident_id: str | None
    started_at: float
    answer: asyncio.Future[str]
    on_end: EndListener | None = None
    state: str = "offering"
    mode: str = "call"  # "call": the post's one intercom call; "view": camera only

    def public(self) -> dict[str, Any]:
        return {"call_id": self.id, "post_id": self.post_id, "user": self.user,
                "incident_id": self.incident_id, "state": self.state, "mode": self.mode,
                "started_at": self.started_at}


class CallRelay:
    def __init__(self, bus: Bus, timeout_s: float, client: Callable[[], aiomqtt.Client | None],
                 audit: AuditWriter | None = None) -> None:
        self.bus = bus
        self.timeout_s = timeout_s
        self._client = client
        self._audit = audit
        self.calls: dict[str, Call] = {}
        self.by_post: dict[str, str] = {}
        self.counters: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def active(self) -> list[dict[str, Any]]:
        return [c.public() for c in self.calls.values()]

    def owner(self, post_id: str) -> str | None:
        call_id = self.by_post.get(post_id)
        return self.calls[call_id].user if call_id else None

    async def start(self, post_id: str, user: str, sdp: str, *, incident_id: str | None = None,
                    on_end: EndListener | None = None, mode: str = "call") -> tuple[str, str]:
        """Offer ``sdp`` to the post; return ``(call_id, answer_sdp)``. Raises :class:`CallError`."""
        assert mode in ("call", "view"), mode
        holder = self.owner(post_id)
        if mode == "call" and holder is not None:
            self._count("refused_taken")
            raise CallError("taken", f"the call with post {post_id} is taken by {holder}", holder)
        client = self._client()
        if client is None:
            raise CallError("offline", "the server is not connected to the broker")
        now = time.time()
        call_id = new_ulid(now)
        offer = encode(CallSignal(id=call_id, post=post_id, kind="offer", sdp=sdp, ts=now))
        if len(offer) > MAX_CALL_PAYLOAD_BYTES:
            # The broker disconnects a client that sends more than the protocol's largest message
            # (max_packet_size): the server never publishes one, whatever a browser sent it.
            self._count("refused_too_large")
            raise CallError("too_large", f"the offer is {len(offer)} bytes, more than the "
                            f"{MAX_CALL_PAYLOAD_BYTES} a call signal may have")
        call = Call(call_id, post_id, user, incident_id, now,
                    asyncio.get_running_loop().create_future(), on_end, mode=mode)
        self.calls[call.id] = call
        if mode == "call":
            self.by_post[post_id] = call.id
        self.bus.publish(CallUpdated(**call.public()))
        self._note(call, user, f"{mode}_offered", f"{mode} {call.id}")
        # An offer the post cannot take in time must not reach it later (persistent session).
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.MessageExpiryInterval = max(1, math.ceil(self.timeout_s))
        try:
            await client.publish(post_topic(post_id, "call"), offer, qos=1, properties=props)
            answer = await asyncio.wait_for(asyncio.shield(call.answer), self.timeout_s)
        except TimeoutError:
            self._count("timed_out")
            await self.hangup(call.id, "no answer from the post", by="system")
            raise CallError("timeout", f"post {post_id} did not answer within "
                            f"{self.timeout_s:g} s") from None
        except aiomqtt.MqttError as exc:
            await self.hangup(call.id, "broker unreachable", by="system", tell_post=False)
            raise CallError("offline", f"could not reach the broker: {exc}") from None
        except asyncio.CancelledError:
            await self.hangup(call.id, "cancelled", by=user)
            raise
        except CallError:
            raise
        if call.id not in self.calls:
            raise CallError("ended", "the call ended before it was answered")
        call.state = "active"
        self._count("answered")
        self.bus.publish(CallUpdated(**call.public()))
        self._note(call, user, f"{call.mode}_answered", f"{call.mode} {call.id}")
        return call.id, answer

    def on_signal(self, message: CallSignal) -> None:
        """Something from the post about a call. Unknown calls are counted and ignored."""
        call = self.calls.get(message.id)
        if call is None or call.post_id != message.post:
            self._count("unknown_call")
            log.info("post %s: %s for unknown call %s", message.post, message.kind, message.id)
            if message.kind == "answer":
                # It answered a call we have given up on: make it free the camera.
                task = asyncio.ensure_future(self._tell_post(message.post, message.id, "stale call"))
                task.add_done_callback(lambda t: t.exception())
            return
        if message.kind == "answer":
            if not call.answer.done():
                call.answer.set_result(message.sdp)
        elif message.kind == "hangup":
            if not call.answer.done():
                call.answer.set_exception(CallError("refused", message.reason or "post refused"))
                call.answer.exception()  # retrieved: no "never retrieved" warning
            self._end(call, message.reason or "post hung up", f"post:{call.post_id}")

    def post_session_changed(self, post_id: str, why: str, since: float | None = None) -> None:
        """The post went offline, or (re)connected at ``since``: the calls and views it had
        before are gone. (A retained status redelivered to a reconnecting server is older than
        the calls and ends nothing.)"""
        for call in [c for c in self.calls.values() if c.post_id == post_id
                     and (since is None or c.started_at < since)]:
            if not call.answer.done():
                call.answer.set_exception(CallError("offline", f"post {post_id} {why}"))
                call.answer.exception()
            self._end(call, f"post {why}", f"post:{post_id}")

    async def hangup(self, call_id: str, reason: str, *, by: str, tell_post: bool = True) -> bool:
        call = self.calls.get(call_id)
        if call is None:
            return False
        self._end(call, reason, by)
        if tell_post:
            await self._tell_post(call.post_id, call_id, reason)
        return True

    async def _tell_post(self, post_id: str, call_id: str, reason: str) -> None:
        client = self._client()
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(post_topic(post_id, "call"), encode(CallSignal(
                id=call_id, post=post_id, kind="hangup", ts=time.time(), reason=reason[:200])),
                qos=1)

    def _end(self, call: Call, reason: str, by: str) -> None:
        if self.calls.pop(call.id, None) is None:
            return
        if self.by_post.get(call.post_id) == call.id:
            del self.by_post[call.post_id]
        call.state = "ended"
        if not call.answer.done():
            call.answer.set_exception(CallError("ended", reason))
            call.answer.exception()
        self._count("ended")
        log.info("call %s with post %s (%s) ended by %s: %s", call.id, call.post_id, call.user,
                 by, reason)
        self._note(call, by, f"{call.mode}_ended", reason)
        self.bus.publish(CallUpdated(**call.public(), reason=reason))
        if call.on_end is not None:
            call.on_end(call.id, reason)

    def _note(self, call: Call, actor: str, action: str, detail: str) -> None:
        if call.incident_id and self._audit is not None:
            try:
                self._audit(call.incident_id, actor, action, detail)
            except Exception:
                log.exception("could not audit %s of call %s", action, call.id)

    async def close(self) -> None:
        for call_id in list(self.calls):
            await self.hangup(call_id, "server stopping", by="system")
