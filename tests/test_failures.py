"""No alarm lost or doubled when processes die, freeze or the broker goes away."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

from tests.helpers import (
    MakeDeployment,
    ServerProcess,
    SimProcess,
    broker_of,
    db_rows,
    run_posts,
    run_server,
    until,
)


async def test_server_sigkill_mid_burst_loses_and_doubles_nothing(
    make_deployment: MakeDeployment, tmp_path
) -> None:
    dep = make_deployment(20)
    server = ServerProcess(dep, tmp_path / "server.log")
    server.start()
    try:
        await server.wait_ready()
        async with run_posts(dep) as posts:
            async def presses(post, n: int = 10) -> None:
                for _ in range(n):
                    await post.press()

            burst = asyncio.gather(*(presses(p) for p in posts.values()))
            # Kill the server once part of the burst is committed.
            await until(lambda: db_rows(dep, "SELECT COUNT(*) FROM events")[0][0] >= 40,
                        15, "40 events committed")
            server.kill()
            killed_at = db_rows(dep, "SELECT COUNT(*) FROM events")[0][0]
            await burst
            assert sum(p.agent.outbox.last_seq for p in posts.values()) == 200
            assert killed_at < 200, "the kill came too late to prove anything"
            server.start()
            await server.wait_ready()
            await until(lambda: all(p.agent.outbox_depth == 0 for p in posts.values()),
                        30, "every outbox drained after the restart")
    finally:
        server.stop()
    rows = db_rows(dep, "SELECT post_id, seq, COUNT(*) FROM events GROUP BY post_id, seq")
    assert len(rows) == 200
    assert all(count == 1 for _, _, count in rows)
    assert sorted((p, s) for p, s, _ in rows) == [
        (p.id, s) for p in dep.posts for s in range(1, 11)
    ]
    assert db_rows(dep, "SELECT COUNT(DISTINCT id) FROM events") == [(200,)]


async def test_edge_sigkill_before_publish_event_arrives_after_restart(
    make_deployment: MakeDeployment, sim_factory: Callable[..., Awaitable[SimProcess]]
) -> None:
    dep = make_deployment(2)
    broker = broker_of(dep)
    broker.stop()  # the post cannot publish: the event can only be in its outbox
    sim = await sim_factory(dep, "P001")
    await sim.wait_for(lambda line: line["type"] == "started")
    await sim.send("press P001")
    (event,) = await sim.wait_for(lambda line: line["type"] == "event")
    sim.signal(signal.SIGKILL)
    await sim.close()

    broker.start()
    async with run_server(dep):
        sim2 = await sim_factory(dep, "P001")
        (ack,) = await sim2.wait_for(lambda line: line["type"] == "ack")
        assert ack["event_id"] == event["event_id"]
        assert db_rows(dep, "SELECT id, seq FROM events") == [(event["event_id"], 1)]


async def test_frozen_post_is_offline_within_two_and_a_half_intervals(
    make_deployment: MakeDeployment, sim_factory: Callable[..., Awaitable[SimProcess]]
) -> None:
    dep = make_deployment(2, heartbeat_s=1.0)
    async with run_server(dep) as server:
        sim = await sim_factory(dep, "P001")
        await sim.wait_for(lambda line: line["type"] == "ready")
        await until(lambda: server.live["P001"].state == "online", 5, "P001 online")
        await asyncio.sleep(3.0)  # three heartbeat intervals of normal life: no fault
        assert server.live["P001"].state == "online"
        assert db_rows(dep, "SELECT COUNT(*) FROM faults") == [(0,)]

        frozen_at = time.time()
        sim.signal(signal.SIGSTOP)
        await until(lambda: server.live["P001"].state == "offline", 5, "P001 offline")
        ((kind, detail, started_at),) = db_rows(
            dep, "SELECT kind, detail, started_at FROM faults WHERE post_id='P001'"
        )
        assert (kind, detail) == ("offline", "heartbeat missed")
        # 2.5 intervals after the last heartbeat, which came at or before the freeze;
        # 50 ms allows for the timer firing on a busy 2-core machine.
        assert started_at - frozen_at <= 2.5 * 1.0 + 0.05

        sim.signal(signal.SIGCONT)
        await until(lambda: server.live["P001"].state == "online", 5, "P001 back online")
        assert db_rows(dep, "SELECT ended_at IS NOT NULL FROM faults WHERE post_id='P001'") == [
            (1,)]


async def test_killed_post_goes_offline_by_last_will(
    make_deployment: MakeDeployment, sim_factory: Callable[..., Awaitable[SimProcess]]
) -> None:
    dep = make_deployment(2, heartbeat_s=30.0)  # the heartbeat deadline cannot be the cause
    async with run_server(dep) as server:
        sim = await sim_factory(dep, "P002")
        await sim.wait_for(lambda line: line["type"] == "ready")
        await until(lambda: server.live["P002"].state == "online", 5, "P002 online")
        killed_at = time.monotonic()
        sim.signal(signal.SIGKILL)
        await until(lambda: server.live["P002"].state == "offline", 5, "P002 offline")
        assert time.monotonic() - killed_at < 2.0
        assert db_rows(dep, "SELECT detail FROM faults WHERE post_id='P002'") == [
            ("connection lost",)]
        assert server.metrics.value("post_offline_total", reason="connection lost") == 1


async def test_server_restart_resumes_supervision_of_posts_that_died_meanwhile(
    make_deployment: MakeDeployment, sim_factory: Callable[..., Awaitable[SimProcess]]
) -> None:
    dep = make_deployment(2, heartbeat_s=1.0)
    async with run_server(dep) as server:
        sim = await sim_factory(dep, "P001")
        await sim.wait_for(lambda line: line["type"] == "ready")
        await until(lambda: server.live["P001"].state == "online", 5, "P001 online")
    sim.signal(signal.SIGSTOP)  # hangs while the server is down: no Last Will
    async with run_server(dep) as server:
        await until(lambda: server.live["P001"].state == "offline", 5, "P001 offline")
    sim.signal(signal.SIGCONT)


async def test_server_restart_does_not_fault_healthy_posts(
    make_deployment: MakeDeployment, sim_factory: Callable[..., Awaitable[SimProcess]]
) -> None:
    dep = make_deployment(2, heartbeat_s=1.0)
    sim = await sim_factory(dep, "P001", "P002")
    async with run_server(dep) as server:
        await sim.wait_for(lambda line: line["type"] == "ready")
        await until(lambda: all(p.state == "online" for p in server.live.values()), 5, "online")
    await asyncio.sleep(3.0)  # down longer than the grace period; the posts live on
    async with run_server(dep) as server:
        await asyncio.sleep(3.0)  # longer than the grace period again, now supervised
        assert all(p.state == "online" for p in server.live.values())
    assert db_rows(dep, "SELECT COUNT(*) FROM faults") == [(0,)]
