"""Dispatch under failure and bad input: a SIGKILLed server resumes its pages; refusals."""

from __future__ import annotations

import json
import time

import aiomqtt

from protocol.messages import PageAnswer, TeamPosition, encode
from protocol.topics import team_topic
from protocol.ulid import new_ulid
from provisioning import deployment as d
from tests.helpers import MakeDeployment, ServerProcess, api, broker_of, db_rows, run_posts, run_server, until
from tests.patrol_helpers import TeamSpec, add_teams, run_teams


async def test_server_sigkill_while_a_page_waits_resumes_without_duplicates(
    make_deployment: MakeDeployment, tmp_path
) -> None:
    dep = make_deployment(1)
    specs = [TeamSpec("A", 1.0), TeamSpec("B", 2.0)]
    add_teams(dep, specs, answer_timeout_s=3.0)
    server = ServerProcess(dep, tmp_path / "server.log")
    server.start()
    try:
        await server.wait_ready()
        async with run_teams(dep, None, specs) as teams, run_posts(dep, "P001") as posts:
            await until(lambda: _all_available(dep), 10, "teams available on the server")
            await posts["P001"].press()
            first = await teams["A"].wait_page(5)
            await until(lambda: db_rows(dep, "SELECT published_at FROM pages")[0][0], 5,
                        "page marked as handed to the broker")
            server.kill()
            killed_at = time.time()
            # Stay down a while, so a timer restarted from zero would fire visibly late.
            await until(lambda: time.time() > killed_at + 1.0, 2, "a second down")
            server.start()
            await server.wait_ready()
            second = await teams["B"].wait_page(6)
            # The stored deadline held: B was paged when A's page expired, not 3 s after restart.
            assert first.deadline - 0.05 <= second.ts < first.deadline + 0.9, (
                second.ts - first.deadline)
            await teams["A"].wait_for(lambda t: first.id in t.withdrawn, 10, "A told: timeout")
            assert teams["A"].deliveries == [first.id], "page A delivered more than once"
            assert teams["B"].deliveries == [second.id]
            await teams["B"].answer(second, "accept")
            await until(lambda: db_rows(dep, "SELECT state FROM incidents") == [("accepted",)], 5,
                        "accepted after the restart")
    finally:
        server.stop()
    pages = db_rows(dep, "SELECT team_id, state FROM pages ORDER BY sent_at")
    assert pages == [("A", "timeout"), ("B", "accepted")]
    actions = [a for (a,) in db_rows(dep, "SELECT action FROM audit ORDER BY id")]
    assert actions == ["opened", "paged", "page_timeout", "paged", "accepted"]


async def _all_available(dep: d.Deployment) -> bool:
    try:
        teams = await api(dep, "/api/teams")
    except Exception:
        return False
    return all(t["state"] == "available" and t["position"]["known"] for t in teams)


async def test_bad_team_input_is_refused_counted_and_corrupts_nothing(
    make_deployment: MakeDeployment,
) -> None:
    dep = make_deployment(1)
    specs = [TeamSpec("A", 1.0), TeamSpec("B", 2.0)]
    add_teams(dep, specs, answer_timeout_s=10.0)
    d.add_team_account(dep, "Z9")  # a broker account, but not a registered team
    broker_of(dep).reload()
    async with run_server(dep) as server, run_teams(dep, server, specs) as teams, \
            run_posts(dep, "P001") as posts:
        a, b = teams["A"], teams["B"]
        before = server.dispatcher.live["A"].lat
        now = time.time()

        def pos(**kw: object) -> bytes:
            body = {"v": 1, "team": "A", "lat": 26.0, "lon": 119.3, "ts": now, **kw}
            return json.dumps(body).replace('"NAN"', "NaN").encode()

        await a.publish("position", pos(lat=200.0))
        await a.publish("position", pos(lat="NAN"))
        await a.publish("position", b'{"v":1,"team":"A","lat":1e999,"lon":119.3,"ts":%f}' % now)
        await a.publish("position", pos(ts=now - 3600))  # stale
        await a.publish("position", pos(ts=now + 3600))  # from the future
        await a.publish("position", pos(team="B"))  # names another team
        await a.publish("position", b"not json")
        await until(lambda: server.metrics.value("rejected_total", reason="invalid") == 2
                    and server.metrics.value("rejected_total", reason="malformed") == 2
                    and server.metrics.value("rejected_total", reason="stale_position") == 1
                    and server.metrics.value("rejected_total", reason="future_timestamp") == 1
                    and server.metrics.value("rejected_total", reason="team_mismatch") == 1,
                    5, "bad positions refused")
        assert server.dispatcher.live["A"].lat == before

        # An unknown team (its broker account exists, the registry does not know it).
        cfg = d.open_deployment(dep.directory)
        z9 = (dep.team_config("Z9").read_text().split('password = "')[1].split('"')[0])
        async with aiomqtt.Client("127.0.0.1", cfg.broker_port, username="team-Z9",
                                  password=z9) as client:
            await client.publish(team_topic("Z9", "position"), encode(TeamPosition(
                team="Z9", lat=26.0, lon=119.3, ts=time.time())), qos=1)
        await until(lambda: server.metrics.value("rejected_total", reason="unknown_team") == 1, 5,
                    "unknown team refused")

        await posts["P001"].press()
        page = await a.wait_page(5)
        # B answers A's page; A answers a page that does not exist; A works before accepting.
        await b.publish("answer", encode(PageAnswer(page=page.id, team="B", incident=page.incident,
                                                    answer="accept", ts=time.time())))
        await a.publish("answer", encode(PageAnswer(page=new_ulid(), team="A",
                                                    incident=page.incident, answer="accept",
                                                    ts=time.time())))
        await a.answer(page, "on_scene")
        await until(lambda: server.metrics.value("rejected_total", reason="not_your_page") == 1
                    and server.metrics.value("rejected_total", reason="unknown_page") == 1
                    and server.metrics.value("rejected_total", reason="not_assigned") == 1,
                    5, "wrong answers refused")
        await a.answer(page, "accept")
        await a.answer(page, "accept")  # double accept
        await a.answer(page, "resolved")  # without a classification
        await until(lambda: server.metrics.value("rejected_total", reason="page_closed") == 1
                    and server.metrics.value("rejected_total", reason="classification_required")
                    == 1, 5, "double accept and unclassified resolve refused")
        incident = server.storage.incidents.get(page.incident)
        assert incident is not None and incident["state"] == "accepted"
        assert [t["action"] for t in incident["timeline"]] == ["opened", "paged", "accepted"]
        assert server.dispatcher.committed == {"A": page.incident}
        metrics = await api(dep, "/metrics")
    assert 'alarmpost_rejected_total{reason="not_your_page"} 1' in metrics
    assert 'alarmpost_rejected_total{reason="stale_position"} 1' in metrics
    assert db_rows(dep, "SELECT team_id, state FROM pages") == [("A", "accepted")]
