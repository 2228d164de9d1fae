"""The server's ingest and commit in milliseconds: validation, the committer, the ACKs.

A real :class:`server.app.CentralServer` on a real SQLite file (a deployment written to a
temporary directory, no broker started), fed through its public ``handle`` (what the MQTT reader
calls for every message) and committing through its committer with an in-memory publish target
in place of the broker connection. Each ACK the target receives is checked against the database
through a connection of its own, at the moment it is published: the server acknowledges only
what it has committed. The broker-level promises stay with tests/test_promises.py; these fail in
milliseconds when the server's own logic is broken, which is what ``alarmpost bench mutation``
needs.

The committer is reached through :func:`start_committer`, the one place that names it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import server.app as server_app
from protocol.messages import (
    Ack,
    CallSignal,
    CommandResult,
    Event,
    Heartbeat,
    Status,
    decode_from_server,
    encode,
)
from protocol.topics import post_topic, team_topic
from protocol.ulid import new_ulid
from provisioning import deployment as d
from server.app import CentralServer
from server.config import load_server_config
from tests.helpers import until

POST, OTHER = "P001", "P002"


@dataclass
class Acked:
    topic: str
    ack: Ack
    qos: int
    committed: bool  # the event's row was in the database when the ACK went out


@dataclass
class PublishTarget:
    """Stands in for the broker connection: records every ACK and, as it arrives, looks the
    event up in the server's database through its own connection."""

    db_path: Path
    acks: list[Acked] = field(default_factory=list)
    fail_for: set[str] = field(default_factory=set)  # event ids whose ACK publish raises
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _db: sqlite3.Connection | None = None

    def lookup(self, post_id: str, event_id: str) -> str | None:
        """The incident of a committed event, read through the target's own connection."""
        if self._db is None:
            self._db = sqlite3.connect(self.db_path, isolation_level=None)
        row = self._db.execute("SELECT incident_id FROM events WHERE post_id=? AND id=?",
                               (post_id, event_id)).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    async def publish(self, topic: str, payload: bytes, qos: int = 0,
                      retain: bool = False) -> None:
        post_id = topic.split("/")[3]
        ack = decode_from_server(topic, payload, post_id)
        assert isinstance(ack, Ack)
        if ack.event_id in self.fail_for:
            raise ConnectionError("broker gone")
        committed = self.lookup(ack.post, ack.event_id) == ack.incident_id
        self.acks.append(Acked(topic, ack, qos, committed))
        async with self.arrived:
            self.arrived.notify_all()

    async def wait_for(self, count: int, within: float = 2.0) -> list[Acked]:
        async def enough() -> None:
            async with self.arrived:
                await self.arrived.wait_for(lambda: len(self.acks) >= count)

        await asyncio.wait_for(enough(), within)
        return self.acks


@dataclass
class Ingest:
    server: CentralServer
    target: PublishTarget
    start: Callable[[], Awaitable[None]]

    def event(self, post: str = POST, seq: int = 1, **fields: Any) -> Event:
        return Event(id=new_ulid(), post=post, seq=seq, ts=time.time(), **fields)

    def send(self, event: Event, topic_post: str | None = None) -> None:
        self.server.handle(post_topic(topic_post or event.post, "event"), encode(event))

    def metric(self, name: str, **labels: str) -> float:
        return self.server.metrics.value(name, **labels)

    def rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """What the database holds, read through a connection of the test's own."""
        with sqlite3.connect(self.target.db_path) as db:
            return db.execute(sql, args).fetchall()

    def events_stored(self) -> int:
        return int(self.rows("SELECT count(*) FROM events")[0][0])

    def wrap_commit(self, wrap: Callable[[Callable[[Any], Any]], Callable[[Any], Any]]) -> None:
        """Put ``wrap(commit)`` in place of the storage's commit of a batch of events."""
        incidents = self.server.storage.incidents
        incidents.commit_events = wrap(incidents.commit_events)  # type: ignore[method-assign,assignment]


