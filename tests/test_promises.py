"""The alarm path's promises, each tested where it can be broken.

Every test here names the promise it guards and was seen to fail on a build that breaks it (the
mutants listed in docs/testing.md): an ACK published before the commit, a database that does not
fsync, an outbox emptied on the broker's PUBACK, a session that does not persist, a duplicate
that is never acknowledged, outputs switched on after the disk write.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
import time
import tomllib
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
import msgspec
import paho.mqtt.client as paho

from protocol.messages import (
    Ack,
    Command,
    CommandResult,
    Event,
    Heartbeat,
    decode_from_server,
    encode,
)
from protocol.ulid import new_ulid
from provisioning import deployment as d
from server.app import CentralServer
from server.config import load_server_config
from server.storage import DatabaseError, IntegrityError, open_database
from server.web.auth import Accounts
from tests.helpers import (
    MakeDeployment,
    ServerProcess,
    SimProcess,
    db_rows,
    monitor_credentials,
    run_posts,
    run_server,
    until,
)


class AckAuditor:
    """An outside observer of the ACK topics, on its own thread and its own database
    connection: for every ACK it sees, it looks the event up in the server's database at that
    moment. An ACK whose event is not committed yet is a broken promise."""

    def __init__(self, dep: d.Deployment) -> None:
        user, password = monitor_credentials(dep)
        # Its own connection, read-only, on whichever backend the server uses.
        self.db = open_database(load_server_config(dep.server_config).database, read_only=True)
        self.acks: list[tuple[str, str, bool]] = []  # (post, event id, committed when seen)
        self._cond = threading.Condition()
        self._subscribed = False
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"audit-{user}",
                                  protocol=paho.MQTTv5)
        self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", dep.broker_port)
        self.client.loop_start()
        with self._cond:
            assert self._cond.wait_for(lambda: self._subscribed, 5), "auditor not subscribed"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe("alarmpost/v1/post/+/ack", qos=1)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._cond:
            self._subscribed = True
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        post_id = message.topic.split("/")[3]
        ack = decode_from_server(message.topic, message.payload, post_id)
        assert isinstance(ack, Ack)
        committed = self.db.value(
            "SELECT count(*) AS n FROM events WHERE id=? AND post_id=?", (ack.event_id, ack.post)
        ) == 1
        with self._cond:
            self.acks.append((ack.post, ack.event_id, committed))
            self._cond.notify_all()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.db.close()


def slow_commits(server: CentralServer, delay_s: float, fail_first: int = 0) -> list[int]:
    """Make the server's commits take ``delay_s`` (the event loop is blocked meanwhile, as in a
    slow fsync) and let the first ``fail_first`` raise as a full disk would. Returns a list that
    grows by the batch size of every commit that went through."""
    real = server.storage.incidents.commit_events
    done: list[int] = []
    failures = [fail_first]

    def commit(batch: Any) -> Any:
        time.sleep(delay_s)
        if failures[0] > 0:
            failures[0] -= 1
            raise DatabaseError("database or disk is full")
        result = real(batch)
        done.append(len(batch))
        return result

    server.storage.incidents.commit_events = commit  # type: ignore[method-assign]
    return done


async def test_every_ack_is_published_after_its_event_is_committed(
    deployment: d.Deployment, server: CentralServer
) -> None:
    """Promise: the server acknowledges only what it has committed (else an acknowledged alarm
    can vanish in a crash). Seen from outside, by a separate client and database connection."""
    slow_commits(server, 0.05)
    auditor = await asyncio.to_thread(AckAuditor, deployment)
    try:
        async with run_posts(deployment) as posts:
            for post in posts.values():
                await post.press()
            await until(lambda: len(auditor.acks) >= 3, 10, "three ACKs seen by the auditor")
    finally:
        await asyncio.to_thread(auditor.close)
    assert sorted(post for post, _, _ in auditor.acks) == ["P001", "P002", "P003"]
    assert all(committed for _, _, committed in auditor.acks), auditor.acks


async def test_a_commit_that_fails_is_resent_by_the_post_and_committed_once(
    deployment: d.Deployment, server: CentralServer
) -> None:
    """Promise: an event received but not committed is not acknowledged, so the post resends it
    until it is; it ends up committed exactly once."""
    committed = slow_commits(server, 0.0, fail_first=1)
    auditor = await asyncio.to_thread(AckAuditor, deployment)
    try:
        async with run_posts(deployment, "P001") as posts:
            post = posts["P001"]
            sent: list[tuple[str, int]] = []
            post.agent.sent_listeners.append(lambda event_id, attempt: sent.append((event_id,
                                                                                     attempt)))
            await post.press()
            await until(lambda: post.agent.outbox_depth == 0, 10, "the event acknowledged")
            assert post.agent.outbox.depth() == 0
            assert post.agent.counters["resends"] >= 1
            assert max(attempt for _, attempt in sent) >= 2
            assert len({event_id for event_id, _ in sent}) == 1
            await until(lambda: auditor.acks, 5, "the auditor saw the ACK")
    finally:
        await asyncio.to_thread(auditor.close)
    assert committed == [1]
    assert db_rows(deployment, "SELECT post_id, seq FROM events") == [("P001", 1)]
    assert all(ok for _, _, ok in auditor.acks) and len(auditor.acks) >= 1
    assert server.metrics.value("events_committed_total") == 1


def _pragma(conn: Any, name: str) -> Any:
    return conn.execute(f"PRAGMA {name}").fetchone()[0]


async def test_server_database_and_post_outbox_are_durable(
    deployment: d.Deployment, server: CentralServer
) -> None:
    """Promise: a committed event survives a power cut: on the server's own connection WAL with
    synchronous=FULL (SQLite) or synchronous_commit on (PostgreSQL), and WAL with synchronous=FULL
    on the post's outbox, also after the outbox deletes an entry."""

    def server_durable() -> bool:
        settings = server.storage.db.settings()
        if server.storage.backend == "sqlite":
            return settings["journal_mode"] == "wal" and settings["synchronous"] == "2"
        return settings["synchronous_commit"] == "on" and settings["fsync"] == "on"

    assert server_durable()
    async with run_posts(deployment, "P001") as posts:
        outbox = posts["P001"].agent.outbox
        assert str(_pragma(outbox._db, "journal_mode")).lower() == "wal"
        assert _pragma(outbox._db, "synchronous") == 2
        await posts["P001"].press()
        await until(lambda: posts["P001"].agent.outbox_depth == 0, 5, "ACK")
        assert _pragma(outbox._db, "synchronous") == 2  # the delete left it as it was
    assert server_durable()


