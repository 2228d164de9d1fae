"""The agent's broker connection: reconnect backoff and a cloned credential, on a real broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from edge.config import load_edge_config
from firmware_sim.fleet import SimPost
from protocol.messages import Ack
from provisioning import deployment as d
from server.app import CentralServer
from tests.helpers import broker_of, run_posts, until

# The broker, the edge or the UI: the server's storage is not what these test.
pytestmark = pytest.mark.one_backend


def test_backoff_grows_to_its_cap_and_resets_only_after_a_connection_that_lived() -> None:
    from mqttlink import Backoff

    now = [100.0]
    backoff = Backoff(initial_s=0.2, cap_s=2.0, lived_s=3.0, jitter=0.0, clock=lambda: now[0])
    assert [backoff.next_delay() for _ in range(6)] == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    backoff.connected()
    now[0] += 1.0
    backoff.disconnected()  # a connection that dropped at once: keep backing off
    assert backoff.next_delay() == 2.0
    backoff.connected()
    now[0] += 3.0
    backoff.disconnected()  # it lived: the next outage starts from the initial delay
    assert backoff.next_delay() == 0.2
    assert backoff.next_delay() == 0.4


async def test_reconnect_is_fast_again_after_a_connection_that_lived(
    deployment: d.Deployment,
) -> None:
    broker = broker_of(deployment)
    async with run_posts(deployment, "P001", timing__reconnect_max_s=2.0) as posts:
        agent = posts["P001"].agent
        # A first outage long enough for the backoff to reach its cap (0.2+0.4+0.8+1.6 s).
        broker.stop()
        await until(lambda: agent.counters["disconnects"] >= 5, 15, "backoff at its cap")
        broker.start()
        await until(agent.connected.is_set, 10, "reconnected after the first outage")
        # The connection lives (the agent's threshold is 3 s): the passing of time is the point.
        await asyncio.sleep(3.5)
        broker.stop()
        await until(lambda: not agent.connected.is_set(), 10, "the agent saw the second outage")
        broker.start()
        started = time.monotonic()
        await until(agent.connected.is_set, 10, "reconnected after the second outage")
        took = time.monotonic() - started
    assert took < 1.0, f"reconnect took {took:.2f} s after a connection that lived"


async def test_a_cloned_post_is_a_reported_fault(
    deployment: d.Deployment, server: CentralServer, tmp_path: Path
) -> None:
    """Two devices with one post's credential (the broker makes the user name the client id, so
    they take the session from each other). Mosquitto 2.0.11 closes the older connection without
    the MQTT 5 DISCONNECT 0x8E: the agent sees the other device's status on its own topic."""
    config = load_edge_config(deployment.post_config("P001"))
    config.outbox.path = str(tmp_path / "clone-outbox.db")
    clone = SimPost(config)  # the same software on a second box, with a copy of the credential
    async with run_posts(deployment, "P001") as posts:
        post = posts["P001"]
        agent = post.agent
        assert "session_taken_over" not in agent.heartbeat().faults
        clone.start()
        try:
            await until(lambda: agent.counters["session_taken_over"] >= 1
                        and clone.agent.counters["session_taken_over"] >= 1,
                        20, "both devices saw the other take the session")
        finally:
            await clone.stop()
        assert "session_taken_over" in agent.heartbeat().faults
        # With the clone gone the post comes back and still carries alarms.
        await until(agent.connected.is_set, 20, "the agent reconnected")
        acked: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        agent.ack_listeners.append(lambda ack, _at: acked.done() or acked.set_result(ack))
        await post.press()
        await asyncio.wait_for(acked, 10)
        assert "session_taken_over" in agent.heartbeat().faults  # reported for a while


async def test_a_disconnect_for_session_taken_over_is_seen(deployment: d.Deployment) -> None:
    """Brokers that follow MQTT 5 here (Mosquitto >= 2.0.15, EMQX, HiveMQ) send DISCONNECT 0x8E
    to the older connection; the link reports it as a dropped connection that was taken over
    (tests/test_mqttlink.py reads it from paho), and the agent makes it its fault."""
    from mqttlink import SESSION_TAKEN_OVER, ConnectionDropped, LinkState

    post = SimPost(load_edge_config(deployment.post_config("P001")))
    agent = post.agent
    for state, error in [
        (LinkState.BACKING_OFF, ConnectionDropped("connection lost", 0x80)),
        (LinkState.CONNECTING, None),
    ]:
        agent._on_link_state(state, error)
    assert agent.counters["disconnects"] == 1 and agent.counters["session_taken_over"] == 0
    agent._on_link_state(LinkState.BACKING_OFF,
                         ConnectionDropped("connection lost", SESSION_TAKEN_OVER))
    assert agent.counters["disconnects"] == 2 and agent.counters["session_taken_over"] == 1
    assert "session_taken_over" in agent.heartbeat().faults
    post.hardware.close()
