"""``alarmpost patrol team add/list/remove --config server.toml``: the patrol team registry.

Teams are stored in the server's database; a running server notices the change within a second.
When ``server.toml`` sits in a deployment directory (``alarmpost provision init``), ``add`` also
creates the team's broker account ``team-{id}`` and its device config ``teams/{id}.toml``, and
``remove`` revokes them (send SIGHUP to the broker so it re-reads its password file).
``password`` (or ``add --app-password-stdin``) sets the team's login for the patrol web app at
``/patrol`` (:mod:`server.web.patrol`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from protocol.settings import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("patrol", help="patrol teams: add, list, remove, app password",
                       description="Manage the patrol teams the dispatcher pages.")
    psub = p.add_subparsers(dest="patrol_what", required=True, metavar="WHAT")
    t = psub.add_parser("team", help="the team registry")
    tsub = t.add_subparsers(dest="team_action", required=True, metavar="ACTION")
    q = tsub.add_parser("add", help="register a team (and its broker account in a deployment)")
    q.add_argument("--config", required=True, type=Path, help="server TOML file")
    q.add_argument("--id", required=True, help="team id (its MQTT user is team-ID)")
    q.add_argument("--name", default="")
    q.add_argument("--contact", action="append", default=[],
                   help="a member's phone or radio call sign (repeat for each member)")
    q.add_argument("--zone-posts", default="", metavar="P001,P002",
                   help="the posts this team is responsible for")
    q.add_argument("--zone-polygon", default="", metavar="LAT,LON;LAT,LON;...",
                   help="the area this team is responsible for (or a JSON [[lat,lon],...])")
    q.add_argument("--shift", default="", metavar="HH:MM-HH:MM",
                   help="on duty between these local times (default: always)")
    q.add_argument("--no-credentials", action="store_true",
                   help="do not create a broker account even in a deployment directory")
    q.add_argument("--app-password-stdin", action="store_true",
                   help="also set the team's password for the patrol web app (/patrol), read "
                        "from the first line of stdin")
    q = tsub.add_parser("password", help="set or change a team's patrol web app password",
                        description="Set the password a team logs in with at /patrol (its "
                                    "phones are logged out). Asks twice unless --password-stdin.")
    q.add_argument("--config", required=True, type=Path, help="server TOML file")
    q.add_argument("--id", required=True, help="team id")
    q.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin")
    q = tsub.add_parser("list", help="list the teams")
    q.add_argument("--config", required=True, type=Path, help="server TOML file")
    q.add_argument("--json", action="store_true", help="one JSON array")
    q = tsub.add_parser("remove", help="remove a team (and revoke its broker account)")
    q.add_argument("--config", required=True, type=Path, help="server TOML file")
    q.add_argument("--id", required=True)
    p.set_defaults(func=run)


def _app_password(team_id: str, from_stdin: bool) -> str:
    import getpass

    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"patrol app password for team {team_id}: ")
    if getpass.getpass("again: ") != first:
        raise ConfigError("the two passwords differ; nothing was changed")
    return first


def _set_app_password(teams: Any, config: Any, team_id: str, password: str) -> None:
    from server import patrol
    from server.web.auth import UserError
    from server.web.patrol import set_app_password

    try:
        set_app_password(teams, team_id, password)
    except (patrol.TeamError, UserError) as exc:
        raise ConfigError(str(exc)) from None
    print(f"team {team_id} can log in to the patrol app: "
          f"http://{config.http.host}:{config.http.port}/patrol/")


def run(args: argparse.Namespace) -> int:
    from provisioning import deployment as d
    from server import patrol
    from server.config import load_server_config
    from server.storage import open_storage

    config = load_server_config(args.config)
    storage = open_storage(config.database)
    teams = storage.teams
    deployment_dir = Path(args.config).resolve().parent
    in_deployment = (deployment_dir / "deployment.toml").exists()
    try:
        if args.team_action == "list":
            listed = [t.as_dict() for t in patrol.load_teams(teams).values()]
            if args.json:
                print(json.dumps(listed))
            else:
                for t in listed:
                    zone = ",".join(t["zone"].get("posts", [])) or (
                        f"polygon of {len(t['zone']['polygon'])} points" if t["zone"] else "-")
                    print(f"{t['id']:<12} {t['name']:<24} shift {t['shift'] or 'always':<12} "
                          f"zone {zone}  contacts {', '.join(t['contacts']) or '-'}")
            return 0
        if args.team_action == "password":
            _set_app_password(teams, config, args.id, _app_password(args.id, args.password_stdin))
            return 0
        if args.team_action == "add":
            app_password = _app_password(args.id, True) if args.app_password_stdin else None
            if app_password is not None:
                from server.web.auth import MAX_PASSWORD, MIN_PASSWORD

                if not MIN_PASSWORD <= len(app_password) <= MAX_PASSWORD:
                    raise ConfigError(f"the app password must have {MIN_PASSWORD} to "
                                      f"{MAX_PASSWORD} characters; no team was added")
            try:
                team = patrol.make_team(
                    args.id, args.name, args.contact,
                    zone_polygon=patrol.parse_polygon(args.zone_polygon) if args.zone_polygon
                    else None,
                    zone_posts=[p.strip() for p in args.zone_posts.split(",") if p.strip()],
                    shift=args.shift)
                patrol.add_team(teams, team)
            except patrol.TeamError as exc:
                raise ConfigError(str(exc)) from None
            print(f"team {team.id} added ({team.name})")
            if app_password is not None:
                _set_app_password(teams, config, team.id, app_password)
            if in_deployment and not args.no_credentials:
                dep = d.open_deployment(deployment_dir)
                path = d.add_team_account(dep, team.id, team.name)
                print(f"broker account team-{team.id} created; device config: {path} "
                      "(holds the password)")
                print("send SIGHUP to the broker so it accepts the new account")
            return 0
        if not patrol.remove_team(teams, args.id):
            print(f"alarmpost: no team {args.id!r}", file=sys.stderr)
            return 1
        print(f"team {args.id} removed")
        if in_deployment:
            dep = d.open_deployment(deployment_dir)
            if d.remove_team_account(dep, args.id):
                print(f"broker account team-{args.id} revoked; send SIGHUP to the broker")
        return 0
    finally:
        storage.close()


# ---------------------------------------------------------------------------- the demo's teams
DEMO_TEAMS = (
    # id, name, answer, delay (s), decline ratio
    ("T1", "Jin'an patrol car 1", "accept", 3.0, 0.0),
    ("T2", "Jin'an patrol car 2", "accept", 5.0, 0.3),
    ("T3", "Jin'an patrol car 3", "accept", 2.0, 0.0),
    ("T4", "Jin'an patrol car 4", "never", 0.0, 0.0),
    ("T5", "Jin'an patrol car 5", "accept", 4.0, 0.5),
)


def provision_demo_teams(dep: Any) -> None:
    """Register the demo's five teams (with broker accounts) before broker and server start."""
    from provisioning import deployment as d
    from server import patrol
    from server.config import load_server_config
    from server.storage import open_storage

    storage = open_storage(load_server_config(dep.server_config).database)
    posts = [p.id for p in dep.posts]
    try:
        for i, (team_id, name, *_) in enumerate(DEMO_TEAMS):
            zone = posts[i::len(DEMO_TEAMS)]
            patrol.add_team(storage.teams, patrol.make_team(
                team_id, name, [f"+86 591 8800 00{i + 1:02d}"], zone_posts=zone))
            d.add_team_account(dep, team_id, name)
    finally:
        storage.close()


async def start_demo_teams(dep: Any) -> list[Any]:
    """Five simulated patrol cars driving around the district (firmware_sim/patrol.py): they
    answer pages after a few seconds (T2 and T5 decline some, T4 never answers), drive to the
    post ten times faster than real time, and resolve 10 s after arriving."""
    import asyncio
    import random

    from firmware_sim.patrol import SimTeam, TeamBehaviour, district_route
    from provisioning.deployment import DISTRICT_CENTRE

    rng = random.Random(3)
    teams = []
    for team_id, _name, answer, delay, decline in DEMO_TEAMS:
        team = SimTeam.from_file(
            dep.team_config(team_id), route=district_route(rng, DISTRICT_CENTRE),
            speed_kmh=40.0, position_every_s=2.0, seed=rng.randrange(2**31),
            behaviour=TeamBehaviour(answer=answer, answer_delay_s=delay,  # type: ignore[arg-type]
                                    decline_ratio=decline, resolve_after_s=10.0,
                                    classification="false_alarm", time_scale=10.0))
        team.start()
        teams.append(team)
    await asyncio.wait_for(asyncio.gather(*(t.connected.wait() for t in teams)), 15)
    return teams
