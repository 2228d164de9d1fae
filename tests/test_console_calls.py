"""The video intercom end to end without a browser: an aiortc peer plays the console's part over
the console WebSocket; server, broker and the post's agent are the real ones."""

from __future__ import annotations

import asyncio

import pytest

from provisioning import deployment as d
from server.app import CentralServer
from tests.console_helpers import Console, add_users, next_notice
from tests.helpers import db_rows, run_posts, until
from tests.test_media import Operator

# The broker, the edge or the UI: the server's storage is not what these test.
pytestmark = pytest.mark.one_backend


async def _call(ws, post_id: str, incident_id: str | None = None,  # type: ignore[no-untyped-def]
                mode: str = "call") -> tuple[Operator, str, object]:
    op = Operator()
    await ws.send_json({"type": "call.start", "post_id": post_id, "incident_id": incident_id,
                        "mode": mode, "sdp": await op.offer()})
    answer = await next_notice(ws, "call.answer", within=10)
    track = await op.answer(answer["sdp"])
    return op, answer["call_id"], track


async def test_answer_take_hang_up_and_every_way_a_call_ends(
    server: CentralServer, deployment: d.Deployment
) -> None:
    add_users(server, ("alice", "operator"), ("bob", "operator"))
    async with Console(deployment) as alice, Console(deployment) as bob, \
            run_posts(deployment, "P001", "P002") as posts:
        await alice.login("alice")
        await bob.login("bob")
        ws_a, ws_b = await alice.ws(), await bob.ws()
        await next_notice(ws_a, "hello")
        await next_notice(ws_b, "hello")
        await posts["P001"].press()
        opened = await next_notice(ws_a, "incident_opened")
        incident_id = opened["incident_id"]

        # Alice answers: video arrives, her voice reaches the post's speaker.
        op, call_id, track = await _call(ws_a, "P001", incident_id)
        frame = await asyncio.wait_for(track.recv(), 5)  # type: ignore[attr-defined]
        assert frame.width == 640 and frame.height == 480
        intercom = posts["P001"].agent.intercom
        assert intercom.engine is not None and intercom.engine.camera_open
        await until(lambda: intercom.engine.sink.peak > 1000, 5, "operator audio at the post")

        # Bob sees who took it and cannot take it.
        taken = await next_notice(ws_b, "call_updated", state="active")
        assert taken["user"] == "alice" and taken["post_id"] == "P001"
        await ws_b.send_json({"type": "call.start", "post_id": "P001", "sdp": "v=0\r\n"})
        refused = await next_notice(ws_b, "call.error")
        assert refused["reason"] == "taken" and refused["taken_by"] == "alice"
        _, queue = await bob.get("/console/api/incidents")
        assert queue[0]["call_owner"] == "alice"

        # Bob may still watch the camera: the post serves both from one camera (MediaRelay).
        view_op, view_id, view_track = await _call(ws_b, "P001", mode="view")
        await asyncio.wait_for(view_track.recv(), 5)  # type: ignore[attr-defined]
        await asyncio.wait_for(track.recv(), 5)  # type: ignore[attr-defined]
        assert intercom.engine.opened_sources == 1 and len(intercom.engine.calls) == 2
        assert server.calls.owner("P001") == "alice"  # a view takes nothing
        await ws_b.send_json({"type": "call.hangup", "call_id": view_id})
        await next_notice(ws_b, "call.ended", call_id=view_id)
        await until(lambda: len(intercom.engine.calls) == 1, 5, "view ended at the post")
        assert intercom.engine.camera_open  # alice still sees
        await view_op.pc.close()

        # 1. Hang-up.
        await ws_a.send_json({"type": "call.hangup", "call_id": call_id})
        await next_notice(ws_a, "call.ended", call_id=call_id)
        await until(lambda: not intercom.engine.camera_open, 5, "camera released")
        await op.pc.close()

        # 2. The browser goes away (WebSocket closed): the post ends the call, frees the camera.
        op, call_id, track = await _call(ws_a, "P001", incident_id)
        assert intercom.engine.camera_open
        await ws_a.close()
        await until(lambda: not intercom.engine.camera_open, 5, "camera released after close")
        ended = await next_notice(ws_b, "call_updated", state="ended", reason="console closed")
        assert ended["user"] == "alice"
        await op.pc.close()

        # 3. The post reboots: its calls and views end, consoles are told, the camera is free.
        op, call_id, track = await _call(ws_b, "P002")  # a call without an alarm
        view_op, view_id, _ = await _call(ws_b, "P002", mode="view")
        second = posts["P002"].agent.intercom
        assert second.engine is not None and second.engine.camera_open
        await posts["P002"].stop()
        ended = await next_notice(ws_b, "call.ended", call_id=call_id)
        assert "post" in ended["reason"]
        assert second.engine.calls == {} and not second.engine.camera_open
        assert server.calls.calls == {}
        await op.pc.close()
        await view_op.pc.close()
        # An offline post is refused at once, not after the call timeout.
        await until(lambda: server.live["P002"].state == "offline", 5, "P002 offline")
        await ws_b.send_json({"type": "call.start", "post_id": "P002", "sdp": "v=0\r\n"})
        assert (await next_notice(ws_b, "call.error"))["reason"] == "offline"
        await ws_b.close()

    timeline = server.storage.incidents.get(incident_id)["timeline"]
    actions = [t["action"] for t in timeline]
    assert actions.count("call_answered") == 2 and actions.count("call_ended") == 2
    assert server.calls.calls == {} and server.calls.by_post == {}
    audit = db_rows(deployment, "SELECT actor, action, target FROM console_audit")
    assert ("bob", "camera_view", "P001") in audit and ("alice", "call_start", "P001") in audit


async def test_a_post_that_does_not_answer_times_out(server: CentralServer,
                                                     deployment: d.Deployment) -> None:
    add_users(server, ("alice", "operator"))
    server.calls.timeout_s = 0.5
    async with Console(deployment) as alice:  # P003 is not running
        await alice.login("alice")
        ws = await alice.ws()
        await next_notice(ws, "hello")
        op = Operator()
        await ws.send_json({"type": "call.start", "post_id": "P003", "sdp": await op.offer()})
        err = await next_notice(ws, "call.error")
        assert err["reason"] == "timeout"
        assert server.calls.owner("P003") is None  # free for the next try
        await op.pc.close()
        await ws.close()


async def test_each_post_has_only_its_own_call_topics(deployment: d.Deployment) -> None:
    from tests.test_security import PahoPost, credentials

    p2 = await asyncio.to_thread(PahoPost, deployment, *credentials(deployment, "P002"))
    try:
        # P002 may not answer or hang up P001's calls, nor send P001 offers...
        for topic in ("alarmpost/v1/post/P001/callstate", "alarmpost/v1/post/P001/call",
                      "alarmpost/v1/post/P002/call"):
            assert await asyncio.to_thread(p2.publish, topic, b"{}") == 0x87, topic
        # ...but speaks on its own callstate.
        code = await asyncio.to_thread(p2.publish, "alarmpost/v1/post/P002/callstate", b"{}")
        assert code < 0x80  # success (0x10: no subscriber, nothing else is running here)
    finally:
        await asyncio.to_thread(p2.close)
