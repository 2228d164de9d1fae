"""The agent's own input boundary: nothing on its topics stops it, through the real broker.

Garbage is published with a server-side account (the only kind that may write to a post's ack,
cmd and call topics and to the server status topic), then a valid press must still be committed
and acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiomqtt
import pytest

from protocol.messages import Ack, CallSignal, Command, encode
from protocol.topics import post_topic, server_status_topic
from protocol.ulid import new_ulid
from provisioning import deployment as d
from server.app import CentralServer
from tests.helpers import db_rows, run_posts, server_side_credentials, until

# The broker, the edge or the UI: the server's storage is not what these test.
pytestmark = pytest.mark.one_backend

_DEEP_ARRAY = b'{"v":' + b"[" * 2045 + b"]" * 2045 + b"}"  # 4096 bytes, 2045 levels deep
_DEEP_OBJECT = b'{"a":' * 800 + b"1" + b"}" * 800


def _garbage(post: str) -> list[bytes]:
    return [
        _DEEP_ARRAY,
        _DEEP_OBJECT,
        b"[" * 4000,
        b"\xff\xfe\x00garbage",
        b"",
        b"null",
        b'{"v": 1, "post": "' + post.encode() + b'", "event_id": 12}',
        json.dumps({"v": 1, "post": post, "ts": 1e308 * 10}).encode(),
        json.dumps({"v": 2 ** 80, "post": post}).encode(),
        json.dumps({"v": 1, "post": "\U0001f6a8" * 50, "kind": "offer"}).encode(),
        b"x" * 40_000,  # oversized
    ]


async def test_garbage_on_every_topic_never_stops_the_agent(
    deployment: d.Deployment, server: CentralServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, password = server_side_credentials(deployment)
    topics = [post_topic("P001", k) for k in ("ack", "cmd", "call")] + [server_status_topic()]
    async with run_posts(deployment, "P001", expect_errors=True) as posts, aiomqtt.Client(
        "127.0.0.1", deployment.broker_port, username=user, password=password,
        identifier=f"test-garbage-{new_ulid()}", protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        post = posts["P001"]
        agent = post.agent
        run_task = post.task
        assert run_task is not None
        garbage = _garbage("P001")
        for topic in topics:
            for payload in garbage:
                await client.publish(topic, payload, qos=1)
        expected = len(topics) * len(garbage)
        await until(lambda: sum(agent.counters[k] for k in agent.counters
                                if k.startswith("rejected_")) >= expected,
                    10, f"{expected} messages refused")
        assert not run_task.done(), run_task

        # A command whose handling fails (the strobe output raises) is counted, not fatal.
        def broken_strobe(on: bool) -> None:
            raise OSError("strobe driver gone")

        monkeypatch.setattr(post.hardware, "set_strobe", broken_strobe)
        cmd = Command(id=new_ulid(), post="P001", cmd="strobe_on", ts=time.time())
        await client.publish(post_topic("P001", "cmd"), encode(cmd), qos=1)
        await until(lambda: agent.counters["handler_errors"] >= 1, 5, "command failure counted")
        monkeypatch.undo()

        # A call task that fails (a fault in the media code) is counted, not fatal.
        async def broken_signal(signal: CallSignal) -> None:
            raise RuntimeError("media fault")

        monkeypatch.setattr(agent.intercom, "on_signal", broken_signal)
        hangup = CallSignal(id=new_ulid(), post="P001", kind="hangup", ts=time.time())
        await client.publish(post_topic("P001", "call"), encode(hangup), qos=1)
        await until(lambda: agent.counters["call_task_errors"] >= 1, 5, "call failure counted")
        monkeypatch.undo()
        assert not run_task.done(), run_task
        assert agent.connected.is_set()

        # A valid press afterwards is committed and acknowledged.
        acked: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        agent.ack_listeners.append(lambda ack, _at: acked.done() or acked.set_result(ack))
        await post.press()
        ack = await asyncio.wait_for(acked, 10)
    assert db_rows(deployment, "SELECT id, post_id FROM events") == [(ack.event_id, "P001")]
