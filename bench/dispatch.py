"""``alarmpost bench dispatch``: paging patrol teams with a city-sized fleet.

What runs (all on 127.0.0.1, in a temp dir removed at the end):

* a private Mosquitto and a fresh deployment of ``posts`` posts and ``teams`` patrol teams, each
  team with its own broker account (``team-{id}``);
* the central server as a real child process (``alarmpost server``); it and the broker are started
  and stopped by the process harness (:mod:`alarmpost_cli.harness`);
* in this process: ``teams`` simulated team devices (:class:`firmware_sim.patrol.SimTeam`: own
  MQTT connection, persistent session, QoS 1) driving routes across the district at 30 km/h and
  reporting their position every ``position_every`` s; and one MQTT connection per post, with the
  post's own credentials, publishing the :class:`~protocol.messages.Event` an edge agent
  publishes on a press (the edge's own share of the path is measured by ``bench alarm-path``).

Phases:

1. selection: :meth:`server.dispatch.TeamIndex.choose` over ``select_teams`` (10,000) teams with
   moving positions, for ``select_runs`` random posts (pure CPU, no I/O);
2. paced: ``presses`` presses at ``rate``/s on distinct posts; each team accepts at once and
   resolves ``resolve_after`` s later, so it is free again. Press -> page is the page's arrival at
   the chosen team's device minus the event's ``ts`` (one clock: one machine);
3. burst: ``burst`` presses on other posts within ``burst_window`` s while every team holds its
   pages unanswered: every incident must be paged, no team paged for two incidents.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import shutil
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alarmpost_cli.harness import HarnessError, Mosquitto, ServerProcess
from bench import summary_ms

if TYPE_CHECKING:
    from server.storage import DatabaseSettings

log = logging.getLogger("alarmpost.bench.dispatch")

TARGET_PRESS_TO_PAGE_P99_MS = 50.0
TARGET_SELECT_P99_MS = 1.0


@dataclass
class Options:
    posts: int = 1000
    teams: int = 500
    presses: int = 200  # paced presses
    rate: float = 10.0  # paced presses per second
    burst: int = 200
    burst_window: float = 1.0
    select_teams: int = 10_000
    select_runs: int = 5000
    position_every: float = 5.0  # each team reports its position this often (s)
    resolve_after: float = 0.5  # paced phase: a team resolves this long after accepting (s)
    timeout: float = 300.0
    seed: int = 1
    keep: bool = False

    @classmethod
    def parse(cls, raw: dict[str, str]) -> Options:
        opts = cls()
        known = {f.name: f for f in fields(cls)}
        for key, value in raw.items():
            if key not in known:
                raise ValueError(f"unknown option {key!r}; known: {', '.join(sorted(known))}")
            current = getattr(opts, key)
            try:
                if isinstance(current, bool):
                    parsed: Any = value.lower() in {"1", "true", "yes", "on"}
                elif isinstance(current, int):
                    parsed = int(value)
                else:
                    parsed = float(value)
            except ValueError:
                raise ValueError(f"option {key}={value!r} is not a number") from None
            setattr(opts, key, parsed)
        if opts.posts < opts.presses + opts.burst:
            raise ValueError("posts must be at least presses + burst (each press opens an incident)")
        return opts


class BenchError(RuntimeError):
    pass


def _progress(text: str) -> None:
    print(f"[bench dispatch] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- selection
def bench_select(n_teams: int, runs: int, seed: int) -> dict[str, Any]:
    import numpy as np

    from provisioning.deployment import district_posts
    from server.dispatch import TeamIndex
    from server.patrol import Team

    rng = random.Random(seed)
    posts = district_posts(1000, seed=seed)
    teams = [Team(id=f"T{i:05d}", zone_posts=frozenset({posts[i % len(posts)].id}))
             for i in range(n_teams)]
    index = TeamIndex(teams)
    now = time.time()
    for i, t in enumerate(teams):
        p = posts[rng.randrange(len(posts))]
        index.set_position(t.id, p.lat + rng.uniform(-0.02, 0.02), p.lon + rng.uniform(-0.02, 0.02),
                           now - rng.uniform(0, 60))
        index.device_ok[i] = rng.random() < 0.9
        index.free[i] = rng.random() < 0.7
    for p in posts:  # zone masks are cached per post (built once, when a post first alarms)
        index.zone_mask(p.id, p.lat, p.lon)
    times = []
    for _ in range(runs):
        p = posts[rng.randrange(len(posts))]
        # Teams keep moving between selections: a few position updates in between.
        for _ in range(5):
            j = rng.randrange(n_teams)
            index.set_position(teams[j].id, p.lat + rng.uniform(-0.03, 0.03),
                               p.lon + rng.uniform(-0.03, 0.03), now)
        t0 = time.perf_counter()
        choice = index.choose(p.id, p.lat, p.lon, now=now, max_age_s=120, zone_margin_km=1.0,
                              exclude=())
        times.append(time.perf_counter() - t0)
        assert choice is not None
    assert isinstance(index.lat, np.ndarray)
    return summary_ms(times)


# ---------------------------------------------------------------------------- end to end
async def _http_json(port: int, path: str, token: str) -> Any:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"},
        timeout=aiohttp.ClientTimeout(total=5),
    ) as resp:
        return await resp.json() if resp.content_type == "application/json" else await resp.text()


async def _wait(predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(0.05)


class PostClients:
    """One MQTT connection per post, with the post's own credentials."""

    def __init__(self, dep: Any) -> None:
        self.dep = dep
        self.clients: dict[str, Any] = {}
        self.seq: dict[str, int] = {}
        self._stack = contextlib.AsyncExitStack()

    async def connect(self, ids: list[str]) -> None:
        import aiomqtt

        from protocol.transport import SOCKET_OPTIONS

        async def one(post_id: str) -> None:
            cfg = tomllib.loads(self.dep.post_config(post_id).read_text())
            client = aiomqtt.Client("127.0.0.1", self.dep.broker_port, username=post_id,
                                    password=cfg["mqtt"]["password"],
                                    identifier=post_id,  # the broker keys it on the user name
                                    protocol=aiomqtt.ProtocolVersion.V5,
                                    socket_options=SOCKET_OPTIONS, timeout=30)
            self.clients[post_id] = await self._stack.enter_async_context(client)

        for i in range(0, len(ids), 100):
            await asyncio.gather(*(one(p) for p in ids[i:i + 100]))

    async def press(self, post_id: str) -> float:
        from protocol.messages import Event, encode
        from protocol.topics import post_topic
        from protocol.ulid import new_ulid

        seq = self.seq[post_id] = self.seq.get(post_id, 0) + 1
        now = time.time()
        event = Event(id=new_ulid(now), post=post_id, seq=seq, ts=now)
        await self.clients[post_id].publish(post_topic(post_id, "event"), encode(event), qos=1)
        return now

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._stack.aclose()


