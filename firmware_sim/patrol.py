"""Simulated patrol teams: a patrol car with a phone that speaks the team side of the protocol.

A :class:`SimTeam` connects as its own broker account (``team-{id}``, fixed client id, persistent
session, QoS 1 subscriptions, a retained ``off_duty`` Last Will), drives along a route at a given
speed reporting its position, and answers pages the way it is told: accept after a delay, decline
(always or some of the time), or never. After accepting it drives to the post, reports
``en_route`` and ``on_scene``, and resolves the incident after a while if told to.

The team's device config (written by ``alarmpost patrol team add`` in a deployment) is::

    [team]  id, name
    [mqtt]  host, port, password, keepalive_s, session_expiry_s (any key of mqttlink.MqttSettings;
            username and client_id default to ``team-{id}``)

The connection is a :class:`mqttlink.MqttLink`: it reconnects with a backoff that starts over
after a connection that lived, and resumes the team's persistent session.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiomqtt

from mqttlink import Backoff, MqttLink, MqttSettings
from protocol.messages import (
    Page,
    PageAnswer,
    PageAnswerKind,
    PageWithdrawn,
    Rejected,
    ServerStatus,
    TeamPosition,
    TeamState,
    TeamStatus,
    decode_for_team,
    encode,
)
from protocol.settings import ConfigError, load
from protocol.topics import TeamKind, team_topic, team_user, valid_team_id

log = logging.getLogger("alarmpost.sim.patrol")

AnswerMode = Literal["accept", "decline", "never"]


class _TeamLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every line with the team id."""

    def process(self, msg: object, kwargs: Any) -> tuple[object, Any]:
        return f"team {self.extra['team']}: {msg}", kwargs  # type: ignore[index]


PageListener = Callable[[Page, float], None]


@dataclass
class TeamSection:
    id: str = ""
    name: str = ""


@dataclass
class TeamDeviceConfig:
    team: TeamSection = field(default_factory=TeamSection)
    mqtt: MqttSettings = field(default_factory=MqttSettings)

    def validate(self) -> None:
        if not valid_team_id(self.team.id):
            raise ConfigError(f"[team] id {self.team.id!r} is invalid or missing: use 1-64 "
                              "letters, digits, '-' or '_'")
        # The team's broker account is team-{id}; the broker makes the client id the user name
        # anyway (use_username_as_clientid): ask for that, so the id in the broker's log is the
        # one the session is kept under.
        user = self.mqtt.username or team_user(self.team.id)
        self.mqtt = dataclasses.replace(self.mqtt, username=user,
                                        client_id=self.mqtt.client_id or user)


def load_team_config(path: Path | str) -> TeamDeviceConfig:
    config = load(TeamDeviceConfig, path, "ALARMPOST_TEAM")
    config.mqtt = config.mqtt.relative_to(path)  # TLS files beside the config
    return config


def _move(lat: float, lon: float, to_lat: float, to_lon: float, km: float) -> tuple[float, float, bool]:
    """Step ``km`` from (lat, lon) towards (to_lat, to_lon) (flat-earth; fine over a few km)."""
    ky = 111.2
    kx = 111.2 * math.cos(math.radians(lat))
    dy, dx = (to_lat - lat) * ky, (to_lon - lon) * kx
    dist = math.hypot(dx, dy)
    if dist <= km or dist == 0:
        return to_lat, to_lon, True
    f = km / dist
    return lat + dy * f / ky, lon + dx * f / kx, False


@dataclass
class TeamBehaviour:
    answer: AnswerMode = "accept"
    answer_delay_s: float = 0.0
    decline_ratio: float = 0.0  # with answer="accept": decline this share of pages
    resolve_after_s: float | None = None  # on scene this long, then resolve (None: never)
    classification: str = "false_alarm"
    time_scale: float = 1.0  # drive this many times faster than real time
    drive: bool = True  # False: no driving; resolve ``resolve_after_s`` after accepting


