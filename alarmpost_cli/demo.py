"""``alarmpost demo``: a whole alarm-post system on one machine, with a live status table.

What runs:

* a throw-away deployment (:func:`provisioning.deployment.create`): broker config with password and
  ACL files, a server config with a fresh API token, a post registry and one config per post;
* Mosquitto for that deployment, as its own process;
* ``alarmpost server`` as a child process (its log in ``server.log`` in the deployment);
  both started, waited for and stopped by the process harness (:mod:`alarmpost_cli.harness`);
* the simulated fleet in this process: one real :class:`edge.agent.EdgeAgent` per post on gpiozero
  mock pins (:mod:`firmware_sim.fleet`), pressed at random by :meth:`Fleet.random_presses`.

The table shows the server's view (from its HTTP API: ``/api/posts``, ``/api/incidents``,
``/api/events``, ``/metrics``) next to the fleet's own (presses accepted, ACKs received).

Stopping (Ctrl-C or SIGTERM): the fleet first (each agent publishes ``offline``), then the server
(SIGTERM, wait), then the broker. A second Ctrl-C kills everything and exits at once.

``--headless --duration S`` prints progress lines instead of the table, lets the last presses
drain, prints a summary and exits 0 only if every accepted press was committed by the server and
acknowledged to its post.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from alarmpost_cli.harness import Mosquitto, ServerError, ServerProcess, find_mosquitto
from protocol.settings import ConfigError
from provisioning import deployment as d

log = logging.getLogger("alarmpost.demo")

# Demo settings: livelier than a real deployment's defaults.
HEARTBEAT_S = 5.0  # a post is offline after 2.5 missed heartbeats: 12.5 s
AUTO_RESOLVE_S = 30.0  # incidents close by themselves (a real deployment leaves it to operators)
RESEND_MAX_S = 10.0  # resend backoff ceiling for unacknowledged events
MAX_POSTS = 1000

REFRESH_S = 1.0  # table refresh
PROGRESS_S = 5.0  # progress lines (headless or not a terminal)
SERVER_READY_S = 30.0
CONNECT_S = 30.0
PRESS_FINISH_S = 5.0  # longest simulated hold is 3 s
DRAIN_S = 10.0  # how long the last presses get to be committed and acknowledged
STOP_SERVER_S = 15.0

class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and where to look."""


# ---------------------------------------------------------------------------- state
@dataclass
class Snapshot:
    """The server's view, from its HTTP API. ``error`` is set when it did not answer."""

    error: str = ""
    posts: list[dict[str, Any]] = field(default_factory=list)
    open_incidents: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def metric(self, name: str) -> int:
        return int(self.metrics.get(f"alarmpost_{name}", 0))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → ``{name: value}``, summing the series of a name over its labels."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


@dataclass
class FleetRecord:
    """What the simulated posts saw: accepted presses and the ACKs that came back."""

    pressed: dict[str, float] = field(default_factory=dict)  # event id → press time (UNIX)
    acked: dict[str, float] = field(default_factory=dict)  # event id → ACK receipt time (UNIX)
    duplicate_acks: int = 0

    def on_press(self, event: Any) -> None:
        self.pressed[event.id] = event.ts

    def on_ack(self, ack: Any, received: float) -> None:
        if ack.event_id in self.acked:
            self.duplicate_acks += 1
        self.acked[ack.event_id] = received

    @property
    def awaiting(self) -> int:
        return sum(1 for event_id in self.pressed if event_id not in self.acked)


# ---------------------------------------------------------------------------- output helpers
_BOLD, _DIM, _RED, _GREEN, _YELLOW, _RESET = (
    "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[0m",
)


def _clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "--:--:--"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class _WarningCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