async def test_strobe_and_siren_are_on_before_the_outbox_is_written(
    deployment: d.Deployment, server: CentralServer
) -> None:
    """Promise: the post never waits for its disk or the network to sound the alarm."""
    async with run_posts(deployment, "P001") as posts:
        post = posts["P001"]
        real_add = post.agent.outbox.add
        seen: list[tuple[bool, bool]] = []

        def add(make: Callable[[int], Event]) -> Event:
            seen.append((post.hardware.strobe, post.hardware.siren))
            return real_add(make)

        post.agent.outbox.add = add  # type: ignore[method-assign]
        await post.press()
        await until(lambda: post.agent.outbox_depth == 0, 5, "ACK")
    assert seen == [(True, True)]


async def test_post_killed_after_the_brokers_puback_still_delivers_from_its_outbox(
    make_deployment: MakeDeployment, sim_factory: Callable[..., Awaitable[SimProcess]]
) -> None:
    """Promise: a post deletes an event only on the server's ACK. The broker took the event
    (PUBACK) but nobody was subscribed to receive it (the server never connected), then the
    post died: only the post's own disk still has the event."""
    dep = make_deployment(1)
    sim = await sim_factory(dep, "P001")
    await sim.wait_for(lambda line: line["type"] == "ready")
    await sim.send("press P001")
    (event,) = await sim.wait_for(lambda line: line["type"] == "event")
    await sim.wait_for(lambda line: line["type"] == "sent" and line["event_id"] == event["event_id"])
    sim.signal(signal.SIGKILL)
    await sim.close()

    outbox = sqlite3.connect(dep.directory / "outbox" / "P001.db")
    try:
        assert outbox.execute("SELECT id FROM outbox").fetchall() == [(event["event_id"],)]
    finally:
        outbox.close()
    async with run_server(dep):
        sim2 = await sim_factory(dep, "P001")
        (ack,) = await sim2.wait_for(lambda line: line["type"] == "ack")
    assert ack["event_id"] == event["event_id"]
    assert db_rows(dep, "SELECT id, seq FROM events") == [(event["event_id"], 1)]