async def bench_end_to_end(opts: Options, tmp: Path) -> dict[str, Any]:
    from firmware_sim.patrol import SimTeam, TeamBehaviour, district_route, load_team_config
    from protocol.messages import Page
    from provisioning import deployment as d
    from server.config import load_server_config
    from server.patrol import add_team, make_team
    from server.storage import open_storage

    rng = random.Random(opts.seed)
    _progress(f"deployment: {opts.posts} posts, {opts.teams} teams")
    dep = d.create(tmp / "dep", d.district_posts(opts.posts, seed=opts.seed), heartbeat_s=60.0)
    with dep.server_config.open("a") as fh:
        fh.write("\n[dispatch]\nanswer_timeout_s = 30.0\nposition_max_age_s = 120.0\n")
    database = load_server_config(dep.server_config).database
    storage = open_storage(database)
    team_ids = [f"T{i:04d}" for i in range(1, opts.teams + 1)]
    try:
        with storage.db.transaction():
            for i, tid in enumerate(team_ids):
                add_team(storage.teams, make_team(tid, f"Car {i + 1}",
                                                  zone_posts=[dep.posts[i % len(dep.posts)].id]))
    finally:
        storage.close()
    for tid in team_ids:
        d.add_team_account(dep, tid)
    broker = Mosquitto.for_deployment(dep)
    server = ServerProcess.for_deployment(dep, tmp / "server.log", log_level="warning")
    teams: list[SimTeam] = []
    posts = PostClients(dep)
    try:
        try:
            await broker.start_async()
            server.start()
            await server.wait_ready(30.0)
        except HarnessError as exc:
            raise BenchError(str(exc)) from None
        received: dict[str, tuple[str, float]] = {}  # page id -> (incident, arrival)
        by_team: dict[str, set[str]] = {}

        def listener(team_id: str) -> Any:
            def on_page(page: Page, at: float) -> None:
                received[page.id] = (page.incident, at)
                by_team.setdefault(team_id, set()).add(page.incident)
            return on_page

        centre = d.DISTRICT_CENTRE
        for tid in team_ids:
            team = SimTeam(load_team_config(dep.team_config(tid)),
                           route=district_route(rng, centre), speed_kmh=30.0,
                           position_every_s=opts.position_every, seed=rng.randrange(2**31),
                           behaviour=TeamBehaviour(answer="accept", drive=False,
                                                   resolve_after_s=opts.resolve_after,
                                                   classification="test"))
            team.page_listeners.append(listener(tid))
            teams.append(team)
        _progress(f"connecting {len(teams)} team devices and {opts.posts} posts")
        for i in range(0, len(teams), 50):
            for team in teams[i:i + 50]:
                team.start()
            await asyncio.gather(*(t.connected.wait() for t in teams[i:i + 50]))

        async def all_available() -> bool:
            views = await _http_json(dep.http_port, "/api/teams", dep.api_token)
            return sum(1 for v in views if v["state"] == "available"
                       and v["position"]["known"]) == len(teams)

        await _wait(all_available, 60, "every team available on the server")
        post_ids = [p.id for p in dep.posts]
        await posts.connect(post_ids)
        order = rng.sample(post_ids, opts.presses + opts.burst)
        paced_ids, burst_ids = order[:opts.presses], order[opts.presses:]

        # -------------------------------------------------------------- paced
        _progress(f"paced: {opts.presses} presses at {opts.rate:g}/s")
        pressed: dict[str, float] = {}
        start = time.monotonic()
        for k, post_id in enumerate(paced_ids):
            delay = start + k / opts.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pressed[post_id] = await posts.press(post_id)
        await _wait(lambda: len(received) >= opts.presses, 30, "every paced press paged")
        paced_pages = dict(received)

        # -------------------------------------------------------------- burst
        async def teams_free() -> bool:
            views = await _http_json(dep.http_port, "/api/teams", dep.api_token)
            return all(v["state"] == "available" for v in views)

        await _wait(teams_free, 30, "every team free after the paced phase")
        for team in teams:
            team.behaviour.answer = "never"
        received.clear()
        by_team.clear()
        _progress(f"burst: {opts.burst} presses within {opts.burst_window:g} s")
        offsets = sorted(rng.uniform(0, opts.burst_window) for _ in burst_ids)
        t0 = time.monotonic()
        burst_start = time.time()

        async def press_at(offset: float, post_id: str) -> None:
            await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))
            pressed[post_id] = await posts.press(post_id)

        await asyncio.gather(*(press_at(o, p) for o, p in zip(offsets, burst_ids, strict=True)))
        with contextlib.suppress(BenchError):
            await _wait(lambda: len({i for i, _ in received.values()}) >= opts.burst, 20,
                        "every burst press paged")
        burst_last = max((at for _, at in received.values()), default=burst_start)
        burst_pages = dict(received)

        # -------------------------------------------------------------- analysis
        incident_press, incident_post, waiting = _read_outcome(database)
        first_page: dict[str, float] = {}
        for incident, at in paced_pages.values():
            first_page[incident] = min(at, first_page.get(incident, at))
        latencies = [at - incident_press[i] for i, at in first_page.items() if i in incident_press]
        burst_incidents = {i for i, p in incident_post.items() if p in set(burst_ids)}
        paged_burst = {i for i, _ in burst_pages.values()}
        double = {t for t, incs in by_team.items() if len(incs) > 1} | {r["team_id"] for r in waiting}
        metrics = await _http_json(dep.http_port, "/metrics", dep.api_token)
        rejected = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith("alarmpost_rejected_total{"))
        return {
            "press_to_page_ms": summary_ms(latencies),
            "burst_incidents": len(burst_incidents),
            "burst_paged": len(paged_burst & burst_incidents),
            "burst_unpaged": len(burst_incidents - paged_burst) + max(0, opts.burst - len(burst_incidents)),
            "burst_last_page_s": round(burst_last - burst_start, 3),
            "double_booked": len(double),
            "server_rejected": int(rejected),
        }
    finally:
        await posts.close()
        await asyncio.gather(*(t.stop() for t in teams), return_exceptions=True)
        await server.stop_async(15.0)
        await broker.stop_async()


