"""The dispatcher against a real Mosquitto, real SQLite, real team devices (simulated phones)."""

from __future__ import annotations

import asyncio

from server.bus import Notice
from tests.helpers import MakeDeployment, api, run_posts, run_server, until
from tests.patrol_helpers import TeamSpec, add_teams, run_teams


async def test_nearest_team_is_paged_and_works_the_incident(make_deployment: MakeDeployment) -> None:
    dep = make_deployment(1)
    specs = [TeamSpec("A", 3.0), TeamSpec("B", 1.0), TeamSpec("C", -2.0)]
    add_teams(dep, specs, answer_timeout_s=5.0)
    async with run_server(dep) as server, run_teams(dep, server, specs) as teams, \
            run_posts(dep, "P001") as posts:
        await posts["P001"].press()
        page = await teams["B"].wait_page(5)
        post = dep.posts[0]
        assert (page.post, page.post_name, page.school, page.address) == (
            "P001", post.name, post.school, post.address)
        assert (page.lat, page.lon) == (post.lat, post.lon) and not page.broadcast
        assert teams["A"].pages == {} and teams["C"].pages == {}
        await teams["B"].answer(page, "accept")
        await until(lambda: server.dispatcher.jobs[page.incident].state == "assigned", 5, "assigned")
        await teams["B"].answer(page, "en_route")
        await teams["B"].answer(page, "on_scene")
        await until(lambda: server.storage.incidents.get(page.incident)["state"] == "on_scene", 5,
                    "on scene")
        view = await api(dep, "/api/teams/B")
        assert view["state"] == "assigned" and view["incident_id"] == page.incident
        await teams["B"].answer(page, "resolved", classification="false_alarm")
        await until(lambda: page.incident not in server.dispatcher.jobs, 5, "job done")
        body = await api(dep, f"/api/incidents/{page.incident}")
    assert body["state"] == "resolved" and body["classification"] == "false_alarm"
    assert [(a["actor"], a["action"]) for a in body["timeline"]] == [
        ("post:P001", "opened"), ("dispatcher", "paged"), ("team:B", "accepted"),
        ("team:B", "en_route"), ("team:B", "on_scene"), ("team:B", "resolved")]
    times = body["dispatch"]["times"]
    assert 0 <= times["press_to_page_s"] < 1.0
    assert times["page_to_accept_s"] >= 0 and times["accept_to_on_scene_s"] >= 0
    assert [p["team_id"] for p in body["dispatch"]["pages"]] == ["B"]


async def test_timeout_and_decline_escalate_to_the_next_team(make_deployment: MakeDeployment) -> None:
    dep = make_deployment(1)
    specs = [TeamSpec("A", 1.0), TeamSpec("B", 2.0, answer="decline"), TeamSpec("C", 3.0),
             TeamSpec("D", 4.0)]
    add_teams(dep, specs, answer_timeout_s=0.5, direct_pages=3)
    async with run_server(dep) as server, run_teams(dep, server, specs) as teams, \
            run_posts(dep, "P001") as posts:
        await posts["P001"].press()
        first = await teams["A"].wait_page(5)
        await teams["A"].wait_for(lambda t: first.id in t.withdrawn, 3, "A's page timed out")
        assert teams["A"].withdrawn[first.id] == "timeout"
        await teams["B"].wait_page(3)  # B declines by itself
        third = await teams["C"].wait_page(3)
        assert third.deadline - third.ts == 0.5
        await teams["C"].answer(third, "accept")
        await until(lambda: server.dispatcher.jobs[first.incident].team_id == "C", 5, "C assigned")
        assert teams["D"].pages == {}
        summary = server.dispatcher.incident_summary(first.incident)
        timeline = server.storage.incidents.audit(first.incident)
    assert summary is not None
    assert [(p["team_id"], p["kind"], p["state"]) for p in summary["pages"]] == [
        ("A", "direct", "timeout"), ("B", "direct", "declined"), ("C", "direct", "accepted")]
    assert [a["action"] for a in timeline] == [
        "opened", "paged", "page_timeout", "paged", "page_declined", "paged", "accepted"]
    assert server.metrics.value("pages_timed_out_total") == 1
    assert server.metrics.value("page_answers_total", answer="decline") == 1


