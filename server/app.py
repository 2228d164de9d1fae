"""The central server process: MQTT ingest, incidents, supervision, HTTP API.

Ingest: one reader takes every message from the broker, decodes it strictly (:mod:`protocol`),
checks the post is registered, and hands events to the committer. The committer drains whatever
has queued up, commits it in one transaction, and only then publishes one ACK per event. A resend
of a committed event is acknowledged again (``duplicate: true``) and stored nothing.

Supervision: each post has a deadline ``grace_intervals × heartbeat interval`` after the last
thing heard from it; missing it, or its Last Will, marks it offline with a fault record; hearing
from it again records the recovery. Faults a post reports in its heartbeat (``storage``,
``session_taken_over``, ...) are fault records of that kind, open while it reports them; a post
whose session flaps (:data:`CLONE_SESSIONS` changes within :data:`CLONE_WINDOW_S`) gets a
``clone_suspected`` fault: two devices may be using its credential.

Posts are hostile: every message is handled inside a boundary that catches everything, counts
it (``rejected_total{reason}``, ``handler_errors_total{kind}``) and logs it with its topic and
size; nothing a post sends ends the reader. A retained message that cannot be decoded is refused
each time it is delivered and cleared from the broker (``retained_cleared_total``). The incident
lifecycle runs on the server's receipt time; each post's clock offset (receipt - ts of its
heartbeats, smoothed) is shown in its health.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import tomllib
from pathlib import Path

import aiomqtt

from mqttlink import Backoff, LinkError, LinkState, MqttLink
from protocol.messages import (
    Ack,
    CallSignal,
    CommandResult,
    Event,
    Heartbeat,
    Rejected,
    ServerStatus,
    Status,
    decode_from_post,
    encode,
)
from protocol.settings import ConfigError
from protocol.topics import (
    EDGE_KINDS,
    TEAM_KINDS,
    TEAM_TOPIC_PREFIX,
    TOPIC_PREFIX,
    post_subscription,
    post_topic,
    server_status_topic,
    team_subscription,
    valid_post_id,
)
from server.bus import (
    Bus,
    EventJoined,
    IncidentOpened,
    IncidentUpdated,
    PostState,
    PostTestMode,
)
from server.calls import CallRelay
from server.commands import CommandTracker
from server.config import ServerConfig
from server.dispatch import Dispatcher
from server.live import LivePost
from server.logthrottle import LogThrottle, left_out_note
from server.metrics import Metrics
from server.storage import Committed, PostInfo, Storage, open_storage

log = logging.getLogger("alarmpost.server")

COMMIT_BATCH_MAX = 500
# Rejections that say the message itself is bad (not the registry's state): such a message
# retained on the broker is cleared, so it stops being delivered.
POISON_REASONS = frozenset({"malformed", "too_deep", "oversized", "invalid", "unknown_version",
                            "post_mismatch", "team_mismatch"})
CLONE_SESSIONS = 3  # session changes (online/offline) of one post ...
CLONE_WINDOW_S = 60.0  # ... within this long: two devices may be using its credential
CLONE_QUIET_S = 600.0  # the clone fault closes after this long without a session change
CLOCK_SMOOTHING = 0.2  # weight of a new heartbeat in a post's clock offset estimate
# Faults the server itself records: a post cannot report (or clear) these.
SERVER_FAULT_KINDS = frozenset({"offline", "clone_suspected"})
FAULT_TEXT = {
    "storage": "the post cannot write its outbox (events are held in memory)",
    "session_taken_over": "another device using this post's credential took its broker session",
}
FAULT_OPENS_PER_WINDOW = 10  # reported faults a post may open per window, beyond: counted only
FAULT_WINDOW_S = 60.0


def load_registry(path: Path | str) -> list[PostInfo]:
    """Read the post registry (``[[post]]`` tables); raise :class:`ConfigError` on bad entries."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"post registry {path} does not exist (create it with `alarmpost provision post`)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    posts = []
    for i, entry in enumerate(data.get("post", [])):
        post_id = entry.get("id", "")
        if not isinstance(post_id, str) or not valid_post_id(post_id):
            raise ConfigError(f"{path}: post #{i + 1} has an invalid id {post_id!r}")
        try:
            posts.append(
                PostInfo(
                    id=post_id,
                    name=str(entry.get("name", "")),
                    school=str(entry.get("school", "")),
                    address=str(entry.get("address", "")),
                    lat=float(entry["lat"]) if "lat" in entry else None,
                    lon=float(entry["lon"]) if "lon" in entry else None,
                )
            )
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: post {post_id!r} has a non-numeric lat/lon") from None
    return posts


