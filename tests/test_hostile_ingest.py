"""A post in an attacker's hands: what it publishes on its own topics may misreport about itself,
never stop the server, never take another post's alarm, never run the incident clock."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from protocol.messages import Ack, Event, Heartbeat, Status, decode_from_server, encode
from protocol.ulid import new_ulid
from provisioning import deployment as d
from server.app import CentralServer
from server.storage import PostInfo, Storage
from tests.helpers import ServerProcess, api, db_rows, run_server, server_side_credentials, until
from tests.storage_helpers import sqlite_storage

# ~4 KB of nesting: under the size limit, deep enough to overflow a recursive decoder.
POISONS = [
    b'{"v":' + b"[" * 4000,
    b"[" * 4000,
    b'{"a":' * 800,
    b'{"post":"P001","v":' + b'{"x":[' * 600,
]


def post_password(dep: d.Deployment, post_id: str) -> str:
    return str(tomllib.loads(dep.post_config(post_id).read_text())["mqtt"]["password"])


class Raw:
    """A bare MQTT 5 client holding a post's credential; it collects the ACKs it is sent."""

    def __init__(self, client: aiomqtt.Client, post_id: str) -> None:
        self.client, self.post_id = client, post_id
        self.acks: dict[str, Ack] = {}
        self._got = asyncio.Event()

    async def publish(self, kind: str, payload: bytes, retain: bool = False) -> None:
        await self.client.publish(f"alarmpost/v1/post/{self.post_id}/{kind}", payload, qos=1,
                                  retain=retain)

    async def _read(self) -> None:
        async for message in self.client.messages:
            ack = decode_from_server(str(message.topic), bytes(message.payload),  # type: ignore[arg-type]
                                     self.post_id)
            assert isinstance(ack, Ack)
            self.acks[ack.event_id] = ack
            self._got.set()

    async def ack_for(self, event_id: str, within: float = 10.0) -> Ack:
        async def wait() -> Ack:
            while event_id not in self.acks:
                self._got.clear()
                await self._got.wait()
            return self.acks[event_id]

        return await asyncio.wait_for(wait(), within)