async def test_an_event_the_broker_took_reaches_a_server_that_was_away(
    make_deployment: MakeDeployment, sim_factory: Callable[..., Awaitable[SimProcess]], tmp_path
) -> None:
    """Promise: events go out at QoS 1 into the server's persistent session. The server is
    down, the post publishes, the broker takes it, the post dies for good: the server still
    commits the event when it comes back."""
    dep = make_deployment(1)
    server = ServerProcess(dep, tmp_path / "server.log")
    server.start()
    try:
        await server.wait_ready()
        assert server.stop() == 0  # its session stays at the broker
        sim = await sim_factory(dep, "P001")
        await sim.wait_for(lambda line: line["type"] == "ready")
        await sim.send("press P001")
        (event,) = await sim.wait_for(lambda line: line["type"] == "event")
        await sim.wait_for(lambda line: line["type"] == "sent")
        sim.signal(signal.SIGKILL)
        await sim.close()
        server.start()
        await server.wait_ready()
        await until(lambda: db_rows(dep, "SELECT id FROM events"), 10, "the event committed")
    finally:
        server.stop()
    assert db_rows(dep, "SELECT id FROM events") == [(event["event_id"],)]


async def test_ack_and_command_queued_while_a_post_is_away_are_delivered_on_reconnect(
    deployment: d.Deployment,
) -> None:
    """Promise: the post keeps a persistent MQTT session (clean_start=False, session expiry):
    what the server sent while it was away is delivered when it reconnects."""
    async with run_server(deployment):
        pass  # the server's session exists from now on
    async with run_posts(deployment, "P001") as posts:
        await posts["P001"].press()  # the server is down: the broker queues the event for it
        await until(lambda: posts["P001"].agent.counters["presses"] == 1, 5, "press")
        sent = posts["P001"].agent.outbox.pending()
        assert len(sent) == 1
    async with run_server(deployment) as server:
        await until(lambda: server.metrics.value("acks_sent_total") == 1, 10,
                    "the event committed and its ACK sent to the absent post")
        assert server._client is not None
        cmd = Command(id=new_ulid(), post="P001", cmd="strobe_on", ts=time.time())
        await server._client.publish("alarmpost/v1/post/P001/cmd", encode(cmd), qos=1)
        results: list[CommandResult] = []
        server.commands.on_result = results.append  # type: ignore[method-assign]
        async with run_posts(deployment, "P001") as posts:
            post = posts["P001"]
            acks: list[Ack] = []
            post.agent.ack_listeners.append(lambda ack, _at: acks.append(ack))
            await until(lambda: acks and post.hardware.strobe and results, 5,
                        "the queued ACK and command delivered")
            # The first ACK is the one queued in the session, not the answer to a resend (on
            # reconnect the post may resend before it reads its queue: that one is a duplicate).
            assert (acks[0].event_id, acks[0].duplicate) == (sent[0].id, False)
            assert post.agent.outbox.depth() == 0
        assert [r.id for r in results] == [cmd.id]