# ---------------------------------------------------------------------------- the demo
class Demo:
    def __init__(self, args: argparse.Namespace, directory: Path, keep: bool) -> None:
        self.args = args
        self.n_posts: int = args.posts
        self.press_every: float = args.press_every
        self.headless: bool = args.headless
        self.duration: float = args.duration
        self.directory = directory
        self.keep = keep
        self.tty = sys.stdout.isatty() and not self.headless
        # Where status lines go: stderr when headless, else stdout (the screen).
        self.out: TextIO = sys.stderr if self.headless else sys.stdout
        self.dep: d.Deployment | None = None
        self.broker: Mosquitto | None = None
        self.server: ServerProcess | None = None
        self.fleet: Any = None  # firmware_sim.fleet.Fleet, imported late
        self.teams: list[Any] = []  # firmware_sim.patrol.SimTeam: five patrol cars
        self.record = FleetRecord()
        self.http: aiohttp.ClientSession | None = None
        self.snapshot = Snapshot(error="not asked yet")
        self.started_at = time.monotonic()
        self.signals = 0
        self._stop: asyncio.Event | None = None
        self._presser: asyncio.Task[None] | None = None
        self._log_handlers: list[logging.Handler] = []  # ours, removed at the end
        self._removed_handlers: list[logging.Handler] = []  # the caller's, put back at the end
        self._warnings = _WarningCounter()
        self._cursor_hidden = False
        self.summary = ""  # printed once everything has stopped
        self.failed = False  # a failure worth keeping the temporary directory for

    # ------------------------------------------------------------------ paths and printing
    @property
    def server_log(self) -> Path:
        return self.directory / "server.log"

    @property
    def demo_log(self) -> Path:
        return self.directory / "demo.log"

    @property
    def api_url(self) -> str:
        assert self.dep is not None
        return f"http://127.0.0.1:{self.dep.http_port}"

    def say(self, text: str) -> None:
        """A status line for the person watching (never a secret)."""
        if self.headless:
            elapsed = time.monotonic() - self.started_at
            text = f"[demo {elapsed:6.1f} s] {text}"
        print(text, file=self.out, flush=True)

    def _setup_logging(self) -> None:
        """Library logs (agents, broker handling) go to demo.log; warnings also to stderr when
        headless. The table owns the screen otherwise."""
        root = logging.getLogger()
        level = getattr(logging, str(getattr(self.args, "log_level", "info")).upper(), logging.INFO)
        for handler in list(root.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                root.removeHandler(handler)
                self._removed_handlers.append(handler)
        file_handler = logging.FileHandler(self.demo_log)
        file_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
        self._log_handlers = [file_handler, self._warnings]
        if self.headless:
            stderr = logging.StreamHandler(sys.stderr)
            stderr.setLevel(logging.WARNING)
            stderr.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            self._log_handlers.append(stderr)
        for handler in self._log_handlers:
            root.addHandler(handler)
        root.setLevel(level)

    def _close_logging(self) -> None:
        """Close demo.log (before its directory goes) and give the caller its handlers back."""
        root = logging.getLogger()
        for handler in self._log_handlers:
            root.removeHandler(handler)
            if handler is not self._warnings:
                handler.close()
        self._log_handlers = []
        for handler in self._removed_handlers:
            root.addHandler(handler)
        self._removed_handlers = []

    # ------------------------------------------------------------------ synchronous part
    def run(self) -> int:
        self.dep = d.create(
            self.directory,
            d.district_posts(self.n_posts),
            heartbeat_s=HEARTBEAT_S,
            resend_max_s=RESEND_MAX_S,
            hardware_backend="mock",
            auto_resolve_s=AUTO_RESOLVE_S,
        )
        from server.web.users import create_demo_user

        self.console_login = create_demo_user(self.dep.server_config)
        from alarmpost_cli.patrol import provision_demo_teams

        provision_demo_teams(self.dep)  # five patrol teams with broker accounts
        self._setup_logging()
        self._intro()
        self.broker = Mosquitto.for_deployment(self.dep)
        self.broker.start()
        self.say(f"broker: mosquitto on 127.0.0.1:{self.dep.broker_port} "
                 f"(log {self.broker.log_path})")
        return asyncio.run(self._main())

    def _intro(self) -> None:
        assert self.dep is not None
        where = "kept" if self.keep else "temporary: removed when the demo stops"
        lines = [
            f"alarmpost demo: {self.n_posts} simulated posts, broker, server",
            f"  deployment  {self.directory} ({where})",
            f"  HTTP API    {self.api_url}/api/posts  (send 'Authorization: Bearer <api_token>'; "
            f"the token is in {self.dep.server_config})",
            f"  console     {self.api_url}/console/  (log in as {self.console_login[0]}, password "
            f"{self.console_login[1]}; the posts answer calls with their test pattern)",
            f"  logs        {self.server_log}, {self.demo_log}",
            f"  incidents close by themselves {AUTO_RESOLVE_S:.0f} s after their last press "
            "(a demo setting)",
        ]
        if self.headless:
            lines.append(
                f"  stop        after {self.duration:g} s" if self.duration else "  stop        Ctrl-C"
            )
        else:
            lines.append("  stop        Ctrl-C (twice: at once)")
        for line in lines:
            print(line, file=self.out, flush=True)

    # ------------------------------------------------------------------ signals
    def _on_signal(self) -> None:
        self.signals += 1
        if self.signals == 1:
            assert self._stop is not None
            self._stop.set()
            if not self.tty:
                self.say("stopping (Ctrl-C again to exit at once)")
        else:
            self._hard_exit()

    def _hard_exit(self) -> None:
        """Second Ctrl-C: kill the children, tidy up, exit now."""
        if self.server is not None:
            self.server.kill()
        if self.broker is not None:
            self.broker.kill()
        self._show_cursor()
        print("\nalarmpost demo: stopped at once (posts did not say goodbye)", file=sys.stderr,
              flush=True)
        if not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)
        os._exit(130)

    # ------------------------------------------------------------------ asyncio part
    async def _wait(self, aw: Awaitable[object]) -> bool:
        """Await ``aw`` unless a stop is asked first; True if it completed (its exception, if
        any, is raised)."""
        assert self._stop is not None
        task: asyncio.Future[object] = asyncio.ensure_future(aw)
        stopper: asyncio.Future[object] = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task in done:
            task.result()
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return False

    async def _sleep(self, seconds: float) -> bool:
        """Sleep; True if a stop was asked meanwhile."""
        assert self._stop is not None
        with contextlib.suppress(TimeoutError):  # (not wait_for: it can swallow a cancel)
            async with asyncio.timeout(max(seconds, 0.0)):
                await self._stop.wait()
        return self._stop.is_set()

    async def _main(self) -> int:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        assert self.dep is not None
        code = 1
        try:
            self._start_server()
            headers = {"Authorization": f"Bearer {self.dep.api_token}"}
            async with aiohttp.ClientSession(
                base_url=self.api_url, headers=headers, timeout=aiohttp.ClientTimeout(total=3)
            ) as http:
                self.http = http
                try:
                    if await self._startup():
                        code = await (self._run_headless() if self.headless else self._run_live())
                    else:
                        code = 0  # stopped during start-up
                except DemoError as exc:
                    self._show_cursor()
                    if self.tty:
                        sys.stdout.write("\n")
                    print(f"alarmpost demo: {exc}", file=sys.stderr, flush=True)
                    code = 1
                finally:
                    await self._stop_fleet()
                    self.http = None
        finally:
            self._show_cursor()
            await self._stop_server()
            await self._stop_broker()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        if self.summary:
            print(self.summary, flush=True)
        self.failed = code != 0
        return code

    def _start_server(self) -> None:
        assert self.dep is not None
        # In a session of its own: Ctrl-C reaches the demo only, and it stops things in order.
        self.server = ServerProcess.for_deployment(self.dep, self.server_log)
        self.server.start()
        self.say(f"server: started (pid {self.server.pid}), log {self.server_log}")

    def _check_children(self) -> None:
        if self.server is not None and self.server.returncode is not None:
            raise DemoError(
                f"the server exited with code {self.server.returncode}; "
                f"its log:\n{self._tail(self.server_log)}"
            )
        if self.broker is not None and not self.broker.running:
            raise DemoError(f"mosquitto exited; its log:\n{self._tail(self.broker.log_path)}")

    @staticmethod
    def _tail(path: Path, lines: int = 15) -> str:
        try:
            text = path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("  " + line for line in text[-lines:])

    async def _server_ready(self) -> bool:
        """True once the server answers /healthz; False if a stop was asked first."""
        assert self.server is not None
        try:
            return await self._wait(
                self.server.wait_ready(SERVER_READY_S, check=self._check_children))
        except ServerError as exc:
            raise DemoError(str(exc)) from None

    async def _startup(self) -> bool:
        """Server ready, fleet connected, presses started. False if stopped meanwhile."""
        if not await self._server_ready():
            return False
        self.say(f"server: ready, HTTP API on {self.api_url}")

        from firmware_sim.fleet import Fleet, SimPost

        assert self.dep is not None
        self.fleet = Fleet(SimPost.from_file(self.dep.post_config(p.id)) for p in self.dep.posts)
        for post in self.fleet.posts.values():
            post.agent.press_listeners.append(self.record.on_press)
            post.agent.ack_listeners.append(self.record.on_ack)
        self.fleet.start()
        self.say(f"fleet: {self.n_posts} simulated posts connecting")
        try:
            done = await self._wait(self.fleet.wait_connected(within_s=CONNECT_S))
        except TimeoutError:
            done = False
        if not done:
            if self._stop is not None and self._stop.is_set():
                return False
            missing = [p for p, post in self.fleet.posts.items() if not post.agent.connected.is_set()]
            raise DemoError(f"posts not connected within {CONNECT_S:.0f} s: {', '.join(missing)}; "
                            f"see {self.demo_log}")
        self.say(f"fleet: all {self.n_posts} posts connected")
        from alarmpost_cli.patrol import start_demo_teams

        self.teams = await start_demo_teams(self.dep)
        self.say(f"patrol: {len(self.teams)} simulated teams on the road (GET /api/teams); "
                 "each alarm pages the nearest free one")
        if self.press_every > 0:
            self._presser = asyncio.create_task(
                self.fleet.random_presses(self.press_every, random.Random()), name="presses"
            )
            self.say(f"fleet: a random post is pressed every ~{self.press_every:g} s "
                     "(clean presses, bouncy contacts, long holds and brushes too short to count)")
        else:
            self.say("fleet: no random presses (--press-every 0)")
        self.started_at = time.monotonic()
        return True

    # ------------------------------------------------------------------ server's view
    async def _fetch(self) -> Snapshot:
        assert self.http is not None
        http = self.http

        async def get_json(path: str) -> Any:
            async with http.get(path) as resp:
                resp.raise_for_status()
                return await resp.json()

        async def get_text(path: str) -> str:
            async with http.get(path) as resp:
                resp.raise_for_status()
                return await resp.text()

        try:
            posts, incidents, events, metrics = await asyncio.gather(
                get_json("/api/posts"),
                get_json("/api/incidents?state=open&limit=1000"),
                get_json("/api/events?limit=8"),
                get_text("/metrics"),
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return Snapshot(error=f"the server's API did not answer ({type(exc).__name__})")
        return Snapshot(posts=posts, open_incidents=incidents, events=events,
                        metrics=parse_metrics(metrics))

    async def _stop_pressing(self, finish: bool) -> None:
        """Stop new presses; let the ones under way finish (``finish``) or cancel them."""
        if self._presser is not None:
            self._presser.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._presser
            self._presser = None
        if self.fleet is not None:
            await self.fleet.stop_pressing(PRESS_FINISH_S if finish else 0.0)

    # ------------------------------------------------------------------ the live table
    async def _run_live(self) -> int:
        assert self._stop is not None
        last_progress = 0.0
        if self.tty:
            self._hide_cursor()
            sys.stdout.write("\x1b[2J\x1b[H")
        while True:
            self._check_children()
            self.snapshot = await self._fetch()
            if self.tty:
                self._draw()
            elif time.monotonic() - last_progress >= PROGRESS_S:
                last_progress = time.monotonic()
                self.say(self._progress_line())
            if self.duration and time.monotonic() - self.started_at >= self.duration:
                break
            if await self._sleep(REFRESH_S):
                break
        await self._stop_pressing(finish=False)
        self.snapshot = await self._fetch()
        if self.tty:
            self._draw()
            self._show_cursor()
            sys.stdout.write("\n")
        return self._print_summary(judge=False)

    def _progress_line(self) -> str:
        s = self.snapshot
        online = sum(1 for p in s.posts if p.get("state") == "online")
        rec = self.record
        if s.error:
            server = s.error
        else:
            server = (f"posts online {online}/{self.n_posts} · committed "
                      f"{s.metric('events_committed_total')} · incidents open "
                      f"{s.metric('incidents_open')}")
        return f"{server} · presses {len(rec.pressed)} · ACKs {len(rec.acked)}"

    def _draw(self) -> None:
        width = max(shutil.get_terminal_size((100, 30)).columns, 40)
        lines = self._table(width)
        out = ["\x1b[H"]
        for line in lines:
            out.append(line + "\x1b[K\n")
        out.append("\x1b[J")
        sys.stdout.write("".join(out))
        sys.stdout.flush()

    def _table(self, width: int) -> list[str]:
        assert self.dep is not None
        s, rec = self.snapshot, self.record
        fleet = self.fleet.posts if self.fleet is not None else {}

        def row(text: str, color: str = "") -> str:
            text = _fit(text, width)
            return f"{color}{text}{_RESET}" if color else text

        lines: list[str] = []
        title = (f"alarmpost demo · {self.n_posts} simulated posts · "
                 + (f"a press every ~{self.press_every:g} s" if self.press_every > 0
                    else "no random presses"))
        now = _clock(time.time())
        pad = max(width - len(title) - len(now), 1)
        lines.append(row(title + " " * pad + now, _BOLD))
        where = "kept" if self.keep else "temporary, removed at exit"
        lines.append(row(f"deployment   {self.directory} ({where})", _DIM))
        lines.append(row(f"HTTP API     {self.api_url}/api/posts · bearer token: api_token in "
                         f"{self.dep.server_config.name}", _DIM))
        lines.append(row(f"console      {self.api_url}/console/ · log in as {self.console_login[0]}, "
                         f"password {self.console_login[1]}", _BOLD))
        lines.append(row(f"incidents close by themselves {AUTO_RESOLVE_S:.0f} s after their last "
                         "press (demo setting)", _DIM))
        lines.append("")

        connected = sum(1 for p in fleet.values() if p.agent.connected.is_set())
        if s.error:
            lines.append(row(f"server       {s.error}; see {self.server_log.name}", _RED))
        else:
            online = sum(1 for p in s.posts if p.get("state") == "online")
            lines.append(row(f"posts online      {online}/{len(s.posts)} (server)   "
                             f"{connected}/{len(fleet)} connected (fleet)"))
            opened = s.metric("incidents_opened_total")
            lines.append(row(f"incidents open    {s.metric('incidents_open')}   "
                             f"(opened so far {opened})"))
            count = s.metrics.get("alarmpost_commit_seconds_count", 0.0)
            total = s.metrics.get("alarmpost_commit_seconds_sum", 0.0)
            mean = f"   mean receipt → commit {total / count * 1000:.1f} ms" if count else ""
            lines.append(row(f"events committed  {s.metric('events_committed_total')}{mean}"))
        lines.append(row(f"fleet             presses accepted {len(rec.pressed)} · "
                         f"ACKs received {len(rec.acked)} · awaiting ACK {rec.awaiting}"))
        lines.append("")

        lines.append(row("last events", _BOLD))
        school_w = min(max(width - 48, 20), 36)  # the rest of a row takes 48 columns
        header = f"  {'time':<9}{'post':<6}{'school':<{school_w}}{'incident':<20}acknowledged"
        lines.append(row(header, _DIM))
        schools = {p.get("id"): str(p.get("school", "")) for p in s.posts}
        open_states = {i.get("id"): str(i.get("state", "open")) for i in s.open_incidents}
        if not s.events:
            lines.append(row("  (none yet: waiting for a press)", _DIM))
        for ev in s.events[:8]:
            event_id = str(ev.get("id", ""))
            incident = str(ev.get("incident_id", ""))
            state = open_states.get(incident, "closed")  # e.g. "new" while nobody has acted
            prefix = (f"  {_clock(ev.get('pressed_at')):<9}{ev.get('post_id', ''):<6}"
                      f"{_fit(schools.get(ev.get('post_id'), ''), school_w - 2):<{school_w}}"
                      f"{incident[-6:]} {state[:12]:<13}")
            if event_id in rec.acked:
                pressed = rec.pressed.get(event_id, ev.get("pressed_at") or 0.0)
                tail, color = f"yes ({(rec.acked[event_id] - pressed) * 1000:.0f} ms)", _GREEN
            else:
                tail, color = "not yet", _YELLOW
            if len(prefix) + len(tail) <= width:
                lines.append(prefix + color + tail + _RESET)
            else:
                lines.append(_fit(prefix + tail, width))
        lines.append("")

        offline = [str(p.get("id")) for p in s.posts if p.get("state") == "offline"]
        unknown = [str(p.get("id")) for p in s.posts if p.get("state") == "unknown"]
        if s.error:
            lines.append(row("posts offline     (server not answering)", _RED))
        elif offline:
            lines.append(row(f"posts offline     {' '.join(offline)}", _RED))
        else:
            lines.append(row("posts offline     none"))
        if unknown and not s.error:
            lines.append(row(f"not heard from    {' '.join(unknown)}", _YELLOW))
        if self._warnings.count:
            lines.append(row(f"warnings logged   {self._warnings.count} (see {self.demo_log})",
                             _YELLOW))
        lines.append("")
        lines.append(row("Ctrl-C stops posts, server and broker cleanly (twice: at once)", _DIM))
        return lines

    def _hide_cursor(self) -> None:
        if self.tty:
            sys.stdout.write("\x1b[?25l")
            sys.stdout.flush()
            self._cursor_hidden = True

    def _show_cursor(self) -> None:
        if self._cursor_hidden:
            sys.stdout.write("\x1b[?25h")
            sys.stdout.flush()
            self._cursor_hidden = False

    # ------------------------------------------------------------------ headless
    async def _run_headless(self) -> int:
        assert self._stop is not None
        next_progress = time.monotonic() + PROGRESS_S
        while True:
            self._check_children()
            if self.duration and time.monotonic() - self.started_at >= self.duration:
                break
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_S
                self.snapshot = await self._fetch()
                self.say(self._progress_line())
            if await self._sleep(min(0.5, max(next_progress - time.monotonic(), 0.0))):
                break
        self.say("time is up: no new presses; letting the last ones finish and drain"
                 if not self._stop.is_set() else "stopping: letting the last presses drain")
        await self._stop_pressing(finish=True)
        drained = await self._drain()
        self.snapshot = await self._fetch()
        if not drained:
            self.say(f"{self.record.awaiting} presses still awaiting their ACK after {DRAIN_S:.0f} s")
        return self._print_summary(judge=True)

    async def _drain(self) -> bool:
        """Wait until every accepted press is acknowledged and every outbox is empty."""
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            self._check_children()
            outboxes = sum(p.agent.outbox_depth for p in self.fleet.posts.values())
            if self.record.awaiting == 0 and outboxes == 0:
                return True
            await asyncio.sleep(0.1)
        return False

    def _print_summary(self, judge: bool) -> int:
        s, rec = self.snapshot, self.record
        presses = len(rec.pressed)
        committed = s.metric("events_committed_total")
        online = sum(1 for p in s.posts if p.get("state") == "online")
        lines = ["", "summary"]
        lines.append(f"  posts              {self.n_posts}"
                     + ("" if s.error else f" ({online} online at the end)"))
        lines.append(f"  presses accepted   {presses} (by the fleet)")
        if s.error:
            lines.append(f"  events committed   unknown: {s.error}")
        else:
            lines.append(f"  events committed   {committed} (by the server; "
                         f"{s.metric('events_duplicate_total')} resends were duplicates)")
        lines.append(f"  ACKs received      {len(rec.acked)} (by the posts)")
        if not s.error:
            lines.append(f"  incidents          {s.metric('incidents_opened_total')} opened, "
                         f"{s.metric('incidents_open')} still open")
            rejected = s.metric("rejected_total")
            if rejected:
                lines.append(f"  rejected messages  {rejected} (see {self.server_log.name})")
        ok = False
        if judge:
            lost = presses - committed
            unacked = rec.awaiting
            if s.error:
                lines.append("  lost               unknown (presses − committed)")
                lines.append("result: FAILED, the server did not answer at the end")
            else:
                lines.append(f"  lost               {lost} (presses − committed)")
                ok = lost == 0 and unacked == 0
                if ok:
                    lines.append("result: OK, every accepted press was committed and acknowledged")
                else:
                    lines.append(f"result: FAILED, {lost} presses not committed, {unacked} not "
                                 "acknowledged")
        else:
            lines.append(f"  awaiting ACK       {rec.awaiting} (left in the posts' outboxes)")
        self.summary = "\n".join(lines)
        return 0 if ok or not judge else 1

    # ------------------------------------------------------------------ stopping
    async def _stop_fleet(self) -> None:
        teams, self.teams = self.teams, []
        await asyncio.gather(*(t.stop() for t in teams), return_exceptions=True)
        if self.fleet is None:
            return
        await self._stop_pressing(finish=False)
        self.say(f"stopping {len(self.fleet.posts)} posts (each publishes offline)...")
        try:
            await asyncio.wait_for(self.fleet.stop(), 20)
        except TimeoutError:
            self.say("some posts did not stop within 20 s")
        self.fleet = None

    async def _stop_server(self) -> None:
        server = self.server
        if server is None:
            return
        if server.running:
            self.say("stopping the server...")
            code = await server.stop_async(STOP_SERVER_S)
            if code == -signal.SIGKILL:
                self.say(f"the server did not stop within {STOP_SERVER_S:.0f} s: killed it")
            elif code not in (0, -signal.SIGTERM):
                self.say(f"the server exited with code {code}; see {self.server_log}")
        self.server = None

    async def _stop_broker(self) -> None:
        if self.broker is not None and self.broker.running:
            self.say("stopping the broker...")
            await self.broker.stop_async()
        self.say("stopped")

    def cleanup(self) -> None:
        """Whatever is still running goes; the temporary directory goes (kept on failure)."""
        self._show_cursor()
        if self.server is not None:
            self.server.kill()
        if self.broker is not None:
            self.broker.stop()
        self._close_logging()


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _validate(args: argparse.Namespace) -> None:
    if not 1 <= args.posts <= MAX_POSTS:
        raise ConfigError(f"--posts must be from 1 to {MAX_POSTS}")
    if args.press_every < 0:
        raise ConfigError("--press-every must be 0 (no presses) or more seconds")
    if args.duration < 0:
        raise ConfigError("--duration must be 0 (until Ctrl-C) or more seconds")


def run_demo(args: argparse.Namespace) -> int:
    """``alarmpost demo``: see the module docstring. Returns the exit code."""
    _validate(args)
    find_mosquitto()  # raises BrokerError with the install hint
    keep = args.dir is not None
    directory = Path(args.dir).resolve() if keep else Path(
        tempfile.mkdtemp(prefix="alarmpost-demo-")
    )
    # The demo's deployment is self-contained: configuration overrides meant for a real post or
    # server (ALARMPOST_EDGE_*, ALARMPOST_SERVER_*) must not leak into its agents or its server.
    overrides = sorted(k for k in os.environ if k.startswith(("ALARMPOST_EDGE_", "ALARMPOST_SERVER_")))
    for key in overrides:
        del os.environ[key]
    if overrides:
        print(f"alarmpost demo: ignoring {', '.join(overrides)} (the demo uses its own deployment)",
              file=sys.stderr)
    demo = Demo(args, directory, keep)
    # Outside the event loop (start-up, clean-up) SIGTERM unwinds like Ctrl-C, so the clean-up
    # below still stops the broker and the server; inside it, the loop's handler takes over.
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        return demo.run()
    finally:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        demo.cleanup()
        signal.signal(signal.SIGTERM, previous)
        if not keep:
            if demo.failed:
                print(f"alarmpost demo: kept {directory} for inspection (server.log, demo.log, "
                      "broker/mosquitto.log); remove it when done", file=sys.stderr)
            else:
                shutil.rmtree(directory, ignore_errors=True)
