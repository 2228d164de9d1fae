"""Helpers for the dispatch and patrol tests: teams in a deployment, simulated team devices."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from firmware_sim.patrol import SimTeam, TeamBehaviour
from provisioning import deployment as d
from server.app import CentralServer
from server.patrol import add_team, make_team
from tests.helpers import broker_of, until
from tests.storage_helpers import server_storage

KM_LAT = 1 / 111.2  # one km north, in degrees


@dataclass
class TeamSpec:
    id: str
    km_north: float  # position relative to the deployment's first post
    km_east: float = 0.0
    zone_posts: list[str] = field(default_factory=list)
    answer: str = "never"  # accept | decline | never (the test answers by hand)
    answer_delay_s: float = 0.0


def add_teams(dep: d.Deployment, specs: list[TeamSpec], **dispatch: Any) -> None:
    """Register teams in the server's database, give them broker accounts (the broker reloads),
    and write ``dispatch`` options into the server's [dispatch] section."""
    if dispatch:
        with dep.server_config.open("a") as fh:
            fh.write("\n[dispatch]\n" + "".join(
                f"{k} = {str(v).lower() if isinstance(v, bool) else v!r}\n"
                for k, v in dispatch.items()))
    storage = server_storage(dep.server_config)
    try:
        for spec in specs:
            add_team(storage.teams, make_team(spec.id, f"Team {spec.id}", ["+86 591 0000"],
                                              zone_posts=spec.zone_posts))
            d.add_team_account(dep, spec.id, f"Team {spec.id}")
    finally:
        storage.close()
    broker_of(dep).reload()


def team_start(dep: d.Deployment, spec: TeamSpec) -> tuple[float, float]:
    post = dep.posts[0]
    lat = post.lat + spec.km_north * KM_LAT
    lon = post.lon + spec.km_east / (111.2 * 0.8987)
    return lat, lon


class run_teams:
    """``async with run_teams(dep, server, specs) as teams``: devices connected and seen by the
    server as available with a fresh position."""

    def __init__(self, dep: d.Deployment, server: CentralServer | None, specs: list[TeamSpec],
                 wait_available: bool = True) -> None:
        self.server = server
        self.wait_available = wait_available
        self.teams = {
            s.id: SimTeam.from_file(
                dep.team_config(s.id), route=[team_start(dep, s)], position_every_s=3600,
                behaviour=TeamBehaviour(answer=s.answer, answer_delay_s=s.answer_delay_s))  # type: ignore[arg-type]
            for s in specs
        }

    async def __aenter__(self) -> dict[str, SimTeam]:
        for team in self.teams.values():
            team.start()
        await asyncio.wait_for(
            asyncio.gather(*(t.connected.wait() for t in self.teams.values())), 15)
        if self.server is not None and self.wait_available:
            server = self.server
            await until(lambda: all(
                server.dispatcher.live[t].status == "available"
                and (server.dispatcher.live[t].position_at or 0) > time.time() - 60
                for t in self.teams), 10, "teams available on the server")
        return self.teams

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(t.stop() for t in self.teams.values()))
