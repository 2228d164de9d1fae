"""The console over its real HTTP and WebSocket: ringing, handling an incident, confirmed commands."""

from __future__ import annotations

import asyncio
import time

from provisioning import deployment as d
from server.app import CentralServer
from tests.console_helpers import Console, add_users, next_notice
from tests.helpers import db_rows, run_posts


async def test_press_rings_every_console_and_the_incident_is_handled(
    server: CentralServer, deployment: d.Deployment
) -> None:
    add_users(server, ("alice", "operator"), ("bob", "operator"), ("ada", "admin"))
    async with Console(deployment) as alice, Console(deployment) as bob, \
            Console(deployment) as ada, run_posts(deployment, "P001") as posts:
        for c, name in ((alice, "alice"), (bob, "bob"), (ada, "ada")):
            assert (await c.login(name)).status == 200
        sockets = [await c.ws() for c in (alice, bob, ada)]
        for ws in sockets:
            assert (await ws.receive_json())["type"] == "hello"
        pressed = time.monotonic()
        await posts["P001"].press()
        rung = await asyncio.gather(*(next_notice(ws, "incident_opened") for ws in sockets))
        took = time.monotonic() - pressed
        assert took < 1.0, f"consoles rang {took:.3f} s after the press"
        incident = rung[0]["incident"]
        assert incident["post_id"] == "P001" and incident["state"] == "new"
        assert incident["school"] and incident["opened_at"]
        incident_id = incident["id"]

        status, body = await alice.post(f"/console/api/incidents/{incident_id}/acknowledge")
        assert status == 200 and body["acknowledged_by"] == "alice"
        seen = await next_notice(sockets[1], "incident_updated", incident_id=incident_id)
        assert seen["incident"]["acknowledged_by"] == "alice"  # bob sees who has it

        # Silence: the server sends a Command; the post confirms; every console is told.
        assert posts["P001"].hardware.siren
        status, cmd = await alice.post("/console/api/posts/P001/command",
                                       {"cmd": "silence", "incident_id": incident_id})
        assert status == 202 and cmd["state"] == "sent"
        done = await next_notice(sockets[1], "command_updated", within=5)
        while done["command"]["state"] == "sent":
            done = await next_notice(sockets[1], "command_updated", within=5)
        assert done["command"]["id"] == cmd["id"] and done["command"]["state"] == "confirmed"
        assert not posts["P001"].hardware.siren and posts["P001"].hardware.strobe

        # Bad input is refused with a reason, never a crash.
        for bad_body in ({"cmd": "explode"}, {"cmd": 3}, {"cmd": "reset", "incident_id": "nope"}):
            status, body = await alice.post("/console/api/posts/P001/command", bad_body)
            assert status == 400 and body["error"], bad_body
        assert (await alice.post("/console/api/posts/NOPE/command", {"cmd": "reset"}))[0] == 404
        status, body = await alice.post(f"/console/api/incidents/{incident_id}/resolve",
                                        {"classification": "alien", "note": ""})
        assert status == 400
        status, body = await ada.post(f"/console/api/incidents/{incident_id}/resolve",
                                      {"classification": "help_request", "note": "x"})
        assert status == 403  # an admin reads incidents, does not handle them

        status, body = await alice.post(f"/console/api/incidents/{incident_id}/resolve",
                                        {"classification": "help_request",
                                         "note": "crowd of cars at closing time"})
        assert status == 200 and body["state"] == "resolved"
        assert (await alice.post(f"/console/api/incidents/{incident_id}/acknowledge"))[0] == 409

        status, detail = await bob.get(f"/console/api/incidents/{incident_id}")
        actions = [(t["actor"], t["action"]) for t in detail["timeline"]]
        assert actions[0] == ("post:P001", "opened")
        assert ("alice", "acknowledged") in actions and ("alice", "command_silence") in actions
        assert ("post:P001", "command_silence_confirmed") in actions
        assert actions[-1] == ("alice", "resolved")
        assert detail["commands"][0]["state"] == "confirmed"
        for ws in sockets:
            await ws.close()
    audit = db_rows(deployment, "SELECT actor, action, target FROM console_audit")
    assert ("alice", "command_silence", "P001") in audit


