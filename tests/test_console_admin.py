"""Console: post test mode, account management by admins, operator dispatch overrides."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from protocol.messages import Event
from protocol.ulid import new_ulid
from provisioning import deployment as d
from server.app import CentralServer
from tests.console_helpers import PASSWORD, Console, add_users, next_notice
from tests.helpers import MakeDeployment, api, db_rows, run_posts, run_server, until
from tests.patrol_helpers import TeamSpec, add_teams, run_teams
from tests.storage_helpers import sqlite_storage


def test_an_older_database_gets_the_test_mode_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the posts table as the first release created it
        conn.execute("CREATE TABLE posts (id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', "
                     "school TEXT NOT NULL DEFAULT '', address TEXT NOT NULL DEFAULT '', lat REAL, "
                     "lon REAL, state TEXT NOT NULL DEFAULT 'unknown', state_since REAL, "
                     "last_seen REAL, health TEXT)")
        conn.execute("INSERT INTO posts (id) VALUES ('P001')")
    conn.close()
    storage = sqlite_storage(str(path))
    assert storage.posts.get("P001")["test_mode"] == 0
    storage.posts.set_test_mode("P001", True, "tina", "commissioning")
    storage.close()
    again = sqlite_storage(str(path))  # the migration is idempotent; the flag survives a restart
    assert again.posts.in_test_mode("P001")
    row = again.posts.get("P001")
    assert (row["test_mode"], row["test_mode_by"], row["test_mode_reason"]) == (
        1, "tina", "commissioning")
    now = time.time()
    (res,) = again.incidents.commit_events([(Event(id=new_ulid(), post="P001", seq=1, ts=now),
                                             now)])
    assert res.test and again.incidents.get(res.incident_id)["classification"] == "test"
    again.close()


async def test_test_mode_commits_and_acks_but_neither_rings_nor_pages(
    make_deployment: MakeDeployment,
) -> None:
    dep = make_deployment(1)
    specs = [TeamSpec("A", 1.0)]
    add_teams(dep, specs)
    async with run_server(dep) as server, run_teams(dep, server, specs) as teams, \
            run_posts(dep, "P001") as posts, Console(dep) as tina, Console(dep) as otto, \
            Console(dep) as ada:
        add_users(server, ("tina", "technician"), ("otto", "operator"), ("ada", "admin"))
        for c, name in ((tina, "tina"), (otto, "otto"), (ada, "ada")):
            assert (await c.login(name)).status == 200
        path = "/console/api/posts/P001/test_mode"
        # Operators may not; CSRF is enforced; a reason is required to switch it on.
        assert (await otto.post(path, {"on": True, "reason": "x"}))[0] == 403
        assert (await tina.post(path, {"on": True, "reason": "x"}, csrf="forged"))[0] == 403
        status, body = await tina.post(path, {"on": True, "reason": ""})
        assert status == 400 and "reason" in body["error"]
        assert (await tina.post(path, {"on": "yes", "reason": "x"}))[0] == 400
        assert (await tina.post("/console/api/posts/NOPE/test_mode",
                                {"on": True, "reason": "x"}))[0] == 404
        ws = await otto.ws()
        assert (await ws.receive_json())["type"] == "hello"

        status, row = await tina.post(path, {"on": True, "reason": "commissioning self-test"})
        assert status == 200 and row["test_mode"] == 1 and row["test_mode_by"] == "tina"
        notice = await next_notice(ws, "post_test_mode", post_id="P001")
        assert notice["test_mode"] is True and notice["actor"] == "tina"
        (listed,) = [p for p in await api(dep, "/api/posts") if p["id"] == "P001"]
        assert listed["test_mode"] == 1 and listed["test_mode_reason"] == "commissioning self-test"
        status, console_posts = await otto.get("/console/api/posts")
        assert console_posts[0]["test_mode"] == 1

        # The press is committed and acknowledged as ever ("help is coming" shows)...
        post = posts["P001"]
        await post.press()
        opened = await next_notice(ws, "incident_opened")
        assert opened["test"] is True and opened["incident"]["classification"] == "test"
        incident_id = opened["incident_id"]
        await until(lambda: post.agent.outbox_depth == 0 and post.hardware.help, 5, "ACK")
        # ...but no team is paged: once the dispatcher has taken the notice (its queue is empty;
        # it decides without awaiting), it has made no job and sent no page.
        await until(lambda: server.dispatcher._notices.empty(), 5, "the dispatcher took it")
        assert incident_id not in server.dispatcher.jobs and teams["A"].pages == {}
        timeline = server.storage.incidents.get(incident_id)["timeline"]
        assert "test mode" in timeline[0]["detail"]

        # Out of test mode: the open test incident is closed, the next press is a real alarm.
        status, row = await ada.post(path, {"on": False, "reason": "done"})
        assert status == 200 and row["test_mode"] == 0
        await until(lambda: server.storage.incidents.get(incident_id)["state"] == "resolved", 5,
                    "test incident closed")
        await post.press()
        real = await next_notice(ws, "incident_opened")
        assert real["incident_id"] != incident_id and real["incident"]["classification"] is None
        await teams["A"].wait_page(5)
        await ws.close()
    audit = db_rows(dep, "SELECT actor, action, target, detail FROM console_audit "
                         "WHERE action LIKE 'test_mode%'")
    assert audit == [("tina", "test_mode_on", "P001", "commissioning self-test"),
                     ("ada", "test_mode_off", "P001", "done")]


async def test_admin_manages_accounts(server: CentralServer, deployment: d.Deployment) -> None:
    add_users(server, ("ada", "admin"), ("otto", "operator"))
    async with Console(deployment) as ada, Console(deployment) as otto, \
            Console(deployment) as newbie:
        assert (await ada.login("ada")).status == 200
        assert (await otto.login("otto")).status == 200
        # Only admins; CSRF enforced.
        assert (await otto.get("/console/api/users"))[0] == 403
        assert (await otto.post("/console/api/users/otto/role", {"role": "admin"}))[0] == 403
        assert (await ada.post("/console/api/users/otto/role", {"role": "admin"},
                               csrf="forged"))[0] == 403
        assert (await ada.post("/console/api/users",
                               {"name": "nina", "role": "operator", "password": PASSWORD},
                               csrf=""))[0] == 403

        status, body = await ada.post("/console/api/users",
                                      {"name": "nina", "role": "technician", "password": PASSWORD})
        assert status == 201
        assert (await ada.post("/console/api/users",
                               {"name": "nina", "role": "operator", "password": PASSWORD}))[0] == 400
        assert (await newbie.login("nina")).status == 200
        assert (await newbie.get("/console/api/incidents"))[0] == 403  # technician

        # A new role applies to the open session at once; the WebSocket is closed to pick it up.
        ws = await newbie.ws()
        assert (await ws.receive_json())["type"] == "hello"
        assert (await ada.post("/console/api/users/nina/role", {"role": "operator"}))[0] == 200
        assert (await ws.receive()).type.name in ("CLOSE", "CLOSED", "CLOSING")
        assert (await newbie.get("/console/api/incidents"))[0] == 200
        assert (await ada.post("/console/api/users/nina/role", {"role": "god"}))[0] == 400
        assert (await ada.post("/console/api/users/nobody/role", {"role": "admin"}))[0] == 404

        # Disabled: the session ends and the password no longer works; enabled again, it does.
        assert (await ada.post("/console/api/users/nina/disabled", {"disabled": True}))[0] == 200
        assert (await newbie.get("/console/api/me"))[0] == 401
        assert (await newbie.login("nina")).status == 401
        status, users = await ada.get("/console/api/users")
        assert {u["name"]: u["disabled"] for u in users}["nina"] == 1
        assert (await ada.post("/console/api/users/nina/disabled", {"disabled": False}))[0] == 200
        assert (await newbie.login("nina")).status == 200

        # Password reset: sessions end, the old password fails, the new one works.
        assert (await ada.post("/console/api/users/nina/password", {"password": "short"}))[0] == 400
        assert (await ada.post("/console/api/users/nina/password",
                               {"password": "a brand new secret"}))[0] == 200
        assert (await newbie.get("/console/api/me"))[0] == 401
        assert (await newbie.login("nina")).status == 401
        assert (await newbie.login("nina", "a brand new secret")).status == 200

        # The last enabled admin cannot be demoted or disabled.
        status, body = await ada.post("/console/api/users/ada/role", {"role": "operator"})
        assert status == 400 and "last enabled admin" in body["error"]
        assert (await ada.post("/console/api/users/ada/disabled", {"disabled": True}))[0] == 400
    audit = db_rows(deployment, "SELECT actor, action, target FROM console_audit "
                                "WHERE action LIKE 'user_%' AND actor='ada'")
    assert audit == [("ada", "user_added", "nina"), ("ada", "user_role", "nina"),
                     ("ada", "user_disabled", "nina"), ("ada", "user_enabled", "nina"),
                     ("ada", "user_password_reset", "nina")]
    assert PASSWORD not in str(db_rows(deployment, "SELECT * FROM console_audit"))


async def test_operator_cancels_a_page_and_redispatches(make_deployment: MakeDeployment) -> None:
    dep = make_deployment(1)
    specs = [TeamSpec("A", 1.0), TeamSpec("B", 2.0), TeamSpec("C", 3.0)]
    add_teams(dep, specs, answer_timeout_s=30.0)
    async with run_server(dep) as server, run_teams(dep, server, specs) as teams, \
            run_posts(dep, "P001") as posts, Console(dep) as otto, Console(dep) as tina:
        add_users(server, ("otto", "operator"), ("tina", "technician"))
        assert (await otto.login("otto")).status == 200
        assert (await tina.login("tina")).status == 200
        await posts["P001"].press()
        first = await teams["A"].wait_page(5)
        base = f"/console/api/incidents/{first.incident}"
        assert (await tina.post(f"{base}/pages/{first.id}/cancel", {}))[0] == 403
        assert (await tina.post(f"{base}/redispatch", {}))[0] == 403
        assert (await otto.post(f"{base}/redispatch", {}, csrf="forged"))[0] == 403
        assert (await otto.post(f"{base}/pages/nope/cancel", {}))[0] == 404

        status, body = await otto.post(f"{base}/pages/{first.id}/cancel",
                                       {"reason": "team A reported a flat tyre"})
        assert status == 200
        await teams["A"].wait_for(lambda t: first.id in t.withdrawn, 5, "A's page withdrawn")
        second = await teams["B"].wait_page(5)
        assert (await otto.post(f"{base}/pages/{first.id}/cancel", {}))[0] == 409  # not waiting

        status, body = await otto.post(f"{base}/redispatch", {"reason": "B is too far"})
        assert status == 200 and body["dispatch"]["state"] == "paging"
        await teams["B"].wait_for(lambda t: second.id in t.withdrawn, 5, "B's page withdrawn")
        # A fresh round: B (the team it had) is left out, A is nearest again, C never paged.
        third = await teams["A"].wait_page(5, count=2)
        assert third.incident == first.incident and third.id != first.id
        assert teams["C"].pages == {}
        status, detail = await otto.get(base)
        actions = [(t["actor"], t["action"]) for t in detail["timeline"]]
        assert ("otto", "page_cancelled") in actions and ("otto", "redispatch") in actions
        assert any(p["state"] == "waiting" for p in detail["dispatch"]["pages"])