async def test_broadcast_first_acceptance_wins_exactly_once(make_deployment: MakeDeployment) -> None:
    dep = make_deployment(1)
    specs = [TeamSpec("A", 0.5), TeamSpec("B", 1.0), TeamSpec("C", -1.5), TeamSpec("D", 2.0),
             TeamSpec("E", 30.0)]  # E is beyond the broadcast radius
    add_teams(dep, specs, answer_timeout_s=0.5, direct_pages=1, broadcast_radius_km=5.0)
    async with run_server(dep) as server, run_teams(dep, server, specs) as teams, \
            run_posts(dep, "P001") as posts:
        await posts["P001"].press()
        direct = await teams["A"].wait_page(5)
        assert not direct.broadcast
        pages = await asyncio.gather(*(teams[t].wait_page(3, count=2 if t == "A" else 1)
                                       for t in "ABCD"))
        assert all(p.broadcast for p in pages)
        # B, C and D accept at the same moment; A (timed out before) stays silent.
        await asyncio.gather(*(teams[t].answer(p, "accept") for t, p in zip("ABCD", pages, strict=False)
                               if t != "A"))
        await until(lambda: server.metrics.value("rejected_total", reason="page_closed") == 2, 5,
                    "the two late accepts refused")
        job = server.dispatcher.jobs[direct.incident]
        winner = job.team_id
        assert winner in ("B", "C", "D") and job.state == "assigned"
        for t, p in zip("ABCD", pages, strict=False):
            if t != winner:
                await teams[t].wait_for(lambda tm, p=p: p.id in tm.withdrawn, 3, "withdrawn")
                assert teams[t].withdrawn[p.id] == "taken"
        assert teams["E"].pages == {}
        timeline = server.storage.incidents.audit(direct.incident)
        assert set(server.dispatcher.committed) == {winner}
        rows = server.dispatcher.incident_summary(direct.incident)
    assert [a["action"] for a in timeline].count("accepted") == 1
    assert rows is not None
    states = sorted(p["state"] for p in rows["pages"] if p["kind"] == "broadcast")
    assert states == ["accepted", "withdrawn", "withdrawn", "withdrawn"]


async def test_two_alarms_get_two_teams_and_one_team_queues_the_second(
    make_deployment: MakeDeployment,
) -> None:
    dep = make_deployment(2)
    specs = [TeamSpec("A", 1.0), TeamSpec("B", 1.2)]
    add_teams(dep, specs, answer_timeout_s=5.0)
    async with run_server(dep) as server, run_teams(dep, server, specs) as teams, \
            run_posts(dep) as posts:
        await asyncio.gather(posts["P001"].press(), posts["P002"].press())
        a, b = await asyncio.gather(teams["A"].wait_page(5), teams["B"].wait_page(5))
        assert {a.post, b.post} == {"P001", "P002"} and a.incident != b.incident
        # Nothing else was paged: the dispatcher's own record of each incident holds one page,
        # and each team has received exactly the one page it was sent.
        for page in (a, b):
            summary = server.dispatcher.incident_summary(page.incident)
            assert summary is not None
            assert [(p["team_id"], p["kind"]) for p in summary["pages"]] == [(page.team, "direct")]
        await until(lambda: all(p.published_at for j in server.dispatcher.jobs.values()
                                for p in j.pages.values()), 5, "every page handed to the broker")
        await teams["A"].wait_for(lambda t: len(t.pages) == 1, 5, "A's page")
        await teams["B"].wait_for(lambda t: len(t.pages) == 1, 5, "B's page")
        assert len(teams["A"].pages) == 1 and len(teams["B"].pages) == 1

    dep = make_deployment(2)
    specs = [TeamSpec("A", 1.0)]
    add_teams(dep, specs, answer_timeout_s=5.0)
    async with run_server(dep) as server, run_teams(dep, server, specs) as teams, \
            run_posts(dep) as posts:
        notices = server.bus.subscribe()
        await asyncio.gather(posts["P001"].press(), posts["P002"].press())
        first = await teams["A"].wait_page(5)
        queued = await asyncio.wait_for(_next(notices, "dispatch_queued"), 5)
        assert queued["incident_id"] != first.incident
        assert "1 busy" in queued["reason"]
        body = await api(dep, f"/api/incidents/{queued['incident_id']}")
        assert body["dispatch"]["state"] == "queued" and "busy" in body["dispatch"]["reason"]
        await teams["A"].answer(first, "accept")
        await teams["A"].answer(first, "on_scene")
        # Once the server has taken the answer, the queued incident must still wait: A is busy.
        await until(lambda: (server.dispatcher.incident_summary(first.incident) or {})
                    .get("times", {}).get("on_scene_at"), 5, "on_scene recorded")
        waiting = server.dispatcher.incident_summary(queued["incident_id"])
        assert waiting is not None and waiting["state"] == "queued" and waiting["pages"] == []
        assert len(teams["A"].pages) == 1
        await teams["A"].answer(first, "resolved", classification="help_request")
        second = await teams["A"].wait_page(5, count=2)
        assert second.incident == queued["incident_id"]


async def _next(queue: asyncio.Queue[Notice], kind: str) -> dict[str, object]:
    while True:
        notice = (await queue.get()).as_dict()
        if notice["type"] == kind:
            return notice


