"""The edge agent: one per alarm post.

The alarm path on the post, in order:

1. the button guard accepts a press (held long enough, debounced);
2. strobe and siren go on at once, in the same callback, before any I/O (unless the post is silent);
3. the event is committed to the outbox (SQLite) with the next sequence number;
4. the sender publishes it (MQTT 5, QoS 1, fixed client id, persistent session) and keeps resending
   it with backoff, forever, until the server's application-level ACK arrives;
5. the ACK removes it from the outbox and lights the "help is coming" lamp.

Presence: a retained ``online`` status on connect, a retained ``offline`` Last Will, an explicit
``offline`` on a clean stop, and a heartbeat every ``timing.heartbeat_s``, which also lists the
faults the post knows of itself: ``storage`` (the outbox cannot be opened or written: events are
kept in memory, see :mod:`edge.storage`), ``session_taken_over`` (another client took this post's
broker session within :data:`TAKEOVER_FAULT_S`: a cloned credential), and the hardware's own
(:class:`edge.hardware.Supervised`: ``ioboard_link``, ``tamper``, ``mains_lost``, ``battery_low``),
which are reported in a heartbeat as soon as they change.

Everything the agent receives is handled inside one boundary (:meth:`EdgeAgent._receiver`): a
message that is refused or whose handling fails is counted by reason in ``counters``, logged with
its topic and size, and the agent carries on. The broker connection is a :class:`mqttlink.MqttLink`:
reconnects back off and start fast again after a connection that lived, but not after one a clone
of this post took over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt

from edge.config import EdgeConfig
from edge.hardware import Hardware, Supervised, make_hardware
from edge.intercom import Intercom
from edge.outbox import Outbox, Pending
from edge.storage import EventStore
from mqttlink import Backoff, ConnectionDropped, HandlerFault, LinkError, LinkState, MqttLink
from protocol.messages import (
    Ack,
    CallSignal,
    Command,
    CommandResult,
    Event,
    Heartbeat,
    Rejected,
    ServerStatus,
    Status,
    decode_from_post,
    decode_from_server,
    encode,
)
from protocol.topics import post_topic, server_status_topic
from protocol.ulid import new_ulid

log = logging.getLogger("alarmpost.edge")

# Another client took this post's broker session (with ``use_username_as_clientid``: another
# device with this post's credential): reported as a fault for this long after.
TAKEOVER_FAULT_S = 600.0
# A connection that stayed up this long proves the broker fine: the next outage retries fast.
CONNECTION_LIVED_S = 3.0
# A change in the hardware's faults is reported at once, but at most this often.
EARLY_BEAT_GAP_S = 0.2


class _PostLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every line with the post id."""

    def process(self, msg: object, kwargs: Any) -> tuple[object, Any]:
        return f"[{self.extra['post']}] {msg}", kwargs  # type: ignore[index]

AckListener = Callable[[Ack, float], None]
PressListener = Callable[[Event], None]
SentListener = Callable[[str, int], None]  # (event id, attempt): the broker took a publish


@dataclass
class _InFlight:
    entry: Pending
    attempts: int = 0
    next_try: float = 0.0  # monotonic time of the next (re)send