def incident_notices(queue: asyncio.Queue[Any]) -> list[dict[str, Any]]:
    """The incident notices the bus has queued for a subscriber (post states left out)."""
    out = []
    while not queue.empty():
        notice = queue.get_nowait().as_dict()
        if notice["type"] in ("incident_opened", "event_joined"):
            out.append(notice)
    return out


def start_committer(server: CentralServer, target: PublishTarget) -> asyncio.Task[None]:
    """The server's committer, publishing its ACKs to ``target`` (in place of the broker)."""
    return asyncio.create_task(server._committer(target))  # type: ignore[arg-type]


@pytest.fixture
async def ingest(tmp_path: Path) -> AsyncIterator[Ingest]:
    dep = d.create(tmp_path / "dep", d.district_posts(3))
    server = CentralServer(load_server_config(dep.server_config))
    target = PublishTarget(Path(server.config.database.path))
    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        tasks.append(start_committer(server, target))

    yield Ingest(server, target, start)
    for task in tasks:
        assert not task.done(), "the committer ended"
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for live in server.live.values():
        if live.deadline is not None:
            live.deadline.cancel()
    target.close()
    server.storage.close()


# ------------------------------------------------------------------------------- commit, ACK
async def test_an_event_is_committed_then_acknowledged_to_its_post(ingest: Ingest) -> None:
    notices = ingest.server.bus.subscribe()
    event = ingest.event(hold_ms=150)
    ingest.send(event)
    assert ingest.metric("messages_in_total", kind="event") == 1
    assert ingest.server.live[POST].state == "online"  # an event is a sign of life
    await ingest.start()
    [acked] = await ingest.target.wait_for(1)
    assert acked.topic == post_topic(POST, "ack") and acked.qos == 1
    assert (acked.ack.post, acked.ack.event_id, acked.ack.duplicate) == (POST, event.id, False)
    assert acked.committed, "the ACK went out before its event was committed"
    [(incident_id, post_id, state)] = ingest.rows("SELECT id, post_id, state FROM incidents")
    assert (acked.ack.incident_id, post_id, state) == (incident_id, POST, "new")
    assert ingest.metric("events_committed_total") == 1
    assert ingest.metric("incidents_opened_total") == 1
    assert ingest.metric("acks_sent_total") == 1
    assert ingest.metric("events_duplicate_total") == 0
    assert incident_notices(notices) == [{"type": "incident_opened", "incident_id": incident_id,
                                "post_id": POST, "event_id": event.id, "pressed_at": event.ts,
                                "test": False}]


async def test_a_resent_event_is_acknowledged_as_a_duplicate_and_stored_once(
        ingest: Ingest) -> None:
    await ingest.start()
    event = ingest.event()
    ingest.send(event)
    [first] = await ingest.target.wait_for(1)
    ingest.send(event)  # the post did not see the first ACK and resends
    second = (await ingest.target.wait_for(2))[1]
    assert second.ack.duplicate is True and second.ack.event_id == event.id
    assert second.ack.incident_id == first.ack.incident_id and second.committed
    assert ingest.events_stored() == 1
    assert ingest.metric("events_duplicate_total") == 1
    assert ingest.metric("events_committed_total") == 1
    assert ingest.metric("acks_sent_total") == 2