async def test_a_duplicate_resend_is_acknowledged_as_duplicate_and_not_stored(
    deployment: d.Deployment, server: CentralServer
) -> None:
    """Promise: a resend of a committed event is acknowledged again (or the post would resend it
    forever) and stored nothing. Over MQTT, as the post's own account."""
    password = tomllib.loads(deployment.post_config("P001").read_text())["mqtt"]["password"]
    event = encode(Event(id=new_ulid(), post="P001", seq=1, ts=time.time()))
    async with aiomqtt.Client("127.0.0.1", deployment.broker_port, username="P001",
                              password=password, identifier="P001",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe("alarmpost/v1/post/P001/ack", qos=1)
        acks: list[Ack] = []
        for _ in range(2):
            await client.publish("alarmpost/v1/post/P001/event", event, qos=1)
            async with asyncio.timeout(5):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    acks.append(msgspec.json.decode(message.payload, type=Ack))
                    break
    assert [a.duplicate for a in acks] == [False, True]
    assert acks[0].event_id == acks[1].event_id and acks[0].incident_id == acks[1].incident_id
    assert db_rows(deployment, "SELECT COUNT(*) FROM events") == [(1,)]
    assert server.metrics.value("events_duplicate_total") == 1


# The tables whose rows are evidence: nobody may change or remove them, not even the server.
AUDIT_TABLES = ("audit", "console_audit")


async def test_every_audit_table_refuses_update_and_delete(
    deployment: d.Deployment, server: CentralServer
) -> None:
    """Promise: the incident audit log and the console's audit log are append-only, enforced by
    the database itself (an auditor's own connection cannot rewrite history either)."""
    async with run_posts(deployment, "P001") as posts:
        await posts["P001"].press()
        await until(lambda: posts["P001"].agent.outbox_depth == 0, 5, "ACK")
    Accounts(server.storage.accounts).add_user(
        "alice", "admin", "correct horse battery", actor="test")  # a console audit row
    # Its own connection to the server's database, on whichever backend the server uses.
    db = open_database(load_server_config(deployment.server_config).database)
    try:
        if db.backend == "sqlite":
            found = db.query("SELECT name FROM sqlite_master WHERE type='table' "
                             "AND name LIKE '%audit%'")
        else:
            found = db.query("SELECT tablename AS name FROM pg_tables WHERE schemaname='public' "
                             "AND tablename LIKE '%audit%'")
        tables = {r["name"] for r in found}
        assert tables == set(AUDIT_TABLES), "a new audit table must be listed (and tested) here"
        for table in AUDIT_TABLES:
            count = db.value(f"SELECT count(*) AS n FROM {table}")
            assert count >= 1, f"{table} has no row to try on"
            for sql in (f"UPDATE {table} SET actor='forger'", f"DELETE FROM {table}"):
                try:
                    db.execute(sql)
                except IntegrityError as exc:
                    assert "append-only" in str(exc)
                else:
                    raise AssertionError(f"{sql!r} was allowed")
            assert db.value(f"SELECT count(*) AS n FROM {table}") == count
    finally:
        db.close()


def _heartbeat(post_id: str, interval_s: float) -> bytes:
    return encode(Heartbeat(post=post_id, ts=time.time(), interval_s=interval_s, uptime_s=1.0,
                            outbox_depth=0, button=False, strobe=False, siren=False, help=False))


async def test_a_post_that_goes_silent_is_offline_within_two_and_a_half_intervals(
    deployment: d.Deployment, server: CentralServer
) -> None:
    """Promise: a post that stops talking (hung, cut off without a Last Will) is a fault the
    operators see within 2.5 of its heartbeat intervals, and its recovery is recorded."""
    password = tomllib.loads(deployment.post_config("P001").read_text())["mqtt"]["password"]
    notices = server.bus.subscribe()
    async with aiomqtt.Client("127.0.0.1", deployment.broker_port, username="P001",
                              password=password, identifier="P001",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.publish("alarmpost/v1/post/P001/heartbeat", _heartbeat("P001", 0.2), qos=1)
        await until(lambda: server.live["P001"].state == "online", 5, "P001 online")
        await client.publish("alarmpost/v1/post/P001/heartbeat", _heartbeat("P001", 0.2), qos=1)
        silent_from = time.time()  # still connected, never says a word again
        await until(lambda: server.live["P001"].state == "offline", 5, "P001 offline")
        offline_at = time.time()
        faults = db_rows(deployment, "SELECT kind, detail, started_at, ended_at FROM faults "
                                     "WHERE post_id='P001'")
        assert [(k, det, end) for k, det, _, end in faults] == [
            ("offline", "heartbeat missed", None)]
        assert faults[0][2] - silent_from <= 2.5 * 0.2 + 0.1
        assert offline_at - silent_from >= 2.5 * 0.2 - 0.1  # not before its time either
        assert server.metrics.value("post_offline_total", reason="heartbeat missed") == 1
        seen = []
        while not notices.empty():
            seen.append(notices.get_nowait().as_dict())
        assert {"type": "post_state", "post_id": "P001", "state": "offline",
                "reason": "heartbeat missed"} in seen
        await client.publish("alarmpost/v1/post/P001/heartbeat", _heartbeat("P001", 0.2), qos=1)
        await until(lambda: server.live["P001"].state == "online", 5, "P001 back")
    assert db_rows(deployment, "SELECT COUNT(*) FROM faults WHERE ended_at IS NOT NULL") == [(1,)]