async def test_command_to_a_silent_post_times_out(server: CentralServer,
                                                  deployment: d.Deployment) -> None:
    add_users(server, ("tess", "technician"))
    server.commands.timeout_s = 0.3
    async with Console(deployment) as tess:
        assert (await tess.login("tess")).status == 200
        ws = await tess.ws()
        status, cmd = await tess.post("/console/api/posts/P002/command", {"cmd": "reset"})
        assert status == 202
        done = await next_notice(ws, "command_updated", within=3)
        while done["command"]["state"] == "sent":
            done = await next_notice(ws, "command_updated", within=3)
        assert done["command"]["state"] == "timed_out"
        status, rows = await tess.get("/console/api/commands?post=P002")
        assert rows[0]["id"] == cmd["id"] and rows[0]["state"] == "timed_out"
        # A technician sees posts but not incidents, and gets no incident notices.
        assert (await tess.get("/console/api/incidents"))[0] == 403
        status, posts = await tess.get("/console/api/posts")
        assert status == 200 and {p["id"] for p in posts} == {"P001", "P002", "P003"}
        assert all("faults" in p for p in posts)
        await ws.close()


async def test_bad_websocket_messages_are_refused_and_counted(
    server: CentralServer, deployment: d.Deployment
) -> None:
    add_users(server, ("alice", "operator"), ("tess", "technician"))
    async with Console(deployment) as alice, Console(deployment) as tess:
        await alice.login("alice")
        await tess.login("tess")
        ws = await alice.ws()
        await next_notice(ws, "hello")
        for raw in ("not json", "[1,2]", '{"type": 5}', '{"type": "launch"}'):
            await ws.send_str(raw)
            assert (await next_notice(ws, "error"))["error"]
        await ws.send_bytes(b"\x00")
        await next_notice(ws, "error")
        for bad in ({"post_id": "NOPE", "sdp": "v=0\r\n"}, {"post_id": "P001", "sdp": "hello"},
                    {"post_id": "P001", "sdp": "v=0" + "x" * 40000}):
            await ws.send_json({"type": "call.start", **bad})
            err = await next_notice(ws, "call.error")
            assert err["reason"] == "invalid"
        await ws.send_json({"type": "call.hangup", "call_id": "01ABC"})
        await next_notice(ws, "error")
        await ws.send_json({"type": "ping"})
        await next_notice(ws, "pong")  # still serving
        ws2 = await tess.ws()
        await next_notice(ws2, "hello")
        await ws2.send_json({"type": "call.start", "post_id": "P001", "sdp": "v=0\r\n"})
        assert "role" in (await next_notice(ws2, "error"))["error"]
        await ws.close()
        await ws2.close()
    assert server.metrics.value("console_ws_rejected_total", reason="malformed") == 3
    assert server.metrics.value("console_ws_rejected_total", reason="role") == 1


async def test_operator_pages_a_team_from_the_console(make_deployment) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import run_server
    from tests.patrol_helpers import TeamSpec, add_teams, run_teams

    dep = make_deployment(1)
    specs = [TeamSpec("A", 1.0), TeamSpec("B", 3.0)]
    add_teams(dep, specs, answer_timeout_s=30.0)
    async with run_server(dep) as server, run_teams(dep, server, specs) as teams, \
            run_posts(dep, "P001") as posts, Console(dep) as alice, Console(dep) as tess:
        add_users(server, ("alice", "operator"), ("tess", "technician"))
        await alice.login("alice")
        await tess.login("tess")
        status, views = await alice.get("/console/api/teams")
        assert status == 200 and {v["id"] for v in views} == {"A", "B"}
        assert all(v["position"]["known"] for v in views)
        assert (await tess.get("/console/api/teams"))[0] == 403
        await posts["P001"].press()
        first = await teams["A"].wait_page(5)  # the dispatcher pages the nearest
        incident_id = first.incident
        status, body = await alice.post(f"/console/api/incidents/{incident_id}/page",
                                        {"team_id": "B"})
        assert status == 200 and body["page_id"]
        page = await teams["B"].wait_page(5)
        assert page.incident == incident_id
        status, body = await alice.post(f"/console/api/incidents/{incident_id}/page",
                                        {"team_id": "nobody"})
        assert status == 409 and "nobody" in body["error"]
        assert (await tess.post(f"/console/api/incidents/{incident_id}/page",
                                {"team_id": "A"}))[0] == 403
        status, detail = await alice.get(f"/console/api/incidents/{incident_id}")
        assert [p["team_id"] for p in detail["dispatch"]["pages"]] == ["A", "B"]
