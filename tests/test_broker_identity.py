"""A client id belongs to its credential, and no packet is bigger than the protocol needs.

A post's credential can be read out of its storage by anyone with a screwdriver. With it, an
attacker must not be able to take over the server's or another post's MQTT session (Mosquitto's
``use_username_as_clientid``), nor make the broker swallow packets of any size
(``max_packet_size``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from protocol.messages import MAX_CALL_PAYLOAD_BYTES, CallSignal, Event, encode
from protocol.topics import post_topic
from protocol.ulid import new_ulid
from provisioning import deployment as d
from server.app import CentralServer
from server.config import load_server_config
from tests.helpers import (
    RawMqtt,
    broker_of,
    db_rows,
    post_credentials,
    run_posts,
    run_server,
    server_side_credentials,
    until,
)

# MQTT 5 DISCONNECT reason codes, as paho reports them.
SESSION_TAKEN_OVER = 0x8E
PACKET_TOO_LARGE = 0x95
# Mosquitto 2.0.11 closes a taken-over connection without sending DISCONNECT 0x8E: paho then
# reports 0x80 (unspecified error, the connection was lost). Newer brokers send 0x8E.
CONNECTION_LOST = 0x80


def valid_event(post: str, seq: int = 1) -> bytes:
    return encode(Event(id=new_ulid(), post=post, seq=seq, ts=time.time()))


def committed(dep: d.Deployment, payload: bytes) -> bool:
    return bool(db_rows(dep, "SELECT 1 FROM events WHERE id=?", json.loads(payload)["id"]))


def broker_log(dep: d.Deployment) -> str:
    return broker_of(dep).log_path.read_text()


async def connect(dep: d.Deployment, user: str, client_id: str, *, password: str = "",
                  clean_start: bool = True) -> RawMqtt:
    if not password:
        user, password = post_credentials(dep, user)
    client = await asyncio.to_thread(RawMqtt, dep, user, password, client_id,
                                     clean_start=clean_start)
    assert client.connack == 0, f"{user} refused: {client.connack:#x}"
    return client


async def test_a_post_using_the_servers_client_id_cannot_disconnect_the_server(
    deployment: d.Deployment, server: CentralServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="alarmpost.server")
    client_id = load_server_config(deployment.server_config).mqtt.client_id
    witness = await connect(deployment, "P001", "witness")
    # P002's credential, the server's client id, a clean start: before, the broker dropped the
    # server for it and wiped the server's persistent session with its subscriptions.
    intruder = await connect(deployment, "P002", client_id, clean_start=True)
    try:
        event = valid_event("P001")
        assert await asyncio.to_thread(witness.publish, post_topic("P001", "event"), event) == 0
        await until(lambda: committed(deployment, event), 5,
                    "P001's event, published while P002 held the server's client id, committed")
        assert "broker connection lost" not in caplog.text
        assert server.ready.is_set()
        assert intruder.disconnects == []  # it is simply P002 now, and disturbs nobody
    finally:
        await asyncio.to_thread(intruder.close)
        await asyncio.to_thread(witness.close)
    assert "as P002 (p5, c1, k60, u'P002')" in broker_log(deployment)  # not as the server's id


async def test_a_post_using_another_posts_client_id_cannot_disconnect_it(
    deployment: d.Deployment, server: CentralServer
) -> None:
    async with run_posts(deployment, "P001") as posts:
        agent = posts["P001"].agent
        # The id the edge agent asks for, and the id a broker keyed on user names gives it.
        for client_id in ("post-P001", "P001"):
            intruder = await connect(deployment, "P002", client_id, clean_start=True)
            try:
                acked = agent.counters["acks"]
                await posts["P001"].press()
                await until(lambda n=acked: agent.counters["acks"] > n, 5, "P001's press acknowledged")
                assert agent.counters["disconnects"] == 0, f"{client_id} took P001's session"
                assert agent.connected.is_set()
            finally:
                await asyncio.to_thread(intruder.close)


async def test_two_connections_with_one_posts_credential_kick_each_other(
    deployment: d.Deployment,
) -> None:
    """A cloned post: the broker lets only one connection per credential live."""
    first = await connect(deployment, "P001", "clone-a")
    second = await connect(deployment, "P001", "clone-b")
    try:
        assert await asyncio.to_thread(first.wait_disconnected) in {SESSION_TAKEN_OVER,
                                                                    CONNECTION_LOST}
        assert second.disconnects == []
        await until(lambda: "Client P001 already connected, closing old connection"
                    in broker_log(deployment), 5, "the broker's reason in its log")
    finally:
        await asyncio.to_thread(first.close)
        await asyncio.to_thread(second.close)


async def test_a_packet_over_the_limit_disconnects_only_its_sender(
    deployment: d.Deployment, server: CentralServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="alarmpost.server")
    big = await connect(deployment, "P001", "big")
    other = await connect(deployment, "P002", "other")
    try:
        # Twice the largest legitimate message, on the sender's own (allowed) event topic.
        big.client.publish(post_topic("P001", "event"), b"{" + b" " * (2 * MAX_CALL_PAYLOAD_BYTES)
                           + b"}", qos=1)
        assert await asyncio.to_thread(big.wait_disconnected) == PACKET_TOO_LARGE
        await until(lambda: "Client P001 disconnected due to oversize packet" in broker_log(deployment),
                    5, "the broker's reason in its log")
        event = valid_event("P002")
        assert await asyncio.to_thread(other.publish, post_topic("P002", "event"), event) == 0
        await until(lambda: committed(deployment, event), 5, "P002's event committed")
        assert other.disconnects == []
        assert "broker connection lost" not in caplog.text and server.ready.is_set()
    finally:
        await asyncio.to_thread(big.close)
        await asyncio.to_thread(other.close)


async def test_the_largest_legitimate_call_signals_pass_both_ways(
    deployment: d.Deployment, server: CentralServer
) -> None:
    """The limit is sized from the protocol: a call signal of the largest size the protocol
    accepts (an SDP padded to ``MAX_CALL_PAYLOAD_BYTES``) passes post -> server and back."""

    def padded(signal: CallSignal) -> bytes:
        payload = encode(signal)
        return payload + b" " * (MAX_CALL_PAYLOAD_BYTES - len(payload))  # JSON allows it

    post = await connect(deployment, "P003", "P003")
    user, password = server_side_credentials(deployment, "server-2")
    relay = await connect(deployment, user, "relay", password=password)
    try:
        answer = padded(CallSignal(id=new_ulid(), post="P003", kind="answer", sdp="a" * 30000,
                                   ts=time.time()))
        assert len(answer) == MAX_CALL_PAYLOAD_BYTES
        assert await asyncio.to_thread(post.publish, post_topic("P003", "callstate"), answer) == 0
        await until(lambda: server.metrics.value("messages_in_total", kind="callstate") == 1, 5,
                    "the server took the largest answer")

        await asyncio.to_thread(post.subscribe, post_topic("P003", "call"))
        offer = padded(CallSignal(id=new_ulid(), post="P003", kind="offer", sdp="a" * 30000,
                                  ts=time.time()))
        assert await asyncio.to_thread(relay.publish, post_topic("P003", "call"), offer) == 0
        # (the server may also tell P003 its answer above was for no call it knows)
        await asyncio.to_thread(post.wait_received, post_topic("P003", "call"), payload=offer)
        assert post.disconnects == [] and relay.disconnects == []
    finally:
        await asyncio.to_thread(post.close)
        await asyncio.to_thread(relay.close)


async def test_the_servers_session_is_kept_while_it_is_away(deployment: d.Deployment) -> None:
    """The server's persistent session (keyed on its user name) holds what arrives meanwhile."""
    async with run_server(deployment):
        pass
    witness = await connect(deployment, "P001", "witness")
    try:
        event = valid_event("P001")
        assert await asyncio.to_thread(witness.publish, post_topic("P001", "event"), event) == 0
    finally:
        await asyncio.to_thread(witness.close)
    async with run_server(deployment):
        await until(lambda: committed(deployment, event), 5, "the event queued for the server")


async def test_the_server_never_publishes_a_packet_the_broker_would_refuse(
    deployment: d.Deployment, server: CentralServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An offer whose SDP passes a length check in characters can still be too many bytes
    (30,000 non-ASCII characters are 60,000 bytes of UTF-8): the server refuses to send it,
    instead of being disconnected by the broker for it."""
    from server.calls import CallError

    caplog.set_level(logging.WARNING, logger="alarmpost.server")
    server.calls.timeout_s = 1.0
    sdp = "v=0\r\n" + "\u00e9" * 29_990
    with pytest.raises(CallError) as refused:
        await server.calls.start("P001", "operator", sdp)
    assert refused.value.reason == "too_large"
    assert "broker connection lost" not in caplog.text and server.ready.is_set()
    assert "disconnected due to oversize packet" not in broker_log(deployment)
    assert server.calls.active() == []