@asynccontextmanager
async def raw_post(dep: d.Deployment, post_id: str) -> AsyncIterator[Raw]:
    async with aiomqtt.Client("127.0.0.1", dep.broker_port, username=post_id,
                              password=post_password(dep, post_id), identifier=post_id,
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        raw = Raw(client, post_id)
        await client.subscribe(f"alarmpost/v1/post/{post_id}/ack", qos=1)
        reader = asyncio.create_task(raw._read())
        try:
            yield raw
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


def event(post: str, seq: int = 1, *, ts: float | None = None, event_id: str | None = None,
          epoch: str = "") -> Event:
    return Event(id=event_id or new_ulid(), post=post, seq=seq,
                 ts=time.time() if ts is None else ts, epoch=epoch)


def heartbeat(post: str, *, ts: float | None = None, faults: tuple[str, ...] = ()) -> bytes:
    return encode(Heartbeat(post=post, ts=time.time() if ts is None else ts, interval_s=1.0,
                            uptime_s=5.0, outbox_depth=0, button=False, strobe=False,
                            siren=False, help=False, faults=faults))


# --------------------------------------------------------------------- finding 1: poison
async def test_deeply_nested_payloads_on_every_post_topic_are_refused_and_the_server_lives(
    deployment: d.Deployment, server: CentralServer
) -> None:
    kinds = ["event", "heartbeat", "status", "cmdresult", "callstate"]
    async with raw_post(deployment, "P001") as p1:
        for kind in kinds:
            for poison in POISONS:
                assert len(poison) <= 4096
                await p1.publish(kind, poison)
        valid = event("P001")
        await p1.publish("event", encode(valid))
        ack = await p1.ack_for(valid.id)
    assert not ack.duplicate
    assert server.ready.is_set()
    refused = server.metrics.value("rejected_total", reason="too_deep")
    assert refused == len(kinds) * len(POISONS)
    text = await api(deployment, "/metrics")
    assert 'alarmpost_rejected_total{reason="too_deep"}' in text


@pytest.mark.expect_internal_errors
async def test_a_handler_that_raises_is_counted_and_the_reader_carries_on(
    deployment: d.Deployment, server: CentralServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(message: object) -> None:
        raise RuntimeError("a bug in the call relay")

    monkeypatch.setattr(server.calls, "on_signal", broken)
    async with raw_post(deployment, "P001") as p1:
        from protocol.messages import CallSignal

        await p1.publish("callstate", encode(CallSignal(id=new_ulid(), post="P001", kind="hangup",
                                                        ts=time.time())))
        valid = event("P001")
        await p1.publish("event", encode(valid))
        await p1.ack_for(valid.id)
    assert server.metrics.value("handler_errors_total", kind="callstate") == 1


async def test_poison_retained_messages_survive_three_server_restarts(
    deployment: d.Deployment, server_process: ServerProcess, tmp_path: Path
) -> None:
    poison = POISONS[0]
    for restart in range(3):
        # The attacker (re)publishes its poison retained, where every server start will see it.
        async with raw_post(deployment, "P001") as p1:
            await p1.publish("status", poison, retain=True)
            await p1.publish("event", poison, retain=True)
        server_process.start()
        await server_process.wait_ready()

        # The retained copies, and (after the first start) the copies queued in the server's
        # persistent session while it was down.
        expected = 2 if restart == 0 else 4

        async def refused(expected: int = expected) -> bool:
            return metric(await api(deployment, "/metrics"),
                          'alarmpost_rejected_total{reason="too_deep"}') >= expected

        await until(refused, 10, f"the retained poison refused (start {restart + 1})")
        async with raw_post(deployment, "P001") as p1:
            valid = event("P001", seq=restart + 1)
            await p1.publish("event", encode(valid))
            await p1.ack_for(valid.id)
        text = await api(deployment, "/metrics")
        assert 'alarmpost_retained_cleared_total{kind="event"} 1' in text
        assert 'alarmpost_retained_cleared_total{kind="status"} 1' in text
        assert server_process.proc is not None and server_process.proc.poll() is None
        assert server_process.stop() == 0
    assert db_rows(deployment, "SELECT COUNT(*) FROM events") == [(3,)]
    # The server cleared the poison it was sent: a fresh subscriber finds nothing retained there
    # (retained messages arrive before a marker published after the subscription).
    user, password = server_side_credentials(deployment, "server-2")
    async with aiomqtt.Client("127.0.0.1", deployment.broker_port, username=user,
                              password=password, identifier=user,
                              protocol=aiomqtt.ProtocolVersion.V5) as watcher:
        await watcher.subscribe("alarmpost/v1/post/P001/#", qos=1)
        await watcher.publish("alarmpost/v1/post/P001/cmdresult", b"marker", qos=1)
        seen = []
        async for message in watcher.messages:
            seen.append(bytes(message.payload))  # type: ignore[arg-type]
            if message.payload == b"marker":
                break
    assert poison not in seen


def metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --------------------------------------------------------------------- finding 4: event identity
async def test_an_event_id_used_by_another_post_is_this_posts_own_alarm(
    deployment: d.Deployment, server: CentralServer
) -> None:
    shared_id = new_ulid()
    async with raw_post(deployment, "P001") as p1:
        await p1.publish("event", encode(event("P001", event_id=shared_id)))
        first = await p1.ack_for(shared_id)
    async with raw_post(deployment, "P002") as p2:
        await p2.publish("event", encode(event("P002", event_id=shared_id)))
        second = await p2.ack_for(shared_id)
        assert not second.duplicate, "P002's alarm was acknowledged as a duplicate of P001's"
        assert second.incident_id != first.incident_id
        # P002 resending its own event is a duplicate of its own, in its own incident.
        p2.acks.clear()
        await p2.publish("event", encode(event("P002", event_id=shared_id)))
        again = await p2.ack_for(shared_id)
    assert again.duplicate and again.incident_id == second.incident_id
    assert sorted(db_rows(deployment, "SELECT post_id, id FROM events")) == [
        ("P001", shared_id), ("P002", shared_id)]
    assert sorted(db_rows(deployment, "SELECT post_id, first_event_id FROM incidents")) == [
        ("P001", shared_id), ("P002", shared_id)]
    assert server.metrics.value("event_id_collisions_total") == 1
    assert server.metrics.value("events_committed_total") == 2
    body = await api(deployment, f"/api/incidents/{second.incident_id}")
    assert [e["post_id"] for e in body["events"]] == ["P002"]


RELEASED_SCHEMA = """
CREATE TABLE posts (id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', school TEXT NOT NULL
    DEFAULT '', address TEXT NOT NULL DEFAULT '', lat REAL, lon REAL, state TEXT NOT NULL
    DEFAULT 'unknown', state_since REAL, last_seen REAL, health TEXT);
CREATE TABLE incidents (id TEXT PRIMARY KEY, post_id TEXT NOT NULL REFERENCES posts(id),
    state TEXT NOT NULL, opened_at REAL NOT NULL, last_event_at REAL NOT NULL, closed_at REAL,
    event_count INTEGER NOT NULL, first_event_id TEXT NOT NULL, acknowledged_by TEXT,
    acknowledged_at REAL, classification TEXT, note TEXT NOT NULL DEFAULT '');
CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, incident_id TEXT NOT NULL
    REFERENCES incidents(id), at REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    from_state TEXT, to_state TEXT, detail TEXT NOT NULL DEFAULT '');
CREATE TABLE events (
    id TEXT PRIMARY KEY,
    post_id TEXT NOT NULL REFERENCES posts(id),
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    pressed_at REAL NOT NULL,
    hold_ms INTEGER NOT NULL,
    received_at REAL NOT NULL,
    committed_at REAL NOT NULL,
    incident_id TEXT NOT NULL REFERENCES incidents(id)
);
CREATE INDEX events_post ON events(post_id, seq);
CREATE TABLE faults (id INTEGER PRIMARY KEY AUTOINCREMENT, post_id TEXT NOT NULL
    REFERENCES posts(id), kind TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '',
    started_at REAL NOT NULL, ended_at REAL);
"""


def test_a_database_of_the_released_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old_id, now = new_ulid(), time.time()
    conn = sqlite3.connect(path)
    conn.executescript(RELEASED_SCHEMA)
    conn.execute("INSERT INTO posts (id) VALUES ('P001'), ('P002')")
    conn.execute("INSERT INTO incidents VALUES ('I1', 'P001', 'new', ?, ?, NULL, 1, ?, NULL, NULL,"
                 " NULL, '')", (now, now, old_id))
    conn.execute("INSERT INTO events VALUES (?, 'P001', 7, 'alarm', ?, 0, ?, ?, 'I1')",
                 (old_id, now, now, now))
    conn.commit()
    conn.close()

    store = sqlite_storage(str(path))
    keys = [name for name, pk in sorted(store.db.table_columns("events"), key=lambda c: c[1]) if pk]
    assert keys == ["post_id", "id"], "events keyed by (post_id, id)"
    assert db_row(store, "SELECT post_id, seq, incident_id FROM events WHERE id=?", old_id) == (
        "P001", 7, "I1")
    # The old event's resend is a duplicate; the same id from another post is its own alarm.
    store.posts.upsert([PostInfo(id="P001"), PostInfo(id="P002")])
    resend, other = store.incidents.commit_events([(event("P001", 7, event_id=old_id), now),
                                         (event("P002", 1, event_id=old_id), now)])
    assert resend.duplicate and resend.incident_id == "I1"
    assert not other.duplicate and other.new_incident and other.collision
    store.close()
    store = sqlite_storage(str(path))  # a second start finds nothing left to migrate
    assert store.db.value("SELECT count(*) AS n FROM events") == 2
    store.close()


def db_row(store: Storage, sql: str, *params: Any) -> tuple[Any, ...]:
    row = store.db.one(sql, params)
    assert row is not None
    return tuple(row.values())


# --------------------------------------------------------------------- finding 5: server time
def test_a_slow_post_clock_does_not_auto_resolve_its_alarm(tmp_path: Path) -> None:
    store = sqlite_storage(str(tmp_path / "s.db"))
    store.posts.upsert([PostInfo(id="P001"), PostInfo(id="P002")])
    now = time.time()
    (slow,) = store.incidents.commit_events([(event("P001", ts=now - 3600), now)])
    assert store.incidents.resolve_idle(60, now + 5) == [], "auto-resolved on the post's clock"
    assert store.incidents.resolve_idle(60, now + 61) == [slow.incident_id]
    # A post stamping 2099 does not hold its incident open, nor sort it first.
    (future,) = store.incidents.commit_events([(event("P001", 2, ts=4_070_908_800.0), now + 100)])
    (normal,) = store.incidents.commit_events([(event("P002"), now + 101)])
    assert future.clock_suspect and not normal.clock_suspect
    incident = store.incidents.get(future.incident_id)
    assert incident is not None and incident["last_event_at"] == pytest.approx(now + 100)
    assert incident["events"][0]["pressed_at"] == 4_070_908_800.0  # the post's own time is kept
    assert incident["events"][0]["clock_suspect"] == 1
    assert [i["id"] for i in store.incidents.recent("open", 10)] == [normal.incident_id,
                                                               future.incident_id]
    assert store.incidents.resolve_idle(60, now + 161) == [future.incident_id]
    # Legitimately old (a resend after an outage) is not suspect; a year old is.
    (resent,) = store.incidents.commit_events([(event("P002", 2, ts=now - 6 * 3600), now + 200)])
    (ancient,) = store.incidents.commit_events([(event("P002", 3, ts=now - 400 * 86400), now + 200)])
    assert not resent.clock_suspect and ancient.clock_suspect
    store.close()


async def test_clock_offsets_suspect_times_and_sequence_anomalies_are_seen_per_post(
    deployment: d.Deployment, server: CentralServer
) -> None:
    async with raw_post(deployment, "P001") as p1:
        for _ in range(3):
            await p1.publish("heartbeat", heartbeat("P001", ts=time.time() - 3600))
        await until(lambda: server.live["P001"].health.get("clock_offset_s"), 5, "offset")
        events = [
            event("P001", 5, epoch="e1"),
            event("P001", 3, epoch="e1"),              # backwards
            event("P001", 3, epoch="e1"),              # the same seq again, another event
            event("P001", 1, epoch="e2"),              # storage wiped: a new epoch starts at 1
            event("P001", 2, epoch="e2", ts=4_070_908_800.0),  # stamped 2099
        ]
        for e in events:
            await p1.publish("event", encode(e))
        for e in events:
            ack = await p1.ack_for(e.id)
            assert not ack.duplicate  # every one is an alarm, committed
    offset = server.live["P001"].health["clock_offset_s"]
    assert isinstance(offset, float) and 3590 < offset < 3610
    m = server.metrics
    assert m.value("seq_anomalies_total", kind="regression") == 1
    assert m.value("seq_anomalies_total", kind="repeat") == 1
    assert m.value("post_epoch_changes_total") == 1
    assert m.value("events_clock_suspect_total") == 1
    assert db_rows(deployment, "SELECT seq, clock_suspect FROM events WHERE epoch='e2' "
                   "ORDER BY seq") == [(1, 0), (2, 1)]
    post = await api(deployment, "/api/posts/P001")
    assert post["seq_regressions"] == 1 and post["seq_repeats"] == 1
    assert post["epoch"] == "e2" and post["max_seq"] == 2


# --------------------------------------------------------------------- faults a post reports
async def test_faults_in_heartbeats_open_and_close_fault_records(
    deployment: d.Deployment, server: CentralServer
) -> None:
    async def open_kinds() -> set[str]:
        return {f["kind"] for f in await api(deployment, "/api/faults?open=1")
                if f["post_id"] == "P001"}

    async with raw_post(deployment, "P001") as p1:
        await p1.publish("heartbeat", heartbeat("P001", faults=("storage", "session_taken_over")))

        async def both() -> bool:
            return await open_kinds() == {"storage", "session_taken_over"}

        await until(both, 5, "both reported faults open")
        await p1.publish("heartbeat", heartbeat("P001", faults=("storage",)))

        async def one() -> bool:
            return await open_kinds() == {"storage"}

        await until(one, 5, "session_taken_over closed")
        assert server.live["P001"].health["faults"] == ["storage"]
        await p1.publish("heartbeat", heartbeat("P001", faults=("storage",)))  # no second record
        await p1.publish("heartbeat", heartbeat("P001"))
        await until(lambda: server.live["P001"].health["faults"] == [], 5, "faults cleared")
    assert await open_kinds() == set()
    assert sorted(db_rows(deployment, "SELECT kind, ended_at IS NOT NULL FROM faults "
                          "WHERE post_id='P001'")) == [("session_taken_over", 1), ("storage", 1)]


async def test_a_post_whose_sessions_flap_is_suspected_of_being_cloned(
    deployment: d.Deployment, server: CentralServer
) -> None:
    async with raw_post(deployment, "P001") as p1:
        for state in ["online", "offline", "online", "offline", "online"]:
            await p1.publish("status", encode(Status(post="P001", state=state, ts=time.time())))

        async def suspected() -> list[dict[str, Any]]:
            return [f for f in await api(deployment, "/api/faults?open=1")
                    if f["kind"] == "clone_suspected"]

        (fault,) = await until(suspected, 5, "clone_suspected fault")
    assert fault["post_id"] == "P001"
    assert "two devices may be using this post's credential" in fault["detail"]
    assert server.metrics.value("clone_suspected_total") == 1
    # P002 reconnecting once is not a clone.
    assert not [f for f in await api(deployment, "/api/faults?open=1") if f["post_id"] == "P002"]


async def test_a_flood_of_garbage_is_counted_in_full_but_logged_in_a_few_lines(
    deployment: d.Deployment, server: CentralServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A post publishing garbage nonstop must not fill the server's disk with log lines."""
    caplog.set_level("WARNING", logger="alarmpost.server")
    async with raw_post(deployment, "P001") as raw:
        for _ in range(200):
            await raw.publish("heartbeat", b"not json")
        event = Event(id=new_ulid(), post="P001", seq=1, ts=time.time())
        await raw.publish("event", encode(event))
        await raw.ack_for(event.id)  # everything before it has been handled
    assert server.metrics.value("rejected_total", reason="malformed") == 200
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("rejected message on alarmpost/v1/post/P001/")]
    assert 1 <= len(lines) <= server._log_throttle.burst


async def test_a_retained_poison_is_cleared_from_the_broker_and_a_good_one_is_kept(
    deployment: d.Deployment,
) -> None:
    """An undecodable retained message would be refused on every delivery: the server clears it
    when it is delivered as retained (once, counted), and leaves good retained messages alone."""
    async with raw_post(deployment, "P001") as p1, raw_post(deployment, "P002") as p2:
        await p2.publish("status", encode(Status(post="P002", state="online", ts=time.time())),
                         retain=True)
        await p1.publish("status", POISONS[1], retain=True)
    async with run_server(deployment) as server:
        await until(lambda: server.metrics.value("retained_cleared_total", kind="status") == 1,
                    5, "the poison cleared")
        assert server.metrics.value("rejected_total", reason="too_deep") == 1
        assert server.live["P002"].state == "online"
    user, password = server_side_credentials(deployment, "server-2")
    async with aiomqtt.Client("127.0.0.1", deployment.broker_port, username=user,
                              password=password, identifier=user,
                              protocol=aiomqtt.ProtocolVersion.V5) as watcher:
        await watcher.subscribe("alarmpost/v1/post/+/status", qos=1)
        await watcher.subscribe("alarmpost/v1/post/P003/cmdresult", qos=1)
        await watcher.publish("alarmpost/v1/post/P003/cmdresult", b"marker", qos=1)
        retained: dict[str, bytes] = {}
        async for message in watcher.messages:
            if message.payload == b"marker":
                break
            retained[str(message.topic)] = bytes(message.payload)  # type: ignore[arg-type]
    # The poison is gone; P002's status stays (the server's own offline status aside).
    assert "alarmpost/v1/post/P001/status" not in retained
    assert b'"state":"online"' in retained["alarmpost/v1/post/P002/status"]
