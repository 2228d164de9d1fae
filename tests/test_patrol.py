"""The patrol team registry: CLI, API, broker accounts and ACL, live status."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import aiohttp
import aiomqtt
import pytest

from firmware_sim.patrol import SimTeam, load_team_config
from protocol.messages import TeamPosition, encode
from protocol.topics import team_topic
from provisioning import deployment as d
from server.app import CentralServer
from server.patrol import TeamError, make_team
from tests.helpers import ALARMPOST, MakeDeployment, api, broker_of, run_posts, run_server, until
from tests.patrol_helpers import TeamSpec, add_teams, run_teams, team_start


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ALARMPOST, *args], capture_output=True, text=True, timeout=60)


def test_team_definitions_are_validated() -> None:
    with pytest.raises(TeamError, match="invalid team id"):
        make_team("a/b")
    with pytest.raises(TeamError, match="shift"):
        make_team("T1", shift="7-19")
    with pytest.raises(TeamError, match="out of range"):
        make_team("T1", zone_polygon=[[200, 1], [0, 0], [1, 1]])
    with pytest.raises(TeamError, match="at least 3"):
        make_team("T1", zone_polygon=[[0, 0], [1, 1]])
    team = make_team("T1", "North car", ["+86 1"], zone_posts=["P001"], shift="22:00-06:00")
    assert team.holds("P001", None, None) and not team.holds("P002", None, None)


async def test_cli_manages_teams_and_a_running_server_picks_them_up(
    make_deployment: MakeDeployment,
) -> None:
    dep = make_deployment(2)
    config = str(dep.server_config)
    async with run_server(dep) as server:
        done = cli("patrol", "team", "add", "--config", config, "--id", "T1", "--name",
                   "North car", "--contact", "+86 591 1", "--contact", "+86 591 2",
                   "--zone-posts", "P001,P002", "--shift", "00:00-00:00")
        assert done.returncode == 0, done.stderr
        assert "device config" in done.stdout and dep.team_config("T1").exists()
        assert (dep.team_config("T1").stat().st_mode & 0o777) == 0o600
        again = cli("patrol", "team", "add", "--config", config, "--id", "T1")
        assert again.returncode == 2 and "already exists" in again.stderr
        bad = cli("patrol", "team", "add", "--config", config, "--id", "T2",
                  "--zone-polygon", "1,2;3")
        assert bad.returncode == 2 and "zone polygon" in bad.stderr
        listed = json.loads(cli("patrol", "team", "list", "--config", config, "--json").stdout)
        assert [(t["id"], t["contacts"], t["zone"]) for t in listed] == [
            ("T1", ["+86 591 1", "+86 591 2"], {"posts": ["P001", "P002"]})]
        await until(lambda: "T1" in server.dispatcher.teams, 5, "server sees the new team")
        view = await api(dep, "/api/teams/T1")
        assert view["name"] == "North car" and view["state"] == "unknown"
        assert (await api(dep, "/api/teams/T1", token="wrong"))["error"].startswith("missing or")
        assert (await api(dep, "/api/teams/NOPE"))["error"] == "no such team"

        # The device, with the config the CLI wrote, reports in and is seen as available.
        broker_of(dep).reload()
        team = SimTeam(load_team_config(dep.team_config("T1")),
                       route=[team_start(dep, TeamSpec("T1", 1.0))])
        team.start()
        try:
            await until(lambda: server.dispatcher.live["T1"].status == "available", 10,
                        "device status")
            teams = await api(dep, "/api/teams")
            assert teams[0]["state"] == "available" and teams[0]["position"]["known"]
        finally:
            await team.stop()

        removed = cli("patrol", "team", "remove", "--config", config, "--id", "T1")
        assert removed.returncode == 0 and "revoked" in removed.stdout
        assert not dep.team_config("T1").exists()
        await until(lambda: "T1" not in server.dispatcher.teams, 5, "server drops the team")
        assert cli("patrol", "team", "remove", "--config", config, "--id", "T1").returncode == 1
    # A post may not take a name that is a team's broker account.
    clash = cli("provision", "post", str(dep.directory), "--id", "team-T1", "--lat", "26.1",
                "--lon", "119.3")
    assert clash.returncode == 2 and "may not start with 'team-'" in clash.stderr


async def test_acl_gives_a_team_only_its_own_topics(make_deployment: MakeDeployment) -> None:
    dep = make_deployment(1)
    specs = [TeamSpec("A", 1.0), TeamSpec("B", 5.0)]
    add_teams(dep, specs, answer_timeout_s=10.0)
    password = load_team_config(dep.team_config("B")).mqtt.password
    # Only A's device runs: the snoop holds B's credential, and the broker lets one connection
    # per credential live (B's device would take the session back from the snoop).
    async with run_server(dep) as server, run_teams(dep, server, specs[:1]) as teams, \
            aiomqtt.Client("127.0.0.1", dep.broker_port, username="team-B",
                           password=password, identifier="snoop") as snoop:
        await snoop.subscribe(team_topic("A", "page"), qos=1)
        await snoop.subscribe("alarmpost/v1/#", qos=1)
        # B pretends to be A: the broker refuses, the server never sees it.
        await snoop.publish(team_topic("A", "position"), encode(TeamPosition(
            team="A", lat=0.0, lon=0.0, ts=time.time())), qos=1)
        async with run_posts(dep, "P001") as posts:
            await posts["P001"].press()
            page = await teams["A"].wait_page(5)
        got: list[str] = []

        async def read() -> None:
            async for message in snoop.messages:
                got.append(str(message.topic))

        reader = asyncio.create_task(read())
        await teams["A"].answer(page, "accept")
        await until(lambda: server.dispatcher.jobs[page.incident].team_id == "A", 5, "accepted")
        assert not reader.done(), reader  # the snoop was still connected and reading
        reader.cancel()
        assert server.dispatcher.live["A"].lat != 0.0
        assert not [t for t in got if "/team/team-A/" in t or "/post/" in t], got


def test_team_examples_in_the_protocol_doc_round_trip() -> None:
    """Every team example in docs/protocol.md decodes with its direction's codec and encodes
    back to the very same bytes."""
    import re
    from pathlib import Path

    from protocol.messages import decode_for_team, decode_from_team
    from protocol.topics import TEAM_SERVER_KINDS, parse_team_topic

    text = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    topic = None
    checked = 0
    for match in re.finditer(r"Team topic `([^`]+)`|```jsonc\n(.*?)\n```", text, re.DOTALL):
        if match.group(1):
            topic = match.group(1)
            continue
        assert topic is not None
        payload = match.group(2).encode()
        where = parse_team_topic(topic)
        if where.kind in TEAM_SERVER_KINDS:
            again = encode(decode_for_team(topic, payload, where.team_id))
        else:
            again = encode(decode_from_team(topic, payload)[1])
        assert again == payload, topic
        checked += 1
    assert checked == 6


def test_team_codecs_refuse_by_reason() -> None:
    from protocol.messages import Page, Rejected, decode_for_team, decode_from_team
    from protocol.ulid import new_ulid

    now = time.time()
    position = encode(TeamPosition(team="T1", lat=26.0, lon=119.3, ts=now))
    assert decode_from_team(team_topic("T1", "position"), position)[0] == "T1"
    page = encode(Page(id=new_ulid(), team="T1", incident=new_ulid(), post="P001", ts=now,
                       deadline=now + 30))
    cases = [
        (lambda: decode_from_team("alarmpost/v1/team/T1/position", position), "bad_topic"),
        (lambda: decode_from_team("alarmpost/v1/team/team-a+b/position", position), "bad_topic"),
        (lambda: decode_from_team(team_topic("T1", "page"), page), "wrong_direction"),
        (lambda: decode_from_team(team_topic("T2", "position"), position), "team_mismatch"),
        (lambda: decode_from_team(team_topic("T1", "position"),
                                  position.replace(b'"lat":26.0', b'"lat":200')), "invalid"),
        (lambda: decode_from_team(team_topic("T1", "position"),
                                  position.replace(b'"lat":26.0', b'"lat":NaN')), "malformed"),
        (lambda: decode_from_team(team_topic("T1", "position"), b"x" * 5000), "oversized"),
        (lambda: decode_for_team(team_topic("T2", "page"), page, "T1"), "wrong_team"),
        (lambda: decode_for_team(team_topic("T1", "answer"), page, "T1"), "wrong_direction"),
    ]
    for call, reason in cases:
        with pytest.raises(Rejected) as info:
            call()
        assert info.value.reason == reason
    assert decode_for_team(team_topic("T1", "page"), page, "T1") == msgspec_decode(page)


def msgspec_decode(payload: bytes) -> object:
    import msgspec

    from protocol.messages import Page

    return msgspec.json.decode(payload, type=Page)


async def test_teams_are_managed_through_the_api(deployment: d.Deployment, server: CentralServer
                                                 ) -> None:
    base = f"http://127.0.0.1:{deployment.http_port}/api/teams"
    auth = {"Authorization": f"Bearer {deployment.api_token}"}
    team = {"id": "T9", "name": "Night car", "contacts": ["+86 591 0000"],
            "zone_posts": ["P001", "P002"], "shift": "19:00-07:00"}
    async with aiohttp.ClientSession() as http:
        async with http.post(base, json=team) as resp:
            assert resp.status == 401  # the token is needed here too
        async with http.post(base, json=team, headers=auth) as resp:
            assert resp.status == 201, await resp.text()
            assert (await resp.json())["id"] == "T9"
        assert "T9" in server.dispatcher.teams  # the running dispatcher knows it at once
        async with http.post(base, json=team, headers=auth) as resp:
            assert resp.status == 409
        for bad in [{"id": "a/b"}, {"id": "T8", "zone_polygon": [[200, 0], [0, 0], [1, 1]]},
                    {"id": "T8", "contacts": "not a list"}, {"id": "T8", "shift": "25:00-26:00"},
                    {"id": "T8", "colour": "red"}, ["T8"]]:
            async with http.post(base, json=bad, headers=auth) as resp:
                assert resp.status == 400, bad
                assert "error" in await resp.json()
        assert set(server.dispatcher.teams) == {"T9"}
        # A team on an incident cannot be removed from under it.
        server.dispatcher.committed["T9"] = "INCIDENT"
        async with http.delete(f"{base}/T9", headers=auth) as resp:
            assert resp.status == 409
        del server.dispatcher.committed["T9"]
        async with http.delete(f"{base}/T9", headers=auth) as resp:
            assert resp.status == 200
        async with http.delete(f"{base}/T9", headers=auth) as resp:
            assert resp.status == 404
    assert server.dispatcher.teams == {}