def _read_outcome(
    database: DatabaseSettings,
) -> tuple[dict[str, float], dict[str, str], list[dict[str, Any]]]:
    """From the server's database (a separate read-only connection): each incident's first press,
    each incident's post, and the teams with pages waiting for more than one incident."""
    from server.storage import DispatchStore, IncidentStore, PostStore, open_database

    db = open_database(database, read_only=True)
    try:
        incidents = IncidentStore(db, PostStore(db))
        pages = DispatchStore(db)
        incident_press: dict[str, float] = {}
        for event in incidents.events(None, 2**31 - 1):
            pressed = float(event["pressed_at"])
            incident_press[event["incident_id"]] = min(
                pressed, incident_press.get(event["incident_id"], pressed))
        incident_post = {r["id"]: r["post_id"] for r in incidents.recent(None, 2**31 - 1)}
        waiting_for: dict[str, set[str]] = {}
        for incident_id in incident_post:
            for page in pages.pages(incident_id):
                if page["state"] == "waiting":
                    waiting_for.setdefault(page["team_id"], set()).add(incident_id)
    finally:
        db.close()
    waiting = [{"team_id": team, "n": len(incs)} for team, incs in sorted(waiting_for.items())
               if len(incs) > 1]
    return incident_press, incident_post, waiting


