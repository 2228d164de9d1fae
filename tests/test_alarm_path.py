"""The alarm path end to end against a real Mosquitto, real SQLite and real agents."""

from __future__ import annotations

import asyncio
import time

import aiomqtt
import msgspec

from protocol.messages import Ack, Command, CommandResult, encode
from protocol.ulid import new_ulid
from provisioning import deployment as d
from server.app import CentralServer
from tests.helpers import broker_of, db_rows, run_posts, run_server, server_side_credentials, until


def ack_waiter(post_agent: object, count: int = 1) -> asyncio.Future[list[Ack]]:
    """A future resolved once the agent has received ``count`` ACKs."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[list[Ack]] = loop.create_future()
    got: list[Ack] = []

    def on_ack(ack: Ack, at: float) -> None:
        assert abs(at - time.time()) < 5, "listeners get the time the ACK arrived"
        got.append(ack)
        if len(got) >= count and not fut.done():
            fut.set_result(list(got))

    post_agent.ack_listeners.append(on_ack)  # type: ignore[attr-defined]
    return fut


async def test_press_is_committed_acked_and_help_shows(
    deployment: d.Deployment, server: CentralServer
) -> None:
    async with run_posts(deployment, "P001") as posts:
        post = posts["P001"]
        acked = ack_waiter(post.agent)
        await post.press()
        assert post.hardware.strobe and post.hardware.siren
        (ack,) = await asyncio.wait_for(acked, 5)

        rows = db_rows(deployment, "SELECT id, post_id, seq, incident_id FROM events")
        assert rows == [(ack.event_id, "P001", 1, ack.incident_id)]
        incidents = db_rows(deployment, "SELECT id, post_id, state, event_count FROM incidents")
        assert incidents == [(ack.incident_id, "P001", "new", 1)]
        assert post.agent.outbox.depth() == 0
        assert post.agent.outbox_depth == 0
        assert post.hardware.help
        assert post.agent.counters["acks"] == 1
        post.agent._on_ack(ack)  # the same ACK again (a resend answered twice): nothing to do
        assert (post.agent.counters["acks"], post.agent.counters["acks_unknown"]) == (1, 1)

        # A second press joins the open incident.
        acked = ack_waiter(post.agent)
        await post.press()
        (ack2,) = await asyncio.wait_for(acked, 5)
        assert ack2.incident_id == ack.incident_id
        assert db_rows(deployment, "SELECT event_count FROM incidents") == [(2,)]
    assert server.metrics.value("events_committed_total") == 2
    assert server.metrics.value("incidents_opened_total") == 1


async def test_brush_and_bounce_count_right(
    deployment: d.Deployment, server: CentralServer
) -> None:
    async with run_posts(deployment, "P001") as posts:
        post = posts["P001"]
        await post.brush()  # shorter than the hold-time guard
        assert not post.hardware.siren
        assert post.agent.outbox.last_seq == 0

        acked = ack_waiter(post.agent)
        await post.press(bounce=5)  # chatter on both edges: still one press
        await asyncio.wait_for(acked, 5)
        await post.press(hold_s=0.6)  # a long hold: one press
        await until(lambda: post.agent.outbox.last_seq == 2 and post.agent.outbox_depth == 0,
                    5, "second event acknowledged")
    assert db_rows(deployment, "SELECT post_id, seq FROM events ORDER BY seq") == [
        ("P001", 1), ("P001", 2)]


async def test_strobe_and_siren_work_without_broker(deployment: d.Deployment) -> None:
    broker = broker_of(deployment)
    broker.stop()  # nobody to talk to
    async with run_posts(deployment, "P001", connect=False) as posts:
        post = posts["P001"]
        await post.press()
        assert post.hardware.strobe and post.hardware.siren
        assert not post.agent.connected.is_set()
        assert post.agent.outbox.depth() == 1  # kept for when the network is back


async def test_silent_post_sends_without_strobe_or_siren(
    deployment: d.Deployment, server: CentralServer
) -> None:
    async with run_posts(deployment, "P002", post__silent=True) as posts:
        post = posts["P002"]
        acked = ack_waiter(post.agent)
        await post.press()
        await asyncio.wait_for(acked, 5)
        assert not post.hardware.strobe and not post.hardware.siren
        assert post.hardware.help


async def test_broker_restart_every_event_exactly_once(deployment: d.Deployment) -> None:
    broker = broker_of(deployment)
    async with run_server(deployment), run_posts(deployment) as posts:
        broker.stop()
        await until(lambda: not any(p.agent.connected.is_set() for p in posts.values()),
                    10, "posts see the broker gone")
        for _ in range(3):
            for post in posts.values():
                await post.press()
        assert all(p.agent.outbox.depth() == 3 for p in posts.values())
        broker.start()
        await until(lambda: all(p.agent.outbox_depth == 0 for p in posts.values()),
                    20, "every outbox drained after the broker came back")
    rows = db_rows(deployment, "SELECT post_id, seq FROM events ORDER BY post_id, seq")
    assert rows == [(p, s) for p in sorted(posts) for s in (1, 2, 3)]


async def test_outbox_failure_does_not_swallow_the_alarm(
    deployment: d.Deployment, server: CentralServer
) -> None:
    async with run_posts(deployment, "P003") as posts:
        post = posts["P003"]
        post.agent.outbox._db.close()  # the disk is gone
        acked = ack_waiter(post.agent)
        await post.press()
        assert post.hardware.siren
        (ack,) = await asyncio.wait_for(acked, 5)
        assert post.agent.counters["outbox_errors"] == 1
    assert db_rows(deployment, "SELECT id, seq FROM events") == [(ack.event_id, 1)]


async def test_commands_reach_the_post_and_are_confirmed(
    deployment: d.Deployment, server: CentralServer
) -> None:
    # An account of its own: the broker keys a session on the user name, so the server's
    # would disconnect the server.
    user, password = server_side_credentials(deployment, "server-2")
    async with run_posts(deployment, "P001") as posts, aiomqtt.Client(
        "127.0.0.1", deployment.broker_port, username=user, password=password,
        identifier="console-test", protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        post = posts["P001"]
        acked = ack_waiter(post.agent)
        await post.press()
        await asyncio.wait_for(acked, 5)
        await client.subscribe("alarmpost/v1/post/P001/cmdresult", qos=1)
        results = []
        for name in ["silence", "reset"]:
            cmd = Command(id=new_ulid(), post="P001", cmd=name, ts=time.time())  # type: ignore[arg-type]
            await client.publish("alarmpost/v1/post/P001/cmd", encode(cmd), qos=1)
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                results.append(msgspec.json.decode(message.payload, type=CommandResult))
                break
            if name == "silence":
                assert not post.hardware.siren and post.hardware.strobe
        assert [(r.cmd, r.ok) for r in results] == [("silence", True), ("reset", True)]
        assert not post.hardware.strobe and not post.hardware.help