class CentralServer:
    def __init__(self, config: ServerConfig, storage: Storage | None = None) -> None:
        self.config = config
        self.storage: Storage = storage or open_storage(config.database)
        self.metrics = Metrics()
        self._log_throttle = LogThrottle()  # per sender and reason: counted always, logged bounded
        self.bus = Bus()
        self.live: dict[str, LivePost] = {}
        self.ready = asyncio.Event()
        self._queue: asyncio.Queue[tuple[Event, float]] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._ack_tasks: set[asyncio.Task[None]] = set()
        # One broker connection, kept up (reconnect, backoff, resumed persistent session).
        self.link = MqttLink(config.mqtt, self._session, will=self._will,
                             before_disconnect=self._say_offline, max_inflight_messages=1000,
                             backoff=Backoff(initial_s=0.2, cap_s=5.0), logger=log)
        self.link.state_listeners.append(self._on_link_state)
        self._setup_metrics()
        console = config.console
        self.commands = CommandTracker(self.storage.commands, self.bus, console.command_timeout_s,
                                       lambda: self._client, self.storage.incidents.note)
        self.calls = CallRelay(self.bus, console.call_timeout_s, lambda: self._client,
                               self.storage.incidents.note)
        self.reload_registry()
        # Patrol teams: paging, escalation, queue.
        self.dispatcher = Dispatcher(config.dispatch, self.storage, self.bus, self.metrics,
                                     self.transition, self.reject)

    # ------------------------------------------------------------------ registry / metrics
    def reload_registry(self) -> None:
        posts = load_registry(self.config.registry.posts_file)
        self.storage.posts.upsert(posts)
        states = self.storage.posts.states()
        faults = self.storage.posts.open_fault_kinds()
        default = self.config.supervision.default_heartbeat_s
        for post in posts:
            if post.id not in self.live:
                state, seen = states.get(post.id, ("unknown", None))
                kinds = faults.get(post.id, set())
                self.live[post.id] = LivePost(
                    state=state, last_seen=seen, interval_s=default,
                    reported_faults=kinds - SERVER_FAULT_KINDS,
                    clone_suspected="clone_suspected" in kinds,
                    last_session_change=time.time() if "clone_suspected" in kinds else 0.0)
        for gone in set(self.live) - {p.id for p in posts}:
            live = self.live.pop(gone)
            if live.deadline:
                live.deadline.cancel()
        log.info("registry: %d posts from %s", len(posts), self.config.registry.posts_file)

    def _setup_metrics(self) -> None:
        m = self.metrics
        m.counter("messages_in_total", "MQTT messages received, by kind")
        m.counter("mqtt_link_transitions_total",
                  "The broker connection's state changes, by state entered")
        m.counter("rejected_total", "Messages rejected, by reason")
        m.counter("events_committed_total", "Alarm events committed (first time)")
        m.counter("events_duplicate_total", "Resent events already committed (ACKed again)")
        m.counter("acks_sent_total", "Application-level ACKs published")
        m.counter("incidents_opened_total", "Incidents opened")
        m.counter("post_offline_total", "Posts that went offline, by reason")
        m.counter("http_requests_total", "HTTP requests, by status")
        m.counter("handler_errors_total", "Messages whose handler failed (a bug), by topic kind")
        m.counter("retained_cleared_total", "Undecodable retained messages cleared, by topic kind")
        m.counter("event_id_collisions_total",
                  "New events whose id another post's event has (committed as this post's own)")
        m.counter("events_clock_suspect_total", "Events whose stated time is implausible")
        m.counter("seq_anomalies_total", "New events whose seq goes back or repeats, by kind")
        m.counter("post_epoch_changes_total", "Posts whose outbox started a new epoch")
        m.counter("post_faults_reported_total", "Faults opened as posts reported them, by kind")
        m.counter("post_faults_throttled_total", "Reported faults not recorded (too many, too fast)")
        m.counter("clone_suspected_total", "Posts whose sessions flapped (a cloned credential?)")
        m.gauge("incidents_open", "Incidents currently open", self.storage.incidents.open_count)
        m.gauge("posts_online", "Posts currently online",
                lambda: sum(1 for p in self.live.values() if p.state == "online"))
        m.gauge("posts_known", "Posts in the registry", lambda: len(self.live))
        m.gauge("ingest_queue_depth", "Events waiting for the committer", self._queue.qsize)
        self.commit_latency = m.histogram(
            "commit_seconds", "Receipt to commit of alarm events",
            (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
        )

    def reject(self, reason: str, topic: str, detail: str, *, retained: bool = False,
               size: int = -1) -> None:
        """Count and log a refused message; clear it from the broker if it is a retained one
        that can never be decoded (it would be refused again on every delivery)."""
        self.metrics.inc("rejected_total", reason=reason)
        parts = topic.split("/", 4)
        sender = parts[3][:64] if len(parts) > 3 else topic[:64]
        allowed, left_out = self._log_throttle.allow((sender, reason))
        if allowed:
            log.warning("rejected message on %s (%d bytes%s): %s %s%s", topic[:120], size,
                        ", retained" if retained else "", reason, detail[:200],
                        left_out_note(left_out))
        if retained and reason in POISON_REASONS:
            self._clear_retained(topic)

    def _clear_retained(self, topic: str) -> None:
        client = self._client
        if client is None or not topic.startswith(f"{TOPIC_PREFIX}/") or len(topic) > 200:
            return
        kind = _topic_kind(topic)

        async def clear() -> None:
            try:
                await client.publish(topic, b"", qos=1, retain=True)
            except aiomqtt.MqttError as exc:
                log.warning("could not clear the retained message on %s: %s", topic[:120], exc)
                return
            self.metrics.inc("retained_cleared_total", kind=kind)
            log.warning("cleared an undecodable retained message on %s", topic[:120])

        task = asyncio.ensure_future(clear())
        self._ack_tasks.add(task)
        task.add_done_callback(self._ack_tasks.discard)

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        from server.web.api import start_http

        runner = await start_http(self)
        loop = asyncio.get_running_loop()
        now = time.time()
        for post_id, live in self.live.items():
            if live.state == "online":  # must prove it again, with a full grace period from now
                self._arm_deadline(post_id, live, now)
        background = [
            asyncio.create_task(self._flush_loop()),
            asyncio.create_task(self._auto_resolve_loop()),
            asyncio.create_task(self.dispatcher.run()),
        ]
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        stopper = asyncio.create_task(self._stop_link_when_asked())
        try:
            await self.link.run()
        finally:
            stopper.cancel()
            for task in background:
                task.cancel()
            await asyncio.gather(stopper, *background, return_exceptions=True)
            for live in self.live.values():
                if live.deadline:
                    live.deadline.cancel()
            self.commands.close()
            self._flush()
            await runner.cleanup()
            self.storage.close()
            log.info("server stopped")

    async def _stop_link_when_asked(self) -> None:
        await self._stopping.wait()
        self.link.stop()

    def _on_sighup(self) -> None:
        try:
            self.reload_registry()
        except ConfigError as exc:
            log.error("registry not reloaded: %s", exc)
        self.dispatcher.reload_teams()

    def _will(self) -> aiomqtt.Will:
        return aiomqtt.Will(server_status_topic(),
                            encode(ServerStatus(state="offline", ts=time.time())),
                            qos=1, retain=True)

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        """A clean stop sends no Last Will: say "offline" ourselves, once the ACKs are out."""
        if self._ack_tasks:
            await asyncio.gather(*self._ack_tasks, return_exceptions=True)
        await client.publish(server_status_topic(),
                             encode(ServerStatus(state="offline", ts=time.time())),
                             qos=1, retain=True)

    def _on_link_state(self, state: LinkState, error: LinkError | None) -> None:
        self.metrics.inc("mqtt_link_transitions_total", state=state.value)
        if state is not LinkState.CONNECTED:
            self.ready.clear()

    async def _session(self, client: aiomqtt.Client, session_present: bool) -> None:
        """One broker connection: subscribe, say "online", read and commit until it drops."""
        self._client = client
        try:
            await client.subscribe([
                (post_subscription("event"), 1),
                (post_subscription("status"), 1),
                (post_subscription("cmdresult"), 1),
                (post_subscription("callstate"), 1),
                (post_subscription("heartbeat"), 0),
                (team_subscription("answer"), 1),
                (team_subscription("status"), 1),
                (team_subscription("position"), 0),
            ])
            await client.publish(server_status_topic(),
                                 encode(ServerStatus(state="online", ts=time.time())),
                                 qos=1, retain=True)
            log.info("connected to broker %s (session %s)", self.link.settings.describe(),
                     "resumed" if session_present else "new")
            self.ready.set()
            self.dispatcher.on_connected(client)
            tasks = [asyncio.create_task(self._reader(client)),
                     asyncio.create_task(self._committer(client))]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self.ready.clear()
            self._client = None
            self.dispatcher.on_connected(None)

    # ------------------------------------------------------------------ ingest
    async def _reader(self, client: aiomqtt.Client) -> None:
        # aiomqtt hands over one message per event-loop turn; the committer would then always
        # find a batch of one and every event would pay its own fsync. So after each awaited
        # message, take whatever aiomqtt has already read (its queue is private in 2.x, which
        # is pinned): a burst of 1,000 presses then commits in ~10 transactions, not 1,000.
        backlog: asyncio.Queue[aiomqtt.Message] = client._queue
        async for message in client.messages:
            self.handle(str(message.topic), message.payload, bool(message.retain))
            while not backlog.empty():
                more = backlog.get_nowait()
                self.handle(str(more.topic), more.payload, bool(more.retain))

    def handle(self, topic: str, payload: object, retained: bool = False) -> None:
        """Decode, check and route one message. Never raises: bad input is counted and logged
        as a rejection, a failing handler as a handler error."""
        try:
            if not isinstance(payload, bytes | bytearray):
                payload = b"" if payload is None else str(payload).encode()
            self._handle(topic, bytes(payload), retained)
        except Exception:
            size = len(payload) if isinstance(payload, bytes | bytearray) else -1
            self.metrics.inc("handler_errors_total", kind=_topic_kind(topic))
            log.exception("handling a message on %s (%d bytes%s) failed", topic[:120], size,
                          ", retained" if retained else "")

    def _handle(self, topic: str, payload: bytes, retained: bool) -> None:
        received = time.time()
        if topic.startswith(TEAM_TOPIC_PREFIX):
            self.dispatcher.handle(topic, payload, retained)
            return
        try:
            where, message = decode_from_post(topic, payload)
        except Rejected as exc:
            self.reject(exc.reason, topic, exc.detail, retained=retained, size=len(payload))
            return
        live = self.live.get(where.post_id)
        if live is None:
            self.reject("unknown_post", topic, f"post {where.post_id!r} is not registered")
            return
        self.metrics.inc("messages_in_total", kind=where.kind)
        if isinstance(message, Event):
            self._queue.put_nowait((message, received))
            self._seen(where.post_id, live, received)
        elif isinstance(message, Heartbeat):
            live.interval_s = message.interval_s
            sample = received - message.ts
            live.clock_offset_s = sample if live.clock_offset_s is None else (
                live.clock_offset_s + CLOCK_SMOOTHING * (sample - live.clock_offset_s))
            self._reported_faults(where.post_id, live, message.faults, received)
            self._clone_check(where.post_id, live, received, session_changed=False)
            live.health = {
                "uptime_s": message.uptime_s, "outbox_depth": message.outbox_depth,
                "button": message.button, "strobe": message.strobe, "siren": message.siren,
                "help": message.help, "silent": message.silent, "interval_s": message.interval_s,
                "clock_offset_s": round(live.clock_offset_s, 3),
                "faults": sorted(live.reported_faults),
                "clone_suspected": live.clone_suspected,
            }
            self._seen(where.post_id, live, received)
        elif isinstance(message, Status):
            if not retained:  # a retained status is an old one, redelivered to this server
                self._clone_check(where.post_id, live, received, session_changed=True)
            # A new MQTT session of the post (reboot, reconnect) or its loss ends its calls.
            self.calls.post_session_changed(
                where.post_id, message.state, message.ts if message.state == "online" else None)
            if message.state == "online":
                self._seen(where.post_id, live, received)
            elif live.state != "offline":
                self._went_offline(where.post_id, live, message.reason or "offline", received)
        elif isinstance(message, CommandResult):
            self.commands.on_result(message)
        elif isinstance(message, CallSignal):
            self.calls.on_signal(message)

    async def _committer(self, client: aiomqtt.Client) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while not queue.empty() and len(batch) < COMMIT_BATCH_MAX:
                batch.append(queue.get_nowait())
            try:
                results = self.storage.incidents.commit_events(batch)
            except Exception:
                # Nothing is acknowledged, so every post will resend: no alarm is lost.
                log.exception("commit of %d events failed; the posts will resend them", len(batch))
                continue
            committed_at = time.time()
            for (event, received), res in zip(batch, results, strict=True):
                try:
                    self._committed(event, received, res, committed_at)
                except Exception:  # the ACK below must go out whatever happens here
                    self.metrics.inc("handler_errors_total", kind="commit")
                    log.exception("after committing event %s of post %s", event.id, event.post)
            task = asyncio.create_task(self._send_acks(client, batch, results))
            self._ack_tasks.add(task)
            task.add_done_callback(self._ack_tasks.discard)

    def _committed(self, event: Event, received: float, res: Committed,
                   committed_at: float) -> None:
        if res.duplicate:
            self.metrics.inc("events_duplicate_total")
            return
        self.metrics.inc("events_committed_total")
        self.commit_latency.observe(committed_at - received)
        if res.collision:
            self.metrics.inc("event_id_collisions_total")
            log.warning("post %s sent event %s whose id another post's event has: committed as "
                        "its own", event.post, event.id)
        if res.clock_suspect:
            self.metrics.inc("events_clock_suspect_total")
            log.warning("post %s event %s: stated time %.0f is implausible (received %.0f)",
                        event.post, event.id, event.ts, received)
        if res.seq_anomaly:
            self.metrics.inc("seq_anomalies_total", kind=res.seq_anomaly)
            log.warning("post %s event %s: seq %d %s (epoch %r)", event.post, event.id, event.seq,
                        "goes backwards" if res.seq_anomaly == "regression" else "repeats",
                        event.epoch)
        if res.epoch_changed:
            self.metrics.inc("post_epoch_changes_total")
            log.warning("post %s started a new outbox epoch %r (was %r): its storage was wiped "
                        "or replaced", event.post, event.epoch, res.epoch_changed)
        if res.new_incident:
            self.metrics.inc("incidents_opened_total")
            log.info("incident %s opened by post %s (event %s)",
                     res.incident_id, event.post, event.id)
        kind = IncidentOpened if res.new_incident else EventJoined
        self.bus.publish(kind(incident_id=res.incident_id, post_id=event.post, event_id=event.id,
                              pressed_at=event.ts, test=res.test))

    async def _send_acks(self, client: aiomqtt.Client, batch: list[tuple[Event, float]],
                         results: list[Committed]) -> None:
        now = time.time()
        sends = [
            client.publish(
                post_topic(event.post, "ack"),
                encode(Ack(post=event.post, event_id=res.event_id, incident_id=res.incident_id,
                           ts=now, duplicate=res.duplicate)),
                qos=1,
            )
            for (event, _), res in zip(batch, results, strict=True)
        ]
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        sent = sum(1 for o in outcomes if not isinstance(o, BaseException))
        self.metrics.inc("acks_sent_total", sent)
        if sent < len(outcomes):
            log.warning("%d ACKs not sent (broker gone); the posts will resend",
                        len(outcomes) - sent)

    # ------------------------------------------------------------------ incidents
    def transition(self, incident_id: str, to: str, actor: str, *, reason: str = "",
                   classification: str | None = None) -> dict[str, object]:
        """Move an incident through its lifecycle (audited) and tell every subscriber.

        Raises ``LookupError`` (no such incident) or ``server.incidents.InvalidTransition``.
        """
        incident = self.storage.incidents.transition(incident_id, to, actor, reason=reason,
                                           classification=classification)
        self.bus.publish(IncidentUpdated(incident_id=incident_id, state=str(incident["state"]),
                                         action=to, actor=actor))
        log.info("incident %s: %s by %s -> %s", incident_id, to, actor, incident["state"])
        return incident

    def set_test_mode(self, post_id: str, on: bool, actor: str, reason: str) -> dict[str, object]:
        """Put a post in test mode (its presses are committed and ACKed as ever, but open incidents
        classified ``test`` that ring no console and page no team) or take it out. Taking it out
        resolves the post's open test incidents, so a real press afterwards opens a real one.
        Raises ``LookupError`` for an unknown post."""
        if post_id not in self.live:
            raise LookupError(f"no post {post_id!r}")
        row = self.storage.posts.set_test_mode(post_id, on, actor, reason)
        log.warning("post %s %s test mode by %s: %s", post_id, "in" if on else "out of",
                    actor, reason or "-")
        self.bus.publish(PostTestMode(post_id=post_id, test_mode=on, actor=actor, reason=reason))
        if not on:
            for incident in self.storage.incidents.recent("open", 1000):
                if incident["post_id"] == post_id and incident["classification"] == "test":
                    self.transition(incident["id"], "resolved", actor, classification="test",
                                    reason="test mode ended")
        return row

    # ------------------------------------------------------------------ supervision
    def _reported_faults(self, post_id: str, live: LivePost, codes: tuple[str, ...],
                         now: float) -> None:
        """Open a fault record for each code the post starts reporting, close those it stops."""
        reported = set(codes) - SERVER_FAULT_KINDS
        for code in sorted(live.reported_faults - reported):
            self.storage.posts.close_fault(post_id, code, now)
            live.reported_faults.discard(code)
            log.info("post %s no longer reports fault %s", post_id, code)
        while live.fault_opens and live.fault_opens[0] < now - FAULT_WINDOW_S:
            live.fault_opens.popleft()
        for code in sorted(reported - live.reported_faults):
            if len(live.fault_opens) >= FAULT_OPENS_PER_WINDOW:
                self.metrics.inc("post_faults_throttled_total")
                log.warning("post %s reports faults too fast; %s not recorded yet", post_id, code)
                continue
            live.fault_opens.append(now)
            self.storage.posts.open_fault(post_id, code, FAULT_TEXT.get(code, "reported by the post"),
                                    now)
            live.reported_faults.add(code)
            self.metrics.inc("post_faults_reported_total",
                             kind=code if code in FAULT_TEXT else "other")
            log.warning("post %s reports fault %s", post_id, code)

    def _clone_check(self, post_id: str, live: LivePost, now: float,
                     session_changed: bool) -> None:
        """Sessions that flap mean two devices fight over one credential: a fault."""
        changes = live.session_changes
        if session_changed:
            changes.append(now)
            live.last_session_change = now
        while changes and changes[0] < now - CLONE_WINDOW_S:
            changes.popleft()
        if len(changes) >= CLONE_SESSIONS and not live.clone_suspected:
            live.clone_suspected = True
            self.storage.posts.open_fault(
                post_id, "clone_suspected",
                f"two devices may be using this post's credential ({len(changes)} sessions "
                f"started or lost within {CLONE_WINDOW_S:g} s)", now)
            self.metrics.inc("clone_suspected_total")
            log.warning("post %s: %d session changes within %g s; two devices may be using its "
                        "credential", post_id, len(changes), CLONE_WINDOW_S)
        elif live.clone_suspected and now - live.last_session_change > CLONE_QUIET_S:
            live.clone_suspected = False
            self.storage.posts.close_fault(post_id, "clone_suspected", now)
            log.info("post %s: sessions steady for %g s, clone suspicion closed", post_id,
                     CLONE_QUIET_S)

    def _seen(self, post_id: str, live: LivePost, now: float) -> None:
        live.last_seen = now
        live.dirty = True
        if live.state != "online":
            was = live.state
            live.state = "online"
            self.storage.posts.set_state(post_id, "online", now, "")
            self.bus.publish(PostState(post_id=post_id, state="online"))
            log.info("post %s online (was %s)", post_id, was)
        self._arm_deadline(post_id, live, now)

    def _arm_deadline(self, post_id: str, live: LivePost, since: float) -> None:
        """Offline unless heard from within the grace period counted from ``since``."""
        if live.deadline is not None:
            live.deadline.cancel()
        grace = self.config.supervision.grace_intervals * live.interval_s
        loop = asyncio.get_running_loop()
        live.deadline = loop.call_later(
            max(since + grace - time.time(), 0.0), self._deadline_missed, post_id
        )

    def _deadline_missed(self, post_id: str) -> None:
        live = self.live.get(post_id)
        if live is None or live.state == "offline":
            return
        live.deadline = None
        self._went_offline(post_id, live, "heartbeat missed", time.time())

    def _went_offline(self, post_id: str, live: LivePost, reason: str, now: float) -> None:
        if live.deadline is not None:
            live.deadline.cancel()
            live.deadline = None
        live.state = "offline"
        self.storage.posts.set_state(post_id, "offline", now, reason)
        self.bus.publish(PostState(post_id=post_id, state="offline", reason=reason))
        self.metrics.inc("post_offline_total", reason=reason)
        log.warning("post %s offline: %s", post_id, reason)

    def _flush(self) -> None:
        rows = []
        for post_id, live in self.live.items():
            if live.dirty and live.last_seen is not None:
                rows.append((post_id, live.last_seen, json.dumps(live.health)))
                live.dirty = False
        if rows:
            self.storage.posts.save_live(rows)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.supervision.flush_s)
            try:
                self._flush()
            except Exception:
                log.exception("could not save live post state")

    async def _auto_resolve_loop(self) -> None:
        idle = self.config.incidents.auto_resolve_s
        if idle <= 0:
            return
        while True:
            await asyncio.sleep(min(idle / 4, 5.0))
            for incident_id in self.storage.incidents.resolve_idle(idle, time.time()):
                self.bus.publish(IncidentUpdated(incident_id=incident_id, state="resolved",
                                                 action="resolved", actor="system"))
                log.info("incident %s resolved automatically after %.0f s idle", incident_id, idle)


def _topic_kind(topic: str) -> str:
    """A bounded metrics label for a topic: its message kind (``team_`` kinds for teams)."""
    kind = topic.rsplit("/", 1)[-1]
    if topic.startswith(TEAM_TOPIC_PREFIX):
        return f"team_{kind}" if kind in TEAM_KINDS else "other"
    return kind if kind in EDGE_KINDS else "other"