async def test_queued_events_are_committed_in_one_batch_and_each_acknowledged(
        ingest: Ingest, caplog: pytest.LogCaptureFixture) -> None:
    batches: list[int] = []

    def recording(commit: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def wrapped(batch: Any) -> Any:
            batches.append(len(batch))
            return commit(batch)
        return wrapped

    ingest.wrap_commit(recording)
    notices = ingest.server.bus.subscribe()
    events = [ingest.event(seq=1), ingest.event(seq=2), ingest.event(OTHER, seq=1)]
    for event in events:
        ingest.send(event)
    await ingest.start()
    acks = await ingest.target.wait_for(3)
    assert batches == [3]
    assert [a.ack.event_id for a in acks] == [e.id for e in events]
    assert [a.topic for a in acks] == [post_topic(p, "ack") for p in (POST, POST, OTHER)]
    assert all(a.committed and not a.ack.duplicate for a in acks)
    assert acks[0].ack.incident_id == acks[1].ack.incident_id != acks[2].ack.incident_id
    kinds = [n["type"] for n in incident_notices(notices)]
    assert kinds == ["incident_opened", "event_joined", "incident_opened"]
    assert ingest.metric("events_committed_total") == 3
    assert ingest.metric("incidents_opened_total") == 2
    # The batch's three ACKs are counted as three, and none is reported missing.
    await until(lambda: ingest.metric("acks_sent_total") == 3, 2, "3 ACKs counted as sent")
    assert "ACKs not sent" not in caplog.text


async def test_a_burst_is_committed_in_batches_of_at_most_500(ingest: Ingest) -> None:
    batches: list[int] = []

    def recording(commit: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def wrapped(batch: Any) -> Any:
            batches.append(len(batch))
            return commit(batch)
        return wrapped

    ingest.wrap_commit(recording)
    for seq in range(1, 502):
        ingest.send(ingest.event(seq=seq))
    await ingest.start()
    await ingest.target.wait_for(501, within=10)
    assert batches == [500, 1]
    assert all(a.committed for a in ingest.target.acks)


async def test_a_batch_holds_at_most_its_maximum_and_the_rest_waits_for_the_next(
        ingest: Ingest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_app, "COMMIT_BATCH_MAX", 3)
    batches: list[int] = []

    def recording(commit: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def wrapped(batch: Any) -> Any:
            batches.append(len(batch))
            return commit(batch)
        return wrapped

    ingest.wrap_commit(recording)
    for seq in range(1, 5):
        ingest.send(ingest.event(seq=seq))
    await ingest.start()
    await ingest.target.wait_for(4)
    assert batches == [3, 1]


async def test_the_ack_tasks_are_let_go_once_their_acks_are_out(ingest: Ingest) -> None:
    await ingest.start()
    for seq in (1, 2):
        ingest.send(ingest.event(seq=seq))
        await ingest.target.wait_for(seq)
    # Kept only while under way: the set of tasks the server waits for at its stop does not
    # grow with every batch it ever acknowledged.
    await until(lambda: not ingest.server._ack_tasks, 2, "the ACK tasks let go")


async def test_a_commit_that_fails_acknowledges_nothing_and_the_resend_is_committed(
        ingest: Ingest, caplog: pytest.LogCaptureFixture) -> None:
    failures = [OSError("disk full")]
    failed = asyncio.Event()

    def failing_once(commit: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def wrapped(batch: Any) -> Any:
            if failures:
                failed.set()
                raise failures.pop()
            return commit(batch)
        return wrapped

    ingest.wrap_commit(failing_once)
    await ingest.start()
    event = ingest.event()
    ingest.send(event)
    later = ingest.event(seq=2)
    await asyncio.wait_for(failed.wait(), 2)  # the first batch, on its own, failed
    ingest.send(later)
    [acked] = await ingest.target.wait_for(1)
    assert acked.ack.event_id == later.id  # the committer carried on after the failure
    assert "commit of 1 events failed; the posts will resend them" in caplog.text
    ingest.send(event)  # the post resends what was never acknowledged
    acks = await ingest.target.wait_for(2)
    assert acks[1].ack.event_id == event.id and acks[1].ack.duplicate is False
    assert acks[1].committed and ingest.events_stored() == 2
    assert ingest.metric("acks_sent_total") == 2


async def test_a_failure_after_the_commit_is_counted_and_the_ack_still_goes_out(
        ingest: Ingest) -> None:
    def broken(notice: object) -> None:
        raise RuntimeError("subscriber bug")

    ingest.server.bus.publish = broken  # type: ignore[method-assign]
    await ingest.start()
    event = ingest.event()
    ingest.send(event)
    [acked] = await ingest.target.wait_for(1)
    assert acked.ack.event_id == event.id and acked.committed
    assert ingest.metric("handler_errors_total", kind="commit") == 1
    assert ingest.metric("events_committed_total") == 1


async def test_acks_the_broker_refuses_are_not_counted_as_sent(ingest: Ingest) -> None:
    events = [ingest.event(seq=1), ingest.event(OTHER, seq=1)]
    ingest.target.fail_for.add(events[0].id)
    for event in events:
        ingest.send(event)
    await ingest.start()
    [acked] = await ingest.target.wait_for(1)
    assert acked.ack.event_id == events[1].id
    later = ingest.event(seq=2)
    ingest.send(later)  # the committer goes on
    await ingest.target.wait_for(2)
    assert ingest.metric("acks_sent_total") == 2


# -------------------------------------------------------------------------------- the door
class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text")


async def test_a_payload_that_is_neither_bytes_nor_text_is_counted_never_raised(
        ingest: Ingest) -> None:
    ingest.server.handle(post_topic(POST, "event"), _Unprintable())
    assert ingest.metric("handler_errors_total", kind="event") == 1
    ingest.send(ingest.event())  # the next message is handled as ever
    assert ingest.metric("messages_in_total", kind="event") == 1


@dataclass
class RetainedClears:
    """Stands in for the broker connection where the server clears retained messages."""

    published: list[tuple[str, bytes, int, bool]] = field(default_factory=list)

    async def publish(self, topic: str, payload: bytes, qos: int = 0,
                      retain: bool = False) -> None:
        self.published.append((topic, payload, qos, retain))


async def test_an_undecodable_retained_team_message_is_refused_and_cleared(
        ingest: Ingest) -> None:
    broker = RetainedClears()
    ingest.server._client = broker  # type: ignore[assignment]
    topic = team_topic("T1", "position")
    ingest.server.handle(topic, b"{not json", retained=True)
    assert ingest.metric("rejected_total", reason="malformed") == 1
    # Retained, it would be refused again at every delivery: the server clears it.
    await until(lambda: broker.published, 2, "the retained team message cleared")
    assert broker.published == [(topic, b"", 1, True)]


async def test_an_undecodable_retained_post_message_is_refused_and_cleared(
        ingest: Ingest) -> None:
    broker = RetainedClears()
    ingest.server._client = broker  # type: ignore[assignment]
    topic = post_topic(POST, "status")
    ingest.server.handle(topic, b"{not json", retained=True)
    assert ingest.metric("rejected_total", reason="malformed") == 1
    await until(lambda: broker.published, 2, "the retained status cleared")
    assert broker.published == [(topic, b"", 1, True)]


async def test_bad_events_are_refused_counted_and_never_committed(ingest: Ingest) -> None:
    await ingest.start()
    good = ingest.event()
    payload = encode(good)
    ingest.server.handle(post_topic(OTHER, "event"), payload)  # topic and body disagree
    ingest.server.handle(post_topic("P999", "event"), encode(ingest.event("P999")))
    ingest.server.handle(post_topic(POST, "event"), b"{not json")
    ingest.server.handle(post_topic(POST, "event"), None)  # a cleared retained message
    ingest.server.handle(post_topic(POST, "ack"), payload)  # not what posts send
    ingest.server.handle("alarmpost/v1/post/P+1/event", payload)
    for reason in ("post_mismatch", "unknown_post", "malformed", "empty", "wrong_direction",
                   "bad_topic"):
        assert ingest.metric("rejected_total", reason=reason) == 1, reason
    assert ingest.metric("messages_in_total", kind="event") == 0
    assert ingest.server.live["P002"].state != "online"
    ingest.server.handle(post_topic(POST, "event"), bytearray(payload))  # any bytes-like
    [acked] = await ingest.target.wait_for(1)
    assert acked.ack.event_id == good.id and ingest.events_stored() == 1
    assert ingest.metric("handler_errors_total", kind="event") == 0


async def test_a_text_payload_is_read_as_its_utf8_bytes(ingest: Ingest) -> None:
    await ingest.start()
    event = ingest.event()
    ingest.server.handle(post_topic(POST, "event"), encode(event).decode())
    [acked] = await ingest.target.wait_for(1)
    assert acked.ack.event_id == event.id


async def test_a_handler_that_fails_is_counted_by_topic_kind_and_the_next_message_handled(
        ingest: Ingest, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("relay bug")

    ingest.server.calls.post_session_changed = broken  # type: ignore[method-assign,assignment]
    status = encode(Status(post=POST, state="online", ts=time.time()))
    ingest.server.handle(post_topic(POST, "status"), status)
    assert ingest.metric("handler_errors_total", kind="status") == 1
    assert f"handling a message on {post_topic(POST, 'status')} ({len(status)} bytes) failed" \
        in caplog.text
    await ingest.start()
    ingest.send(ingest.event())
    await ingest.target.wait_for(1)


# -------------------------------------------------------------------- heartbeats and status
def _beat(post: str = POST, **fields: Any) -> bytes:
    values: dict[str, Any] = {"post": post, "ts": time.time(), "interval_s": 4.0,
                              "uptime_s": 12.5, "outbox_depth": 2, "button": False,
                              "strobe": True, "siren": False, "help": True, "silent": True}
    values.update(fields)
    return encode(Heartbeat(**values))


async def test_a_heartbeat_updates_the_posts_health_interval_and_clock_offset(
        ingest: Ingest) -> None:
    server = ingest.server
    now = time.time()
    server.handle(post_topic(POST, "heartbeat"), _beat(ts=now - 10.0))
    live = server.live[POST]
    assert live.state == "online" and live.interval_s == 4.0
    assert live.clock_offset_s is not None and 9.9 < live.clock_offset_s < 11.0
    assert live.health == {
        "uptime_s": 12.5, "outbox_depth": 2, "button": False, "strobe": True, "siren": False,
        "help": True, "silent": True, "interval_s": 4.0,
        "clock_offset_s": round(live.clock_offset_s, 3), "faults": [],
        "clone_suspected": False,
    }
    first = live.clock_offset_s
    server.handle(post_topic(POST, "heartbeat"), _beat(ts=time.time()))  # now in step
    # Smoothed: a fifth of the way from the old estimate to the new sample.
    assert live.clock_offset_s is not None
    assert first * 0.8 - 0.2 < live.clock_offset_s < first * 0.8 + 0.2
    assert ingest.metric("messages_in_total", kind="heartbeat") == 2
    assert ingest.rows("SELECT state FROM posts WHERE id=?", POST) == [("online",)]


async def test_faults_a_post_reports_open_and_close_with_its_heartbeats(ingest: Ingest) -> None:
    server = ingest.server
    server.handle(post_topic(POST, "heartbeat"), _beat(faults=("storage",)))
    assert server.live[POST].health["faults"] == ["storage"]
    assert ingest.rows("SELECT kind FROM faults WHERE post_id=? AND ended_at IS NULL",
                       POST) == [("storage",)]
    server.handle(post_topic(POST, "heartbeat"), _beat())
    assert server.live[POST].health["faults"] == []
    assert ingest.rows("SELECT kind FROM faults WHERE post_id=? AND ended_at IS NULL",
                       POST) == []


async def test_status_online_and_offline_follow_the_post(ingest: Ingest) -> None:
    server = ingest.server
    notices = server.bus.subscribe()
    topic = post_topic(POST, "status")
    server.handle(topic, encode(Status(post=POST, state="online", ts=time.time())))
    assert server.live[POST].state == "online"
    server.handle(topic, encode(Status(post=POST, state="offline", ts=time.time(),
                                       reason="connection lost")))
    assert server.live[POST].state == "offline"
    assert ingest.rows("SELECT state FROM posts WHERE id=?", POST) == [("offline",)]
    assert ingest.rows("SELECT detail FROM faults WHERE post_id=? AND kind='offline' AND "
                       "ended_at IS NULL", POST) == [("connection lost",)]
    states = [n.as_dict() for n in _drain(notices) if n.as_dict()["type"] == "post_state"]
    assert [(n["state"], n["reason"]) for n in states] == [("online", ""),
                                                            ("offline", "connection lost")]
    # Offline again while offline changes nothing; a will without a reason says "offline".
    server.handle(topic, encode(Status(post=POST, state="offline", ts=time.time())))
    assert ingest.metric("post_offline_total", reason="connection lost") == 1
    server.handle(topic, encode(Status(post=POST, state="online", ts=time.time())))
    server.handle(topic, encode(Status(post=POST, state="offline", ts=time.time())))
    assert ingest.metric("post_offline_total", reason="offline") == 1


def _drain(queue: asyncio.Queue[Any]) -> list[Any]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def test_an_event_from_a_post_not_yet_online_brings_it_online(ingest: Ingest) -> None:
    server = ingest.server
    assert server.live[POST].state != "online"
    notices = server.bus.subscribe()
    ingest.send(ingest.event())
    assert server.live[POST].state == "online"
    assert ingest.rows("SELECT state FROM posts WHERE id=?", POST) == [("online",)]
    states = [n.as_dict() for n in _drain(notices) if n.as_dict()["type"] == "post_state"]
    assert [(n["post_id"], n["state"]) for n in states] == [(POST, "online")]


@pytest.mark.parametrize("kind", ["heartbeat", "status"])
async def test_a_heartbeat_or_an_online_status_brings_a_post_online(
        ingest: Ingest, kind: str) -> None:
    server = ingest.server
    notices = server.bus.subscribe()
    payload = _beat() if kind == "heartbeat" else \
        encode(Status(post=POST, state="online", ts=time.time()))
    server.handle(post_topic(POST, kind), payload)
    assert server.live[POST].state == "online"
    assert ingest.rows("SELECT state FROM posts WHERE id=?", POST) == [("online",)]
    states = [n.as_dict() for n in _drain(notices) if n.as_dict()["type"] == "post_state"]
    assert [(n["post_id"], n["state"]) for n in states] == [(POST, "online")]


async def test_session_changes_command_results_and_call_signals_reach_their_handlers(
        ingest: Ingest) -> None:
    server = ingest.server
    seen: list[tuple[Any, ...]] = []
    server.calls.post_session_changed = lambda *a: seen.append(("session", *a))  # type: ignore[method-assign]
    server.commands.on_result = lambda m: seen.append(("result", m))  # type: ignore[method-assign]
    server.calls.on_signal = lambda m: seen.append(("signal", m))  # type: ignore[method-assign]
    online = Status(post=POST, state="online", ts=time.time())
    offline = Status(post=POST, state="offline", ts=time.time() + 1, reason="lost")
    result = CommandResult(id=new_ulid(), post=POST, cmd="siren_off", ok=True, ts=time.time())
    signal = CallSignal(id=new_ulid(), post=POST, kind="hangup", ts=time.time())
    for kind, message in (("status", online), ("status", offline), ("cmdresult", result),
                          ("callstate", signal)):
        server.handle(post_topic(POST, kind), encode(message))
    assert seen == [("session", POST, "online", online.ts), ("session", POST, "offline", None),
                    ("result", result), ("signal", signal)]
    assert ingest.metric("handler_errors_total", kind="status") == 0


async def test_steady_heartbeats_close_a_suspected_clone(ingest: Ingest) -> None:
    server = ingest.server
    live = server.live[POST]
    long_ago = time.time() - server_app.CLONE_QUIET_S - 5
    server.storage.posts.open_fault(POST, "clone_suspected", "three sessions", long_ago)
    live.clone_suspected, live.last_session_change = True, long_ago
    server.handle(post_topic(POST, "heartbeat"), _beat())
    assert not live.clone_suspected
    assert ingest.rows("SELECT count(*) FROM faults WHERE post_id=? AND kind='clone_suspected' "
                       "AND ended_at IS NOT NULL", POST) == [(1,)]


async def test_only_live_session_changes_count_towards_a_suspected_clone(ingest: Ingest) -> None:
    server = ingest.server
    topic = post_topic(POST, "status")
    online = encode(Status(post=POST, state="online", ts=time.time()))
    offline = encode(Status(post=POST, state="offline", ts=time.time()))
    for payload in (online, offline, online):  # redelivered retained statuses: old news
        server.handle(topic, payload, retained=True)
    assert not server.live[POST].clone_suspected
    for payload in (offline, online, offline):  # three live session changes in a minute
        server.handle(topic, payload)
    assert server.live[POST].clone_suspected
    assert ingest.rows("SELECT count(*) FROM faults WHERE post_id=? AND kind='clone_suspected'",
                       POST) == [(1,)]