class SimTeam:
    """One simulated team device. ``start()`` runs it (reconnecting) until ``stop()``."""

    def __init__(self, config: TeamDeviceConfig, *, route: Sequence[tuple[float, float]] = (),
                 speed_kmh: float = 30.0, position_every_s: float = 5.0,
                 behaviour: TeamBehaviour | None = None, seed: int = 0,
                 initial_state: TeamState = "available") -> None:
        self.config = config
        self.team_id = config.team.id
        self.user = team_user(self.team_id)
        self.route = list(route) or [(26.082, 119.327)]
        self.lat, self.lon = self.route[0]
        self._leg = 1 % len(self.route)
        self.speed_kmh = speed_kmh
        self.position_every_s = position_every_s
        self.behaviour = behaviour or TeamBehaviour()
        self.rng = random.Random(seed)
        self.state: TeamState = initial_state
        self.pages: dict[str, Page] = {}  # by page id, first delivery
        self.deliveries: list[str] = []  # every page id delivered (duplicates included)
        self.withdrawn: dict[str, str] = {}  # page id -> reason
        self.rejected = 0
        self.page_listeners: list[PageListener] = []
        self.connected = asyncio.Event()
        self.current: Page | None = None  # the page the team is working on
        self.link: MqttLink | None = None  # made by start(), one per run
        self._changed = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._last_move = time.monotonic()

    @classmethod
    def from_file(cls, path: Path | str, **kwargs: object) -> SimTeam:
        return cls(load_team_config(path), **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ run
    def start(self) -> asyncio.Task[None]:
        """Run the device (connected, reconnecting) until :meth:`stop`."""
        settings = self.config.mqtt
        if not settings.username:  # a config made in code rather than loaded
            settings = dataclasses.replace(settings, username=self.user,
                                           client_id=settings.client_id or self.user)
        self.link = MqttLink(settings, self._session, will=self._will,
                             backoff=Backoff(initial_s=0.1, cap_s=2.0),
                             logger=_TeamLog(log, {"team": self.team_id}))
        self._task = asyncio.create_task(self.link.run(), name=f"team-{self.team_id}")
        return self._task

    async def stop(self, *, say_off_duty: bool = False) -> None:
        """Disconnect cleanly (no Last Will). ``say_off_duty`` publishes ``off_duty`` first."""
        if say_off_duty and self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._publish_status("off_duty", "stopped")
        for job in list(self._jobs):
            job.cancel()
        if self.link is not None:
            self.link.stop()
        if self._task is not None:
            await asyncio.gather(self._task, *self._jobs, return_exceptions=True)
            self._task = None
        self.connected.clear()

    def _will(self) -> aiomqtt.Will:
        return aiomqtt.Will(team_topic(self.team_id, "status"),
                            encode(TeamStatus(team=self.team_id, state="off_duty", ts=time.time(),
                                              reason="connection lost")), qos=1, retain=True)

    async def _session(self, client: aiomqtt.Client, session_present: bool) -> None:
        """One connection's life (the link's ``on_connected``)."""
        self._client = client
        try:
            await client.subscribe([(team_topic(self.team_id, "page"), 1),
                                    (team_topic(self.team_id, "withdrawn"), 1)])
            await self._publish_status(self.state)
            await self.report_position()
            self.connected.set()
            mover = asyncio.create_task(self._drive_loop())
            try:
                async for message in client.messages:
                    self._on_message(str(message.topic), message.payload)
            finally:
                mover.cancel()
                await asyncio.gather(mover, return_exceptions=True)
        finally:
            self.connected.clear()
            self._client = None

    # ------------------------------------------------------------------ publishing
    async def publish(self, kind: TeamKind, payload: bytes, qos: int = 1,
                      retain: bool = False) -> None:
        """Publish raw bytes on one of the team's topics (tests use it for bad input)."""
        if self._client is None:
            raise aiomqtt.MqttError("not connected")
        await self._client.publish(team_topic(self.team_id, kind), payload, qos=qos, retain=retain)

    async def _publish_status(self, state: TeamState, reason: str = "") -> None:
        self.state = state
        await self.publish("status", encode(TeamStatus(team=self.team_id, state=state,
                                                       ts=time.time(), reason=reason)),
                           retain=True)

    async def set_status(self, state: TeamState) -> None:
        await self._publish_status(state)

    async def report_position(self, lat: float | None = None, lon: float | None = None,
                              ts: float | None = None) -> None:
        if lat is not None and lon is not None:
            self.lat, self.lon = lat, lon
        await self.publish("position", encode(TeamPosition(
            team=self.team_id, lat=self.lat, lon=self.lon, ts=time.time() if ts is None else ts,
            speed_mps=self.speed_kmh / 3.6)), qos=0)

    async def answer(self, page: Page | str, answer: PageAnswerKind, *, classification: str = "",
                     detail: str = "") -> None:
        p = self.pages[page] if isinstance(page, str) else page
        await self.publish("answer", encode(PageAnswer(
            page=p.id, team=self.team_id, incident=p.incident, answer=answer, ts=time.time(),
            classification=classification, detail=detail)))

    # ------------------------------------------------------------------ receiving
    def _on_message(self, topic: str, payload: object) -> None:
        if not isinstance(payload, bytes | bytearray):
            payload = b""
        try:
            message = decode_for_team(topic, bytes(payload), self.team_id)
        except Rejected as exc:
            self.rejected += 1
            log.warning("team %s: rejected %s: %s", self.team_id, topic, exc)
            return
        received = time.time()
        if isinstance(message, Page):
            self.deliveries.append(message.id)
            if message.id in self.pages:
                return  # a resend: shown once
            self.pages[message.id] = message
            for listener in self.page_listeners:
                listener(message, received)
            self._spawn(self._on_page(message))
        elif isinstance(message, PageWithdrawn):
            self.withdrawn[message.page] = message.reason
            if self.current is not None and self.current.id == message.page:
                self.current = None
                self._spawn(self._publish_status("available"))
        elif isinstance(message, ServerStatus):
            pass
        self._changed.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _on_page(self, page: Page) -> None:
        b = self.behaviour
        if b.answer == "never":
            return
        if b.answer_delay_s:
            await asyncio.sleep(b.answer_delay_s)
        if page.id in self.withdrawn:
            return
        if b.answer == "decline" or (b.decline_ratio and self.rng.random() < b.decline_ratio):
            await self.answer(page, "decline", detail="simulated decline")
            return
        self.current = page
        await self.answer(page, "accept")
        if not b.drive:
            if b.resolve_after_s is not None:
                self._spawn(self._resolve_later(page))
            return
        await self._publish_status("en_route")
        await self.answer(page, "en_route")

    async def _drive_loop(self) -> None:
        while True:
            await asyncio.sleep(self.position_every_s)
            now = time.monotonic()
            km = self.speed_kmh * (now - self._last_move) / 3600 * self.behaviour.time_scale
            self._last_move = now
            page = self.current
            if page is not None and page.lat is not None and page.lon is not None:
                if self.state == "en_route":
                    self.lat, self.lon, arrived = _move(self.lat, self.lon, page.lat, page.lon, km)
                    if arrived:
                        await self._publish_status("on_scene")
                        await self.answer(page, "on_scene")
                        if self.behaviour.resolve_after_s is not None:
                            self._spawn(self._resolve_later(page))
            elif self.state == "available" and len(self.route) > 1:
                to_lat, to_lon = self.route[self._leg]
                self.lat, self.lon, arrived = _move(self.lat, self.lon, to_lat, to_lon, km)
                if arrived:
                    self._leg = (self._leg + 1) % len(self.route)
            await self.report_position()

    async def _resolve_later(self, page: Page) -> None:
        await asyncio.sleep(self.behaviour.resolve_after_s or 0)
        if self.current is not None and self.current.id == page.id:
            await self.answer(page, "resolved", classification=self.behaviour.classification,
                              detail="simulated: all clear")
            self.current = None
            await self._publish_status("available")

    # ------------------------------------------------------------------ tests
    async def wait_for(self, predicate: Callable[[SimTeam], bool], within: float = 10.0,
                       what: str = "condition") -> None:
        """Wait until ``predicate(self)`` holds, woken by every message received."""
        async def wait() -> None:
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), within)
        except TimeoutError:
            raise AssertionError(f"team {self.team_id}: timed out after {within} s waiting for "
                                 f"{what}; pages {list(self.pages)}, withdrawn {self.withdrawn}"
                                 ) from None

    async def wait_page(self, within: float = 10.0, count: int = 1) -> Page:
        await self.wait_for(lambda t: len(t.pages) >= count, within, f"{count} page(s)")
        return list(self.pages.values())[count - 1]


def district_route(rng: random.Random, centre: tuple[float, float], radius_km: float = 4.0,
                   points: int = 4) -> list[tuple[float, float]]:
    """A loop of ``points`` random waypoints within ``radius_km`` of ``centre``."""
    out = []
    for _ in range(points):
        r = radius_km * math.sqrt(rng.random())
        a = rng.random() * 2 * math.pi
        out.append((centre[0] + r / 111.2 * math.cos(a),
                    centre[1] + r / (111.2 * math.cos(math.radians(centre[0]))) * math.sin(a)))
    return out


def teams_from_dir(directory: Path, *, seed: int = 1, centre: tuple[float, float] = (26.082, 119.327),
                   **kwargs: object) -> list[SimTeam]:
    """A :class:`SimTeam` for every ``*.toml`` in a deployment's ``teams/`` directory."""
    rng = random.Random(seed)
    return [SimTeam.from_file(f, route=district_route(rng, centre), seed=rng.randint(0, 2**31),
                              **kwargs)
            for f in sorted(directory.glob("*.toml"))]