async def test_team_offline_gets_the_page_when_it_comes_back(make_deployment: MakeDeployment) -> None:
    dep = make_deployment(1)
    specs = [TeamSpec("A", 1.0)]
    add_teams(dep, specs, answer_timeout_s=10.0)
    async with run_server(dep) as server, run_teams(dep, server, specs) as teams, \
            run_posts(dep, "P001") as posts:
        team = teams["A"]
        await team.stop()  # a clean disconnect: the server still counts it available
        await posts["P001"].press()
        await until(lambda: any(p.published_at for j in server.dispatcher.jobs.values()
                                for p in j.pages.values()), 5, "page handed to the broker")
        assert team.pages == {}
        team.start()
        page = await team.wait_page(5)
        assert page.post == "P001" and team.deliveries == [page.id]


async def test_operator_overrides(make_deployment: MakeDeployment) -> None:
    from server.dispatch import DispatchError

    dep = make_deployment(1)
    specs = [TeamSpec("A", 1.0), TeamSpec("B", 2.0), TeamSpec("C", 3.0)]
    add_teams(dep, specs, answer_timeout_s=10.0)
    async with run_server(dep) as server, run_teams(dep, server, specs) as teams, \
            run_posts(dep, "P001") as posts:
        await posts["P001"].press()
        page = await teams["A"].wait_page(5)
        incident = page.incident
        d_ = server.dispatcher
        # Page a chosen team: A's page is withdrawn, C is paged.
        d_.page_team(incident, "C", "op:alice", "C knows the school")
        await teams["A"].wait_for(lambda t: page.id in t.withdrawn, 3, "A withdrawn")
        c_page = await teams["C"].wait_page(3)
        # Cancel C's page: the dispatcher goes on to the next untried team, B.
        d_.cancel_page(c_page.id, "op:alice", "wrong team")
        b_page = await teams["B"].wait_page(3)
        await teams["B"].answer(b_page, "accept")
        await until(lambda: d_.jobs[incident].team_id == "B", 5, "B assigned")
        # Re-dispatch: B is released and left out; A is nearest again.
        d_.redispatch(incident, "op:bob", "B stuck in traffic")
        await teams["B"].wait_for(lambda t: b_page.id in t.withdrawn, 3, "B withdrawn")
        assert teams["B"].withdrawn[b_page.id] == "reassigned"
        again = await teams["A"].wait_page(3, count=2)
        assert again.incident == incident
        try:
            d_.page_team(incident, "nobody", "op:bob")
        except DispatchError as exc:
            assert "no team" in str(exc)
        else:
            raise AssertionError("paging an unknown team must fail")
        # The operator cancels the incident: the assigned team is told and is free again.
        await teams["A"].answer(again, "accept")
        await until(lambda: d_.jobs[incident].team_id == "A", 5, "A assigned")
        server.transition(incident, "cancelled", "op:bob", reason="prank")
        await teams["A"].wait_for(lambda t: t.withdrawn.get(again.id) == "closed", 3, "A told")
        assert d_.committed == {} and incident not in d_.jobs
        try:
            d_.redispatch(incident, "op:bob")
        except DispatchError as exc:
            assert "not being dispatched" in str(exc)
        else:
            raise AssertionError("a closed incident cannot be re-dispatched")
        actions = [(a["actor"], a["action"]) for a in server.storage.incidents.audit(incident)]
    assert ("op:alice", "paged") in actions and ("op:alice", "page_cancelled") in actions
    assert ("op:bob", "redispatch") in actions


async def test_an_operator_cannot_page_a_team_busy_on_another_incident(
    make_deployment: MakeDeployment,
) -> None:
    from server.dispatch import DispatchError

    dep = make_deployment(2)
    specs = [TeamSpec("A", 1.0), TeamSpec("B", 3.0)]
    add_teams(dep, specs, answer_timeout_s=10.0)
    async with run_server(dep) as server, run_teams(dep, server, specs) as teams, \
            run_posts(dep) as posts:
        await posts["P001"].press()
        first = await teams["A"].wait_page(5)
        await teams["A"].answer(first, "accept")
        await until(lambda: server.dispatcher.committed.get("A") == first.incident, 5, "A assigned")
        await posts["P002"].press()
        second = await teams["B"].wait_page(5)
        assert second.incident != first.incident
        try:
            server.dispatcher.page_team(second.incident, "A", "op:alice", "A is closer")
        except DispatchError as exc:
            assert "busy" in str(exc)
        else:
            raise AssertionError("a team busy on another incident was paged")
        # Nothing changed: A keeps its incident, B's page stands, A got no second page.
        assert server.dispatcher.committed.get("A") == first.incident
        summary = server.dispatcher.incident_summary(second.incident)
        assert summary is not None
        assert [(p["team_id"], p["state"]) for p in summary["pages"]] == [("B", "waiting")]
        assert list(teams["A"].pages) == [first.id]