class EdgeAgent:
    """Runs one post until :meth:`stop`. ``hardware`` defaults to the backend ``[hardware]``
    names (:func:`edge.hardware.make_hardware`)."""

    def __init__(self, config: EdgeConfig, hardware: Hardware | None = None) -> None:
        self.config = config
        self.post_id = config.post.id
        self.hardware: Hardware = hardware if hardware is not None else make_hardware(config)
        self.log = _PostLog(log, {"post": self.post_id})
        self.counters: Counter[str] = Counter()
        # Opened by run(): a disk that fails (even at boot) never keeps the button from working.
        self.store = EventStore(config.outbox_path, self.log, self.counters)
        self.started = asyncio.Event()  # the button is being read
        self.connected = asyncio.Event()
        self.server_online = False
        self.ack_listeners: list[AckListener] = []
        self.press_listeners: list[PressListener] = []
        self.sent_listeners: list[SentListener] = []
        self._inflight: OrderedDict[str, _InFlight] = OrderedDict()
        self._wake = asyncio.Event()
        self._beat_now = asyncio.Event()  # the hardware's faults changed: a heartbeat now
        self._started = time.monotonic()
        self._started_wall = time.time()
        self._sent_status: OrderedDict[bytes, None] = OrderedDict()
        self._siren_timer: asyncio.TimerHandle | None = None
        self._seen_commands: OrderedDict[str, None] = OrderedDict()
        self._client: aiomqtt.Client | None = None  # while a session is up
        self._taken_over_at: float | None = None  # monotonic time of the last takeover
        self._topics = {k: post_topic(self.post_id, k) for k in ("event", "heartbeat", "status",
                                                                   "cmdresult", "ack", "cmd",
                                                                   "call", "callstate")}
        self.reconnect = Backoff(initial_s=0.2, cap_s=config.timing.reconnect_max_s,
                                 lived_s=CONNECTION_LIVED_S)
        self.link = MqttLink(
            config.mqtt, self._session, will=self._will, before_disconnect=self._say_offline,
            on_publish_refused=self._on_refused, backoff=self.reconnect, logger=self.log,
        )
        self.link.state_listeners.append(self._on_link_state)
        media = dataclasses.asdict(config.media)
        self.intercom = Intercom({"post_id": self.post_id, **media}, self._publish_call, self.log)
        self._call_tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ the press
    def _on_press(self, hold_ms: int) -> None:
        """An accepted press. Outputs first, then the outbox (or memory, if the disk fails);
        never waits for the network, and no failing part stops the others."""
        if not self.config.post.silent:
            self._output("strobe", self.hardware.set_strobe)
            self._output("siren", self.hardware.set_siren)
            self._arm_siren_timeout()
        now = time.time()

        def make(seq: int, epoch: str) -> Event:
            return Event(id=new_ulid(now), post=self.post_id, seq=seq, ts=now, hold_ms=hold_ms,
                         epoch=epoch)

        event = self.store.add(make)
        self.counters["presses"] += 1
        self._inflight[event.id] = _InFlight(Pending(event.seq, event.id, encode(event)))
        self.log.info("press accepted: event %s seq %d (held %d ms)", event.id, event.seq, hold_ms)
        self._wake.set()
        for listener in self.press_listeners:
            self._notify(listener, event)
        self.intercom.preload()  # the post rings: load the media stack before the answer

    def _output(self, name: str, set_output: Callable[[bool], None]) -> None:
        try:
            set_output(True)
        except Exception as exc:  # a dead strobe driver must not keep the siren off
            self.counters["output_errors"] += 1
            self.log.error("could not switch the %s on: %s", name, exc)

    def _notify(self, listener: Callable[..., None], *args: Any) -> None:
        try:
            listener(*args)
        except Exception:
            self.counters["listener_errors"] += 1
            self.log.exception("a listener failed")

    @property
    def outbox(self) -> Outbox | None:
        """The open outbox; None while storage fails (events are then kept in memory)."""
        return self.store.outbox

    @property
    def epoch(self) -> str:
        return self.store.epoch

    def _arm_siren_timeout(self) -> None:
        if self._siren_timer is not None:
            self._siren_timer.cancel()
        loop = asyncio.get_running_loop()
        self._siren_timer = loop.call_later(self.config.hardware.siren_max_s, self._siren_timeout)

    def _siren_timeout(self) -> None:
        self._siren_timer = None
        if self.hardware.siren:
            self.log.info("siren switched off after %.0f s", self.config.hardware.siren_max_s)
            self.hardware.set_siren(False)

    # ------------------------------------------------------------------ lifecycle
    @property
    def outbox_depth(self) -> int:
        return len(self._inflight)

    def stop(self) -> None:
        self.link.stop()

    async def run(self) -> None:
        """Connect, reconnect after every failure, until :meth:`stop`."""
        self.link.settings = self.config.mqtt  # as configured now, not when the agent was made
        loop = asyncio.get_running_loop()
        for entry in self.store.open():
            self._inflight[entry.id] = _InFlight(entry)
        if isinstance(self.hardware, Supervised):
            self.hardware.fault_listeners.append(self._beat_now.set)
        self.hardware.start(loop, self._on_press)
        self.started.set()
        self.log.info(
            "agent started (outbox %s, %d pending, epoch %s, silent=%s)",
            self.config.outbox_path, len(self._inflight), self.epoch, self.config.post.silent,
        )
        storage_watch = asyncio.create_task(self._watch_storage())
        try:
            await self.link.run()  # until stop(); every failure is caught, counted, retried
        finally:
            storage_watch.cancel()
            await asyncio.gather(storage_watch, return_exceptions=True)
            if self._siren_timer is not None:
                self._siren_timer.cancel()
            self.store.close()
            self.hardware.close()
            await self.intercom.close()
            self.log.info("agent stopped")

    async def _watch_storage(self) -> None:
        """While the outbox fails, try it again every ``[outbox] retry_s``."""
        while True:
            await asyncio.sleep(self.config.outbox.retry_s)
            if self.store.fault:
                try:
                    self.store.recover()
                except Exception:
                    self.counters["storage_watch_errors"] += 1
                    self.log.exception("retrying the outbox failed")

    # ------------------------------------------------------------------ the broker link
    def _will(self) -> aiomqtt.Will:
        """The Last Will, made afresh for each connection attempt: the broker publishes it
        (retained) when the connection is lost without a clean DISCONNECT."""
        return aiomqtt.Will(
            self._topics["status"],
            self._own_status(Status(post=self.post_id, state="offline", ts=time.time(),
                                    reason="connection lost")),
            qos=1,
            retain=True,
        )

    async def _session(self, client: aiomqtt.Client, session_present: bool) -> None:
        """One broker connection's life (the link's ``on_connected``): subscribe, say online,
        resend what is unacknowledged, then read, send and beat until the link cancels it or
        a task fails."""
        self._client = client
        try:
            await client.subscribe(
                [(self._topics["ack"], 1), (self._topics["cmd"], 1), (self._topics["call"], 1),
                 (server_status_topic(), 1), (self._topics["status"], 1)]
            )
            await client.publish(
                self._topics["status"],
                self._own_status(Status(post=self.post_id, state="online", ts=time.time())),
                qos=1,
                retain=True,
            )
            self.connected.set()
            self._resend_all_now()
            tasks = [
                asyncio.create_task(self._receiver(client)),
                asyncio.create_task(self._sender(client)),
                asyncio.create_task(self._heartbeats(client)),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                # A new MQTT session means new calls: the server ends this session's too.
                await self.intercom.end_all("MQTT session ended")
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self._client = None
            self.connected.clear()
            self.server_online = False

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        """On a clean stop, before DISCONNECT: a clean disconnect sends no Last Will, so the
        post says offline itself."""
        await client.publish(
            self._topics["status"],
            self._own_status(Status(post=self.post_id, state="offline", ts=time.time(),
                                    reason="shutdown")),
            qos=1,
            retain=True,
        )

    def _on_link_state(self, state: LinkState, error: LinkError | None) -> None:
        if state is not LinkState.BACKING_OFF or error is None:
            return
        if isinstance(error, HandlerFault):
            # A fault of ours (logged with its traceback by the link): counted, and the post
            # reconnects rather than stops.
            self.counters["session_errors"] += 1
            return
        self.counters["disconnects"] += 1
        if isinstance(error, ConnectionDropped) and error.taken_over:
            self._on_taken_over()

    def _on_refused(self, code: int) -> None:
        self.counters["refused_by_broker"] += 1
        self.log.error(
            "the broker refused a publish (reason 0x%02x): this post may only publish under its "
            "own id; check that [mqtt] username is %r", code, self.post_id,
        )

    def _own_status(self, status: Status) -> bytes:
        """Encode a status this agent publishes (or leaves as its will) and remember it: any
        other status on this post's topic comes from another device with this credential."""
        payload = encode(status)
        self._sent_status[payload] = None
        while len(self._sent_status) > 32:
            self._sent_status.popitem(last=False)
        return payload

    def _on_status_seen(self, topic: str, payload: bytes) -> None:
        """A status on this post's own topic (retained at subscribe, or live). Mosquitto before
        2.0.15 closes a taken-over connection without the 0x8E DISCONNECT, so this is how a clone
        shows itself there: a device running this software with this credential announces itself
        (online) and leaves a will (offline) that this agent did not publish. A status from before
        this agent started is an earlier run's (its retained will or shutdown) and means nothing."""
        if payload in self._sent_status:
            return
        _, status = decode_from_post(topic, payload)
        if isinstance(status, Status) and status.ts >= self._started_wall - 1.0:
            self._on_taken_over(f"another device published {status.state!r} on this post's "
                                "status topic")

    def _on_taken_over(self, how: str = "the broker sent DISCONNECT 0x8E, session taken over"
                       ) -> None:
        self.counters["session_taken_over"] += 1
        self._taken_over_at = time.monotonic()
        # This connection does not prove the broker fine: fast retries would only make the two
        # devices fight faster.
        self.link.hold_backoff()
        self.log.error(
            "another device is using this post's credential (%s; %d time(s)): reported as fault "
            "session_taken_over", how, self.counters["session_taken_over"],
        )

    @property
    def faults(self) -> tuple[str, ...]:
        """What the post reports about itself in its heartbeat."""
        faults: list[str] = []
        if self.store.fault:
            faults.append("storage")
        if (self._taken_over_at is not None
                and time.monotonic() - self._taken_over_at < TAKEOVER_FAULT_S):
            faults.append("session_taken_over")
        if isinstance(self.hardware, Supervised):  # ioboard_link, tamper, mains_lost, battery_low
            faults.extend(self.hardware.faults)
        return tuple(faults)

    # ------------------------------------------------------------------ sending
    def _resend_all_now(self) -> None:
        for item in self._inflight.values():
            item.next_try = 0.0
        self._wake.set()

    def _backoff(self, attempts: int) -> float:
        t = self.config.timing
        base: float = min(t.ack_timeout_s * 2.0 ** max(attempts - 1, 0), t.resend_max_s)
        return base * random.uniform(0.9, 1.1)

    async def _sender(self, client: aiomqtt.Client) -> None:
        """Publish every unacknowledged event in sequence order; resend on its deadline."""
        topic = self._topics["event"]
        while True:
            self._wake.clear()
            now = time.monotonic()
            earliest: float | None = None
            for item in list(self._inflight.values()):
                if item.entry.id not in self._inflight:
                    continue  # acknowledged while we were publishing
                if item.next_try <= now:
                    await client.publish(topic, item.entry.payload, qos=1)  # returns on PUBACK
                    item.attempts += 1
                    for listener in self.sent_listeners:
                        self._notify(listener, item.entry.id, item.attempts)
                    if item.attempts > 1:
                        self.counters["resends"] += 1
                        self.log.info("resent event %s (attempt %d)", item.entry.id, item.attempts)
                    item.next_try = time.monotonic() + self._backoff(item.attempts)
                earliest = item.next_try if earliest is None else min(earliest, item.next_try)
            timeout = None if earliest is None else max(earliest - time.monotonic(), 0.0)
            with contextlib.suppress(TimeoutError):  # (not wait_for: it can swallow a cancel)
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _heartbeats(self, client: aiomqtt.Client) -> None:
        interval = self.config.timing.heartbeat_s
        while True:
            self._beat_now.clear()
            await client.publish(self._topics["heartbeat"], encode(self.heartbeat()), qos=0)
            with contextlib.suppress(TimeoutError):  # a hardware fault is reported at once
                async with asyncio.timeout(interval):
                    await self._beat_now.wait()
                await asyncio.sleep(EARLY_BEAT_GAP_S)  # a flapping switch cannot flood the broker

    def heartbeat(self) -> Heartbeat:
        hw = self.hardware
        return Heartbeat(
            post=self.post_id,
            ts=time.time(),
            interval_s=self.config.timing.heartbeat_s,
            uptime_s=round(time.monotonic() - self._started, 3),
            outbox_depth=self.outbox_depth,
            button=hw.button,
            strobe=hw.strobe,
            siren=hw.siren,
            help=hw.help,
            silent=self.config.post.silent,
            faults=self.faults,
        )

    # ------------------------------------------------------------------ receiving
    async def _receiver(self, client: aiomqtt.Client) -> None:
        """The agent's input boundary: whatever arrives, and whatever handling it raises, is
        counted and logged, and the next message is read."""
        async for message in client.messages:
            topic = str(message.topic)
            payload = message.payload if isinstance(message.payload, bytes) else b""
            try:
                await self._handle(client, topic, payload)
            except Rejected as exc:
                self.counters[f"rejected_{exc.reason}"] += 1
                self.log.warning("rejected message on %s (%d bytes): %s", topic, len(payload), exc)
            except Exception as exc:
                self.counters["handler_errors"] += 1
                self.log.error("message on %s (%d bytes) could not be handled: %s: %s",
                               topic, len(payload), type(exc).__name__, str(exc)[:200],
                               exc_info=True)

    async def _handle(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        if topic == self._topics["status"]:
            self._on_status_seen(topic, payload)
            return
        decoded = decode_from_server(topic, payload, self.post_id)
        if isinstance(decoded, Ack):
            self._on_ack(decoded)
        elif isinstance(decoded, Command):
            await self._on_command(client, decoded)
        elif isinstance(decoded, ServerStatus):
            self._on_server_status(decoded)
        elif isinstance(decoded, CallSignal):
            self._spawn_call_task(self.intercom.on_signal(decoded))

    def _spawn_call_task(self, coro: Any) -> None:
        # Answering takes a while (media stack, ICE gathering): never hold up ACKs meanwhile.
        task = asyncio.ensure_future(coro)
        self._call_tasks.add(task)
        task.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Future[None]) -> None:
        self._call_tasks.discard(task)  # type: ignore[arg-type,unused-ignore]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.counters["call_task_errors"] += 1
            self.log.error("call signaling failed: %s: %s", type(exc).__name__, str(exc)[:200],
                           exc_info=exc)

    async def _publish_call(self, signal: CallSignal) -> None:
        client = self._client
        if client is None:
            raise aiomqtt.MqttError("not connected")
        await client.publish(self._topics["callstate"], encode(signal), qos=1)

    def _on_ack(self, ack: Ack) -> None:
        received = time.time()
        item = self._inflight.pop(ack.event_id, None)
        if item is None:
            self.counters["acks_unknown"] += 1  # a repeated ACK for an event already removed
            return
        self.store.acked(ack.event_id)
        self.counters["acks"] += 1
        if not self.hardware.help:
            self.log.info("help is coming: event %s in incident %s", ack.event_id, ack.incident_id)
        self.hardware.set_help(True)
        for listener in self.ack_listeners:
            self._notify(listener, ack, received)

    def _on_server_status(self, status: ServerStatus) -> None:
        was = self.server_online
        self.server_online = status.state == "online"
        if self.server_online and not was:
            self.log.info("server is online")
            self._resend_all_now()  # a restarted server has lost what it had not committed
        elif was and not self.server_online:
            self.log.warning("server went offline; events stay in the outbox")
            self._spawn_call_task(self.intercom.end_all("server went offline"))

    async def _on_command(self, client: aiomqtt.Client, cmd: Command) -> None:
        if cmd.id in self._seen_commands:
            self.counters["commands_repeated"] += 1
        else:
            self._seen_commands[cmd.id] = None
            if len(self._seen_commands) > 256:
                self._seen_commands.popitem(last=False)
            self.apply_command(cmd.cmd)
        result = CommandResult(id=cmd.id, post=self.post_id, cmd=cmd.cmd, ok=True, ts=time.time())
        await client.publish(self._topics["cmdresult"], encode(result), qos=1)

    def apply_command(self, name: str) -> None:
        hw = self.hardware
        self.log.info("command %s", name)
        if name == "silence":
            hw.set_siren(False)
        elif name == "strobe_off":
            hw.set_strobe(False)
        elif name == "siren_on":
            hw.set_siren(True)
            self._arm_siren_timeout()
        elif name == "strobe_on":
            hw.set_strobe(True)
        elif name == "reset":
            hw.set_siren(False)
            hw.set_strobe(False)
            hw.set_help(False)