def render(r: dict[str, Any]) -> str:
    def f(s: dict[str, Any]) -> str:
        return f"p50 {s['p50']} ms  p95 {s.get('p95')} ms  p99 {s['p99']} ms  (n={s['n']})"

    return "\n".join([
        f"dispatch: {r['posts']} posts, {r['teams']} teams",
        f"  press -> page at the team's device: {f(r['press_to_page_ms'])}  "
        f"target p99 <= {TARGET_PRESS_TO_PAGE_P99_MS:g} ms",
        f"  selection among {r['select_teams']} teams: {f(r['select_10k_ms'])}  "
        f"target p99 <= {TARGET_SELECT_P99_MS:g} ms",
        f"  burst of {r['burst']} alarms in {r['burst_window']:g} s: {r['burst_paged']} paged, "
        f"{r['burst_unpaged']} unpaged, {r['double_booked']} teams double-booked, last page "
        f"{r['burst_last_page_s']} s after the first press",
        f"  targets met: {r['targets_met']}",
    ])


def main(as_json: bool, raw_options: dict[str, str]) -> int:
    try:
        opts = Options.parse(raw_options)
    except ValueError as exc:
        print(f"alarmpost bench dispatch: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("alarmpost").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="alarmpost-bench-dispatch-"))
    try:
        _progress(f"selection: {opts.select_runs} choices among {opts.select_teams} teams")
        select = bench_select(opts.select_teams, opts.select_runs, opts.seed)
        e2e = asyncio.run(asyncio.wait_for(bench_end_to_end(opts, tmp), opts.timeout))
    except (BenchError, TimeoutError, OSError) as exc:
        print(f"alarmpost bench dispatch: could not run: {exc}", file=sys.stderr)
        return 3
    finally:
        if opts.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    p99 = e2e["press_to_page_ms"]["p99"]
    result: dict[str, Any] = {
        "benchmark": "dispatch", "posts": opts.posts, "teams": opts.teams,
        "select_teams": opts.select_teams, "burst": opts.burst, "burst_window": opts.burst_window,
        "paced_presses": opts.presses, "rate": opts.rate,
        **e2e,
        "select_10k_ms": select,
    }
    result["targets_met"] = bool(
        p99 is not None and p99 <= TARGET_PRESS_TO_PAGE_P99_MS
        and select["p99"] is not None and select["p99"] <= TARGET_SELECT_P99_MS
        and e2e["burst_unpaged"] == 0 and e2e["double_booked"] == 0)
    print(render(result))
    if as_json:
        print(json.dumps(result))
    return 0 if result["targets_met"] else 1
