"""``alarmpost bench alarm-path``: the alarm path under a city-sized fleet, end to end.

What runs (all on 127.0.0.1, in a temp dir removed at the end):

* a private Mosquitto and a fresh deployment of ``posts + 1`` posts (heartbeats on, mock GPIO);
* the central server as a real child process (``alarmpost server``), so its CPU and RSS can be
  read with psutil;
* the fleet: ``posts`` real :class:`edge.agent.EdgeAgent` instances on gpiozero mock pins
  (:class:`firmware_sim.fleet.SimPost`), split over ``workers`` child processes (this module run
  with ``--worker``). Presses go through the mock pin, the hold-time guard, the outbox and MQTT,
  exactly as on a post;
* one more post as its own ``alarmpost edge`` process, to read the RSS of one idle agent;
* with ``hostile_rate=N`` (default 0: off), one more post's credential in an attacker's hands
  (:class:`Hostile`): N garbage messages per second on that post's own topics through both measured
  phases (malformed JSON, deep nesting, oversized, wrong types, a body naming another post, topic
  kinds a post may not write, huge numbers, raw bytes). The JSON adds ``hostile_sent`` and
  ``hostile_rejected`` (the growth of the server's ``alarmpost_rejected_total`` meanwhile). A server
  that dies under it ends the benchmark at once with exit 3 and the server's last log lines.

Phases: connect (posts started at a steady ``ramp`` so heartbeat phases spread over one interval),
paced presses (``presses`` at ``rate``/s on random posts), then a burst (``burst`` posts pressed
once each at random moments within ``burst_window`` s).

Press time is the event's ``ts`` (when the hold-time guard accepted the press, on the edge).
Press -> committed is ``events.committed_at - events.pressed_at`` from the server's database;
press -> ACK is when the ACK reached the edge (``EdgeAgent.ack_listeners``) minus the event's ``ts``.
Every process uses the same clock (``time.time()`` on one machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alarmpost_cli.harness import (
    HarnessError,
    Mosquitto,
    PostgreSQL,
    ServerProcess,
    die_with_parent,
)
from bench import summary_ms

log = logging.getLogger("alarmpost.bench")

# Targets on a 2-core machine (the bar).
TARGET_COMMIT_P99_MS = 20.0
TARGET_BURST_LAST_COMMIT_S = 2.0
TARGET_EDGE_RSS_MB = 60.0

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ALARMPOST = [sys.executable, "-m", "alarmpost_cli.main"]


@dataclass
class Options:
    posts: int = 1000  # simulated posts in the fleet (plus one more as its own edge process)
    presses: int = 300  # paced presses
    rate: float = 20.0  # paced presses per second
    burst: int = -1  # posts pressed in the burst (-1: every post in the fleet)
    burst_window: float = 1.0  # the burst's presses fall within this many seconds
    workers: int = 2  # fleet processes
    heartbeat: float = 10.0  # heartbeat interval of every post (s)
    ramp: float = -1.0  # posts started per second (-1: posts / heartbeat; 0: all at once)
    edge_idle: float = 5.0  # how long the lone edge agent idles before its RSS is read (s)
    # Where the simulated posts keep their outboxes: "disk" (the deployment dir, like the posts'
    # own configs) or "tmpfs" (/dev/shm). See README: on one shared disk the fleet's fsyncs queue
    # up behind each other in a way 1,000 separate posts' flash never would.
    outbox: str = "disk"
    # The fleet processes' garbage collector once every post is connected: "off" (gc.freeze() then
    # gc.disable(): the run is short and reference counting frees nearly everything), "freeze"
    # (gc.freeze() only) or "on" (untouched). See README: why the simulator's GC is not the posts'.
    fleet_gc: str = "off"
    drain_timeout: float = 30.0  # how long to wait for every ACK after a phase (s)
    timeout: float = 300.0  # the whole benchmark, start to cleanup (s)
    seed: int = 1
    server_log: str = "info"  # the server child's --log-level
    keep: bool = False  # keep the temp dir (logs, databases) for a look afterwards
    monitor: bool = True  # a bystander MQTT client times events and ACKs on the broker (hops)
    hostile_rate: float = 0.0  # garbage messages/s from one more post's credential (0: none)
    storage: str = "sqlite"  # the server's database: sqlite, or postgresql (a private one)

    @classmethod
    def parse(cls, raw: dict[str, str]) -> Options:
        opts = cls()
        known = {f: type(getattr(opts, f)) for f in opts.__dataclass_fields__}
        unknown = set(raw) - set(known)
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)}; known: "
                + ", ".join(f"{k}={getattr(opts, k)}" for k in known)
            )
        for key, value in raw.items():
            typ = known[key]
            try:
                if typ is bool:
                    parsed: Any = value.lower() in {"1", "true", "yes", "on"}
                else:
                    parsed = typ(value)
            except ValueError:
                raise ValueError(f"option {key}={value!r}: expected {typ.__name__}") from None
            setattr(opts, key, parsed)
        if opts.posts < 1 or opts.workers < 1 or opts.presses < 0 or opts.rate <= 0:
            raise ValueError("posts and workers must be >= 1, presses >= 0, rate > 0")
        if not 0 <= opts.hostile_rate <= 5000:
            raise ValueError("hostile_rate must be within 0..5000 messages per second")
        if opts.burst < 0 or opts.burst > opts.posts:
            opts.burst = opts.posts
        if opts.ramp < 0:
            opts.ramp = opts.posts / opts.heartbeat
        opts.workers = min(opts.workers, opts.posts)
        if opts.storage not in {"sqlite", "postgresql"}:
            raise ValueError("storage must be sqlite or postgresql")
        if opts.fleet_gc not in {"off", "freeze", "on"}:
            raise ValueError("fleet_gc must be off, freeze or on")
        if opts.outbox not in {"disk", "tmpfs"}:
            raise ValueError("outbox must be disk or tmpfs")
        if opts.server_log not in {"debug", "info", "warning", "error"}:
            raise ValueError("server_log must be debug, info, warning or error")
        return opts


class BenchError(RuntimeError):
    """The benchmark could not run (a process failed or did not come up in time)."""


class Interrupted(BenchError):
    """Ctrl-C or SIGTERM: stop, clean up, report nothing."""


# ============================================================================ child processes
_PREEXEC = die_with_parent()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _popen(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as fh:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, env=_child_env(),
            cwd=PROJECT_ROOT, start_new_session=True, preexec_fn=_PREEXEC,
        )


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _progress(text: str) -> None:
    print(f"[bench alarm-path] {text}", file=sys.stderr, flush=True)


@dataclass
class EventRecord:
    id: str
    post: str
    seq: int
    ts: float
    phase: str
    lag: float | None  # accepted press minus (scheduled press-down + hold time), in s


@dataclass
class Worker:
    """One fleet process and what it has told us."""

    index: int
    ids: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    connected: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stats: asyncio.Future[dict[str, Any]] | None = None
    reader: asyncio.Task[None] | None = None


class Fleet:
    """The fleet's worker processes; collects the events and ACKs they report."""

    def __init__(self, dep_dir: Path, ids: list[str], workers: int, ramp: float, tmp: Path,
                 outbox_dir: Path | None = None, fleet_gc: str = "off") -> None:
        self.dep_dir = dep_dir
        self.fleet_gc = fleet_gc
        self.outbox_dir = outbox_dir
        self.workers = [
            Worker(i, ids[i::workers], tmp / f"worker{i}.log") for i in range(workers)
        ]
        self.ramp = ramp
        self.tmp = tmp
        self.worker_of: dict[str, Worker] = {}
        for w in self.workers:
            for post_id in w.ids:
                self.worker_of[post_id] = w
        self.events: dict[str, EventRecord] = {}
        self.acks: dict[str, float] = {}
        self.ack_ts: dict[str, float] = {}  # the server's Ack.ts: taken after COMMIT returned
        self.changed = asyncio.Event()
        self.stopped = False
        # Further checks run wherever the fleet's are (a process that must stay alive): each
        # raises BenchError, so no phase waits out its timeout for a process that is gone.
        self.watchdogs: list[Callable[[], None]] = []

    @property
    def total(self) -> int:
        return len(self.worker_of)

    @property
    def connected(self) -> int:
        return sum(w.connected for w in self.workers)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None]

    async def start(self) -> None:
        for w in self.workers:
            ids_file = self.tmp / f"worker{w.index}.json"
            ids_file.write_text(json.dumps(w.ids))
            with w.log_path.open("ab") as fh:
                w.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.alarm_path", "--worker",
                    "--deployment", str(self.dep_dir), "--ids", str(ids_file),
                    "--ramp", str(self.ramp / len(self.workers)),
                    *(["--outbox-dir", str(self.outbox_dir)] if self.outbox_dir else []),
                    "--gc", self.fleet_gc,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fh,
                    env=_child_env(), cwd=PROJECT_ROOT, start_new_session=True,
                    preexec_fn=_PREEXEC,
                )
            w.reader = asyncio.create_task(self._read(w))

    async def _read(self, w: Worker) -> None:
        assert w.proc is not None and w.proc.stdout is not None
        async for raw in w.proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            kind = msg.get("t")
            if kind == "e":
                self.events[msg["id"]] = EventRecord(
                    msg["id"], msg["p"], msg["s"], msg["ts"], msg["ph"], msg.get("lag"))
            elif kind == "a":
                self.acks.setdefault(msg["id"], msg["r"])
                if msg.get("ats") is not None:
                    self.ack_ts.setdefault(msg["id"], msg["ats"])
            elif kind == "progress":
                w.connected = msg["connected"]
            elif kind == "ready":
                w.connected = msg["connected"]
                w.ready.set()
            elif kind == "stats" and w.stats is not None and not w.stats.done():
                w.stats.set_result(msg)
            self.changed.set()

    def check_alive(self) -> None:
        for check in self.watchdogs:
            check()
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is not None:
                raise BenchError(
                    f"fleet worker {w.index} exited with code {w.proc.returncode}:\n"
                    + _tail(w.log_path)
                )

    async def send(self, w: Worker, msg: dict[str, Any]) -> None:
        assert w.proc is not None and w.proc.stdin is not None
        w.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        await w.proc.stdin.drain()

    async def wait_connected(self, within: float) -> float:
        started = time.monotonic()
        deadline = started + within
        last_shown = -1
        last_time = 0.0
        while not all(w.ready.is_set() for w in self.workers):
            self.check_alive()
            now = time.monotonic()
            if now > deadline:
                raise BenchError(f"only {self.connected}/{self.total} posts connected within {within:.0f} s")
            if self.connected != last_shown and now - last_time >= 1.0:
                _progress(f"connected {self.connected}/{self.total}")
                last_shown, last_time = self.connected, now
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 0.25)
        _progress(f"connected {self.connected}/{self.total} in {time.monotonic() - started:.1f} s")
        return time.monotonic() - started

    async def schedule(self, phase: str, presses: list[tuple[float, str]], lead_s: float = 0.5) -> float:
        """Send each worker its share of ``(offset_s, post_id)``; return the common start (UNIX)."""
        t0 = time.time() + lead_s
        share: dict[int, list[tuple[float, str]]] = {w.index: [] for w in self.workers}
        for offset, post_id in presses:
            share[self.worker_of[post_id].index].append((offset, post_id))
        for w in self.workers:
            await self.send(w, {"cmd": "schedule", "phase": phase, "t0": t0, "presses": share[w.index]})
        return t0

    async def wait_acked(self, phase: str, expected: int, within: float) -> bool:
        """Until every event of ``phase`` is acknowledged at the edge (and ``expected`` exist)."""
        deadline = time.monotonic() + within
        while True:
            self.check_alive()
            ids = [e.id for e in self.events.values() if e.phase == phase]
            if len(ids) >= expected and all(i in self.acks for i in ids):
                return True
            if time.monotonic() > deadline:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 0.05)

    async def stats(self) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        for w in self.workers:
            w.stats = loop.create_future()
            await self.send(w, {"cmd": "stats"})
        out = []
        for w in self.workers:
            assert w.stats is not None
            out.append(await asyncio.wait_for(w.stats, 10))
        return out

    def kill(self) -> None:
        """Last resort (synchronous, after the event loop is gone): SIGKILL what still runs."""
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(OSError):
                    os.kill(w.proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        """Ask every worker to stop its agents cleanly; kill what does not exit in time."""
        if self.stopped:
            return
        self.stopped = True
        for w in self.workers:
            if w.proc is None or w.proc.returncode is not None:
                continue
            with contextlib.suppress(Exception):
                await self.send(w, {"cmd": "stop"})
                assert w.proc.stdin is not None
                w.proc.stdin.close()
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                await asyncio.wait_for(w.proc.wait(), 20)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
            if w.reader is not None:
                w.reader.cancel()
                await asyncio.gather(w.reader, return_exceptions=True)


# ============================================================================ measurement helpers
class Monitor:
    """A bystander MQTT client: when each event and each ACK passed through the broker.

    It subscribes (QoS 0, the deployment's read-only ``monitor`` account: the broker makes a
    client's id its user name, so the server's account would disconnect the server) to every
    post's ``event`` and ``ack`` topics and notes the arrival time of the first copy of each,
    splitting press -> committed -> ACK into edge -> broker -> server -> broker -> edge. Messages
    on ``ignore``'s topics (the hostile post's) are skipped; anything else is bounded before it is
    parsed, like every other reader of posts' messages.
    """

    def __init__(self, host: str, port: int, username: str, password: str,
                 ignore: str = "") -> None:
        self.args = (host, port, username, password)
        self.ignore = f"/post/{ignore}/" if ignore else ""
        self.events: dict[str, float] = {}  # event id -> first seen on the broker
        self.acks: dict[str, float] = {}  # event id -> its ACK first seen on the broker
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        import aiomqtt

        from protocol.topics import post_subscription
        from protocol.transport import SOCKET_OPTIONS

        host, port, username, password = self.args
        async with aiomqtt.Client(
            host, port, username=username, password=password,
            identifier=username,
            protocol=aiomqtt.ProtocolVersion.V5, socket_options=SOCKET_OPTIONS, timeout=10,
        ) as client:
            await client.subscribe([(post_subscription("event"), 0), (post_subscription("ack"), 0)])
            self.connected.set()
            async for message in client.messages:
                now = time.time()
                topic = str(message.topic)
                payload = message.payload if isinstance(message.payload, bytes) else b""
                if (self.ignore and self.ignore in topic) or len(payload) > 4096:
                    continue
                try:
                    body = json.loads(payload)
                except (ValueError, RecursionError):
                    continue
                if not isinstance(body, dict):
                    continue
                if topic.endswith("/event"):
                    self.events.setdefault(str(body.get("id")), now)
                else:
                    self.acks.setdefault(str(body.get("event_id")), now)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def wait_connected(self, within: float = 10.0) -> None:
        assert self._task is not None
        waiter = asyncio.create_task(self.connected.wait())
        await asyncio.wait([waiter, self._task], timeout=within, return_when=asyncio.FIRST_COMPLETED)
        if not self.connected.is_set():
            waiter.cancel()
            if self._task.done() and self._task.exception() is not None:
                raise BenchError(f"monitor could not connect: {self._task.exception()}")
            raise BenchError("monitor did not connect")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)



class Hostile:
    """One post's credential in an attacker's hands: garbage at ``rate`` messages per second.

    A paho MQTT 5 client in its own thread publishes (QoS 1) a mix of what a post can send but
    should not, on its own topics: the broker lets it write there, so all of it reaches the
    server, except the topic kinds a post may not write (refused by the broker, PUBACK 0x87).
    Every payload stays under the broker's ``max_packet_size`` (a bigger one only gets this client
    disconnected; tests/test_broker_identity.py shows that), and a few status messages are
    retained, as a poison message would be.
    """

    KINDS = ("malformed", "deep_nesting", "oversized", "wrong_types", "other_post", "wrong_topic",
             "huge_numbers", "raw_bytes")

    def __init__(self, host: str, port: int, post_id: str, password: str, victim: str,
                 rate: float, seed: int) -> None:
        import threading

        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.post_id, self.victim, self.rate = post_id, victim, rate
        self.rng = random.Random(seed)
        self.sent = 0
        self.acked = 0  # PUBACKs received, whatever their code
        self.refused_by_broker = 0  # PUBACK >= 0x80 (topics a post may not write)
        self.disconnects = 0
        self.by_kind: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()
        self.error = ""
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=post_id,
                                  protocol=paho.MQTTv5)
        self.client.username_pw_set(post_id, password)
        self.client.max_inflight_messages_set(200)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.host, self.port = host, port

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.value == 0:
            self._connected.set()
        else:
            self.error = f"hostile client refused: {reason}"

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       props: Any) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            self.disconnects += 1

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self.acked += 1
        if reason.value >= 0x80:
            self.refused_by_broker += 1

    def message(self, kind: str) -> tuple[str, bytes, bool]:
        """(topic, payload, retain) of one garbage message of ``kind``."""
        from protocol.messages import Event, encode
        from protocol.topics import post_topic
        from protocol.ulid import new_ulid

        rng, own = self.rng, self.post_id
        topic = post_topic(own, rng.choice(("event", "event", "heartbeat", "status", "cmdresult",
                                            "callstate")))
        retain = False
        now = time.time()
        if kind == "malformed":
            good = encode(Event(id=new_ulid(), post=own, seq=1, ts=now))
            payload = good[: rng.randint(1, len(good) - 1)] + rng.choice((b"", b"}}", b",", b"\x00"))
        elif kind == "deep_nesting":
            depth = rng.choice((100, 1000, 3000))
            payload = rng.choice((b"[" * depth, b'{"a":' * depth, b"[" * depth + b"]" * depth))
        elif kind == "oversized":
            payload = b'{"v":1,"pad":"' + b"x" * rng.randint(4097, 30000) + b'"}'
        elif kind == "wrong_types":
            payload = json.dumps(rng.choice((
                {"v": 1, "id": 12, "post": [own], "seq": "1", "ts": None},
                {"v": "1", "id": new_ulid(), "post": own, "seq": 1.5, "ts": "now"},
                [1, 2, 3], "event", None, {"v": 1, "post": {"id": own}},
            ))).encode()
        elif kind == "other_post":  # its own topic, a body speaking for another post
            topic = post_topic(own, "event")
            payload = encode(Event(id=new_ulid(), post=self.victim, seq=rng.randint(1, 10**6),
                                   ts=now))
        elif kind == "wrong_topic":  # refused by the broker's ACL: never reaches the server
            topic = rng.choice((post_topic(own, "ack"), post_topic(own, "cmd"),
                                post_topic(self.victim, "event"), f"alarmpost/v1/post/{own}/bogus",
                                "alarmpost/v1/server/status"))
            payload = encode(Event(id=new_ulid(), post=own, seq=1, ts=now))
        elif kind == "huge_numbers":
            payload = rng.choice((
                b'{"v":1,"id":"' + new_ulid().encode() + b'","post":"' + own.encode()
                + b'","seq":' + b"9" * 5000 + b',"ts":1e999}',
                json.dumps({"v": 1, "id": new_ulid(), "post": own, "seq": 2**64,
                            "ts": -1e308, "hold_ms": -(2**63)}).encode(),
            ))
        else:  # raw bytes, invalid UTF-8 among them
            payload = rng.randbytes(rng.randint(0, 512))
            if topic.endswith("/status") and rng.random() < 0.5:
                retain = True  # a poison retained message: the server sees it again on restart
        return topic, payload, retain

    def start(self, within: float = 10.0) -> None:
        import threading

        self.client.connect(self.host, self.port)
        self.client.loop_start()
        if not self._connected.wait(within):
            raise BenchError(f"hostile client ({self.post_id}) did not connect: {self.error}")
        self._thread = threading.Thread(target=self._run, name="hostile", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        n = 0
        try:
            while not self._stop.is_set():
                kind = self.rng.choice(self.KINDS)
                topic, payload, retain = self.message(kind)
                self.client.publish(topic, payload, qos=1, retain=retain)
                self.sent += 1
                self.by_kind[kind] += 1
                n += 1
                delay = t0 + n / self.rate - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
        except Exception as exc:  # reported by check(), never silently
            self.error = f"hostile publisher failed: {type(exc).__name__}: {exc}"

    def check(self) -> None:
        if self.error:
            raise BenchError(self.error)

    def stop(self) -> None:
        """Stop publishing; wait (up to 5 s) for the broker to acknowledge what was sent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        deadline = time.monotonic() + 5.0
        while self.acked < self.sent and self._connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()


class ProcWatch:
    """CPU (user + system) and peak RSS of a set of processes, by psutil."""

    def __init__(self, pids: list[int]) -> None:
        import psutil

        self.procs = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                self.procs.append(psutil.Process(pid))
        self.peak_rss = 0

    def cpu(self) -> float:
        import psutil

        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss(self) -> int:
        import psutil

        total = 0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        self.peak_rss = max(self.peak_rss, total)
        return total


@dataclass
class CpuWindow:
    """CPU seconds of each watched group over one wall-clock window."""

    wall: float
    cpu: dict[str, float]

    def pct(self, name: str) -> float:
        return round(100 * self.cpu[name] / self.wall, 1) if self.wall > 0 else 0.0


class Sampler:
    """Reads CPU of the watched groups at phase edges and samples RSS every 0.25 s."""

    def __init__(self, groups: dict[str, ProcWatch]) -> None:
        self.groups = groups
        self._task: asyncio.Task[None] | None = None

    def mark(self) -> tuple[float, dict[str, float]]:
        import psutil

        cpu = {name: g.cpu() for name, g in self.groups.items()}
        t = psutil.cpu_times()
        # every core's busy time: what the machine did, ours and anybody else's
        cpu["machine"] = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(
            t, "softirq", 0.0) + getattr(t, "steal", 0.0)
        cpu["others"] = cpu["machine"] - sum(cpu[name] for name in self.groups)
        return time.monotonic(), cpu

    @staticmethod
    def window(a: tuple[float, dict[str, float]], b: tuple[float, dict[str, float]]) -> CpuWindow:
        return CpuWindow(b[0] - a[0], {k: b[1][k] - a[1][k] for k in a[1]})

    async def _run(self) -> None:
        while True:
            for g in self.groups.values():
                g.rss()
            await asyncio.sleep(0.25)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def _http_get(port: int, path: str, token: str) -> tuple[int, str]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        return resp.status, await resp.text()


def _server_metrics(text: str) -> dict[str, float]:
    """The counters worth reporting from the server's /metrics."""
    wanted = ("events_committed_total", "events_duplicate_total", "acks_sent_total",
              "incidents_opened_total", "rejected_total", "post_offline_total")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        base = name.split("{", 1)[0].removeprefix("alarmpost_")
        if base in wanted:
            with contextlib.suppress(ValueError):
                out[base] = out.get(base, 0.0) + float(value)
    return out


async def _edge_rss(dep: Any, post_id: str, tmp: Path, idle_s: float) -> dict[str, Any]:
    """Run one real ``alarmpost edge`` process, let it connect and idle, read its RSS."""
    import psutil

    log_path = tmp / "edge.log"
    proc = _popen([*ALARMPOST, "edge", "--config", str(dep.post_config(post_id))], log_path)
    try:
        started = time.monotonic()
        while "connected to" not in _tail(log_path, 100_000):
            if proc.poll() is not None:
                raise BenchError(f"edge agent exited with code {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() - started > 60:
                raise BenchError(f"edge agent did not connect within 60 s:\n{_tail(log_path)}")
            await asyncio.sleep(0.1)
        connect_s = time.monotonic() - started
        await asyncio.sleep(idle_s)
        if proc.poll() is not None:
            raise BenchError(f"edge agent exited with code {proc.returncode}:\n{_tail(log_path)}")
        mem = psutil.Process(proc.pid).memory_full_info()
        return {"rss_mb": mem.rss / 2**20, "uss_mb": mem.uss / 2**20, "connect_s": connect_s,
                "post": post_id}
    finally:
        await asyncio.get_running_loop().run_in_executor(None, _terminate, proc, 10.0)


Row = tuple[str, str, int, float, float, float]  # id, post, seq, pressed, committed, received


def _read_events(server_config: Path) -> list[Row]:
    """Every committed event, from the server's own database (a separate read-only connection)."""
    from server.config import load_server_config
    from server.storage import IncidentStore, PostStore, open_database

    db = open_database(load_server_config(server_config).database, read_only=True)
    try:
        events = IncidentStore(db, PostStore(db)).events(None, 2**31 - 1)
    finally:
        db.close()
    return [(e["id"], e["post_id"], e["seq"], e["pressed_at"], e["committed_at"], e["received_at"])
            for e in events]


# ============================================================================ schedules
def paced_schedule(ids: list[str], presses: int, rate: float, rng: random.Random) -> list[tuple[float, str]]:
    """``presses`` at a steady ``rate``/s on random posts; a post is not pressed again within 1 s."""
    recent: list[str] = []
    guard = min(len(ids) - 1, max(int(rate), 1))
    out = []
    for i in range(presses):
        post = rng.choice(ids)
        while post in recent:
            post = rng.choice(ids)
        recent.append(post)
        if len(recent) > guard:
            recent.pop(0)
        out.append((i / rate, post))
    return out


def burst_schedule(ids: list[str], n: int, window: float, rng: random.Random) -> list[tuple[float, str]]:
    """``n`` different posts, each pressed once at a random moment within ``window`` s."""
    return sorted((rng.uniform(0, window), post) for post in rng.sample(ids, n))


# ============================================================================ the benchmark
async def _bench(opts: Options, tmp: Path, cleanups: list[Callable[[], Any]],
                 fleets: list[Fleet]) -> dict[str, Any]:
    from provisioning import deployment as d
    from provisioning.broker import MONITOR_USER

    t_start = time.monotonic()
    hostile_on = opts.hostile_rate > 0
    specs = d.district_posts(opts.posts + 1 + hostile_on)
    database: dict[str, object] | None = None
    if opts.storage == "postgresql":
        pg = PostgreSQL(tmp / "postgres")
        cleanups.append(pg.stop)
        try:
            await pg.start_async()
        except HarnessError as exc:
            raise BenchError(str(exc)) from None
        database = {"backend": "postgresql", "dsn": pg.dsn}
        _progress(f"postgresql on 127.0.0.1:{pg.port} (pid {pg.pid})")
    dep = d.create(tmp / "deployment", specs, heartbeat_s=opts.heartbeat, hardware_backend="mock",
                   database=database)
    fleet_ids = [s.id for s in specs[: opts.posts]]
    edge_id = specs[opts.posts].id
    hostile_id = specs[opts.posts + 1].id if hostile_on else ""
    _progress(f"deployment of {len(specs)} posts in {tmp} ({time.monotonic() - t_start:.1f} s)")

    broker = Mosquitto.for_deployment(dep)
    cleanups.append(broker.stop)
    try:
        await broker.start_async()
    except HarnessError as exc:
        raise BenchError(str(exc)) from None
    assert broker.pid is not None
    _progress(f"mosquitto on 127.0.0.1:{dep.broker_port} (pid {broker.pid})")

    server_log = tmp / "server.log"
    server = ServerProcess.for_deployment(dep, server_log, log_level=opts.server_log,
                                          env=_child_env(), cwd=PROJECT_ROOT)
    cleanups.append(server.stop)
    server.start()
    try:
        await server.wait_ready(30.0)
    except HarnessError as exc:
        raise BenchError(str(exc)) from None
    assert server.pid is not None
    _progress(f"server ready (pid {server.pid})")

    def server_alive() -> None:
        if server.returncode is not None:
            during = f" under hostile_rate={opts.hostile_rate:g}" if hostile_on else ""
            raise BenchError(f"the server exited with code {server.returncode} during the "
                             f"benchmark{during}; its last log lines:\n{_tail(server_log)}")

    monitor = Monitor("127.0.0.1", dep.broker_port, *d.account_credentials(dep, MONITOR_USER),
                      ignore=hostile_id)
    if opts.monitor:
        monitor.start()
        await monitor.wait_connected()

    outbox_dir = None
    if opts.outbox == "tmpfs":
        outbox_dir = Path(tempfile.mkdtemp(prefix="alarmpost-bench-outbox-", dir="/dev/shm"))
        cleanups.append(lambda: shutil.rmtree(outbox_dir, ignore_errors=True))
    fleet = Fleet(dep.directory, fleet_ids, opts.workers, opts.ramp, tmp, outbox_dir, opts.fleet_gc)
    fleets.append(fleet)
    cleanups.append(fleet.kill)
    fleet.watchdogs.append(server_alive)
    loop = asyncio.get_running_loop()
    edge_task = asyncio.create_task(_edge_rss(dep, edge_id, tmp, opts.edge_idle))
    try:
        await fleet.start()
        _progress(f"starting {fleet.total} posts in {len(fleet.workers)} worker processes "
                  f"({'all at once' if opts.ramp <= 0 else f'{opts.ramp:.0f}/s'})")
        connect_within = (fleet.total / opts.ramp if opts.ramp > 0 else 0) + 90
        connect_s = await fleet.wait_connected(connect_within)
        edge = await edge_task
    finally:
        if not edge_task.done():
            edge_task.cancel()
        await asyncio.gather(edge_task, return_exceptions=True)
    _progress(f"one edge agent ({edge_id}) idle for {opts.edge_idle:.0f} s: RSS {edge['rss_mb']:.1f} MB")

    sampler = Sampler({
        "server": ProcWatch([server.pid]),
        "broker": ProcWatch([broker.pid]),
        "fleet": ProcWatch(fleet.pids()),
        "bench": ProcWatch([os.getpid()]),
    })
    sampler.start()
    await asyncio.sleep(1.0)  # let the edge agent's exit settle

    rng = random.Random(opts.seed)

    # ---------------------------------------------------------------- the hostile post
    hostile: Hostile | None = None
    rejected_before = 0.0
    if hostile_on:
        status, text = await _http_get(dep.http_port, "/metrics", dep.api_token)
        rejected_before = _server_metrics(text).get("rejected_total", 0.0) if status == 200 else 0.0
        hostile = Hostile("127.0.0.1", dep.broker_port, hostile_id,
                          tomllib.loads(dep.post_config(hostile_id).read_text())["mqtt"]["password"],
                          victim=fleet_ids[0], rate=opts.hostile_rate, seed=opts.seed)
        await loop.run_in_executor(None, hostile.start)
        cleanups.append(hostile.stop)
        fleet.watchdogs.append(hostile.check)
        _progress(f"hostile: {hostile_id}'s credential publishes {opts.hostile_rate:g} garbage "
                  "messages/s on its own topics from now on")

    # ---------------------------------------------------------------- paced presses
    for w in fleet.workers:
        await fleet.send(w, {"cmd": "reset_gc"})
    m0 = sampler.mark()
    paced = paced_schedule(fleet_ids, opts.presses, opts.rate, rng)
    paced_ok = True
    if paced:
        _progress(f"paced: {len(paced)} presses at {opts.rate:g}/s over random posts "
                  f"(~{len(paced) / opts.rate:.0f} s)")
        t0 = await fleet.schedule("paced", paced)
        while time.time() < t0 + paced[-1][0]:
            fleet.check_alive()
            await asyncio.sleep(0.5)
        paced_ok = await fleet.wait_acked("paced", len(paced), opts.drain_timeout)
    m1 = sampler.mark()
    await asyncio.sleep(1.0)

    # ---------------------------------------------------------------- burst
    burst = burst_schedule(fleet_ids, opts.burst, opts.burst_window, rng)
    _progress(f"burst: {len(burst)} posts pressed once each within {opts.burst_window:g} s")
    m2 = sampler.mark()
    t0 = await fleet.schedule("burst", burst)
    await asyncio.sleep(max(t0 + opts.burst_window - time.time(), 0.0))
    burst_ok = await fleet.wait_acked("burst", len(burst), opts.drain_timeout)
    # Every event acknowledged at the edge is committed (the server ACKs after the commit).
    m3 = sampler.mark()
    hostile_figures: dict[str, Any] = {}
    if hostile is not None:
        await loop.run_in_executor(None, hostile.stop)
        server_alive()
        # Everything the broker took and did not refuse goes to the server: wait (bounded) until
        # the server has counted that many rejections, so the figure is not cut short.
        expected = rejected_before + hostile.acked - hostile.refused_by_broker
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            server_alive()
            status, text = await _http_get(dep.http_port, "/metrics", dep.api_token)
            if status == 200 and _server_metrics(text).get("rejected_total", 0.0) >= expected:
                break
            await asyncio.sleep(0.1)
        hostile_figures = {"sent": hostile.sent, "acked_by_broker": hostile.acked,
                           "refused_by_broker": hostile.refused_by_broker,
                           "disconnects": hostile.disconnects, "by_kind": dict(hostile.by_kind)}
    await sampler.stop()
    server_rss_now = sampler.groups["server"].rss()

    stats = await fleet.stats()
    status, text = await _http_get(dep.http_port, "/metrics", dep.api_token)
    metrics = _server_metrics(text) if status == 200 else {}
    if hostile_figures:
        hostile_figures["rejected"] = metrics.get("rejected_total", 0.0) - rejected_before
    rows = await loop.run_in_executor(None, _read_events, dep.server_config)

    await monitor.stop()
    await fleet.stop()
    _progress("fleet stopped")

    return _analyse(
        opts, fleet, monitor, rows, paced, burst, paced_ok, burst_ok, edge, stats, metrics,
        windows={"paced": Sampler.window(m0, m1), "burst": Sampler.window(m2, m3),
                 "all": Sampler.window(m0, m3)},
        server_rss=server_rss_now, server_rss_peak=sampler.groups["server"].peak_rss,
        fleet_rss_peak=sampler.groups["fleet"].peak_rss, connect_s=connect_s,
        elapsed=time.monotonic() - t_start, hostile=hostile_figures,
    )


def _analyse(opts: Options, fleet: Fleet, monitor: Monitor, rows: list[Row],
             paced: list[tuple[float, str]], burst: list[tuple[float, str]], paced_ok: bool,
             burst_ok: bool, edge: dict[str, Any], stats: list[dict[str, Any]],
             metrics: dict[str, float], windows: dict[str, CpuWindow], server_rss: int,
             server_rss_peak: int, fleet_rss_peak: int, connect_s: float,
             elapsed: float, hostile: dict[str, Any] | None = None) -> dict[str, Any]:
    by_id = {r[0]: r for r in rows}
    sent = fleet.events

    def phase_figures(phase: str, scheduled: int) -> dict[str, Any]:
        ids = {e.id for e in sent.values() if e.phase == phase}
        committed = [by_id[i] for i in ids if i in by_id]
        # rows beyond one per pressed event: an unknown id (not pressed by anyone) committed
        # during the phase, or a second row for the same (post, seq).
        first = min((sent[i].ts for i in ids), default=0.0)
        last = max((sent[i].ts for i in ids), default=0.0)
        phantoms = [r for r in rows if r[0] not in sent and first - 1.0 <= r[3] <= last + 1.0]
        keys = Counter((r[1], r[2]) for r in committed)
        doubled = len(phantoms) + sum(n - 1 for n in keys.values())
        commit = [r[4] - r[3] for r in committed]
        to_server = [r[5] - r[3] for r in committed]  # press -> received by the server
        in_server = [r[4] - r[5] for r in committed]  # received -> committed
        ack = [fleet.acks[i] - sent[i].ts for i in ids if i in fleet.acks]
        # the path in hops: press -> event on the broker -> committed -> ACK on the broker -> edge
        # events.committed_at is stamped inside the transaction, before COMMIT (and its fsync):
        # the server's Ack.ts is taken after COMMIT returned, so this is press -> durable.
        durable = [fleet.ack_ts[i] - sent[i].ts for i in ids if i in fleet.ack_ts]
        hops = {
            "press_to_broker": [monitor.events[i] - sent[i].ts for i in ids if i in monitor.events],
            "broker_to_committed": [by_id[i][4] - monitor.events[i] for i in ids
                                    if i in monitor.events and i in by_id],
            "committed_to_ack_on_broker": [monitor.acks[i] - by_id[i][4] for i in ids
                                           if i in monitor.acks and i in by_id],
            "ack_on_broker_to_edge": [fleet.acks[i] - monitor.acks[i] for i in ids
                                      if i in monitor.acks and i in fleet.acks],
        }
        lags = [sent[i].lag for i in ids if sent[i].lag is not None]
        return {
            "scheduled": scheduled,
            "events": len(ids),
            "committed": len(committed),
            "acked": sum(1 for i in ids if i in fleet.acks),
            "lost": scheduled - len(committed),
            "doubled": doubled,
            "first_press": first,
            "last_press": last,
            "last_commit": max((r[4] for r in committed), default=0.0),
            "last_ack": max((fleet.acks[i] for i in ids if i in fleet.acks), default=0.0),
            "commit": commit,
            "to_server": to_server,
            "in_server": in_server,
            "ack": ack,
            "hops": hops,
            "durable": durable,
            "lag": lags,
        }

    p = phase_figures("paced", len(paced))
    b = phase_figures("burst", len(burst))
    counters: Counter[str] = Counter()
    for s in stats:
        counters.update(s.get("counters", {}))
    burst_last_commit_s = b["last_commit"] - b["first_press"] if b["committed"] else None
    result: dict[str, Any] = {
        "bench": "alarm-path",
        "posts": fleet.total,
        "workers": len(fleet.workers),
        "outbox": opts.outbox,
        "heartbeat_s": opts.heartbeat,
        "presses": len(paced),
        "rate_per_s": opts.rate,
        "press_to_commit_ms": summary_ms(p["commit"]),
        "press_to_ack_ms": summary_ms(p["ack"]),
        "paced_lost": p["lost"],
        "paced_doubled": p["doubled"],
        "burst_presses": len(burst),
        "burst_window_s": opts.burst_window,
        "burst_press_span_s": round(b["last_press"] - b["first_press"], 3) if b["events"] else None,
        "burst_committed": b["committed"],
        "burst_lost": b["lost"],
        "burst_doubled": b["doubled"],
        "burst_last_commit_s": round(burst_last_commit_s, 3) if burst_last_commit_s is not None else None,
        "burst_last_ack_s": round(b["last_ack"] - b["first_press"], 3) if b["acked"] else None,
        "burst_press_to_commit_ms": summary_ms(b["commit"]),
        "burst_press_to_ack_ms": summary_ms(b["ack"]),
        "server_cpu_pct": windows["all"].pct("server"),
        "server_cpu_pct_paced": windows["paced"].pct("server"),
        "server_cpu_pct_burst": windows["burst"].pct("server"),
        "server_rss_mb": round(server_rss / 2**20, 1),
        "server_rss_peak_mb": round(server_rss_peak / 2**20, 1),
        "edge_rss_mb": round(edge["rss_mb"], 1),
        "edge_uss_mb": round(edge["uss_mb"], 1),
        "hostile_rate": opts.hostile_rate,
        "storage": opts.storage,
        "context": {
            "connect_s": round(connect_s, 1),
            "measured_s": round(windows["all"].wall, 1),
            "paced_s": round(windows["paced"].wall, 1),
            "burst_s": round(windows["burst"].wall, 1),
            "broker_cpu_pct": windows["all"].pct("broker"),
            # CPU used by processes outside the benchmark (another test run, say): figures taken
            # while this is high are not comparable. 100 = one core of the machine's two.
            "other_cpu_pct": max(windows["all"].pct("others"), 0.0),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "fleet_cpu_pct": windows["all"].pct("fleet"),
            "fleet_cpu_pct_burst": windows["burst"].pct("fleet"),
            "fleet_rss_mb": round(fleet_rss_peak / 2**20, 1),
            # press -> the server's Ack.ts (stamped after COMMIT returned, i.e. durable)
            "press_to_durable_ms_paced": summary_ms(p["durable"]),
            "press_to_durable_ms_burst": summary_ms(b["durable"]),
            # where press -> committed goes: edge + broker, then the server
            "press_to_received_ms_paced": summary_ms(p["to_server"]),
            "received_to_committed_ms_paced": summary_ms(p["in_server"]),
            "press_to_received_ms_burst": summary_ms(b["to_server"]),
            "received_to_committed_ms_burst": summary_ms(b["in_server"]),
            # the same path in hops, timed by a bystander MQTT client (see Monitor)
            "hops_ms_paced": {k: summary_ms(v) for k, v in p["hops"].items()},
            "hops_ms_burst": {k: summary_ms(v) for k, v in b["hops"].items()},
            # the simulated hand: accepted press minus (scheduled press-down + hold time)
            "edge_lag_ms_paced": summary_ms(p["lag"]),
            "edge_lag_ms_burst": summary_ms(b["lag"]),
            "fleet_gc": opts.fleet_gc,
            "fleet_gc_max_pause_ms": max((s.get("gc_max_ms", 0.0) for s in stats), default=0.0),
            "fleet_gc_full_collections": sum(s.get("gc_full", 0) for s in stats),
            "edge_counters": {k: counters[k] for k in sorted(counters)
                              if k not in {"presses", "acks"}},
            "server_metrics": metrics,
            "paced_drained": paced_ok,
            "burst_drained": burst_ok,
            "elapsed_s": round(elapsed, 1),
            "percentiles": "linear interpolation between closest ranks (numpy default)",
        },
    }
    if hostile:
        result["hostile_sent"] = hostile["sent"]
        result["hostile_rejected"] = int(hostile["rejected"])
        result["context"]["hostile"] = hostile
    commit_p99 = result["press_to_commit_ms"]["p99"]
    result["targets"] = {
        "press_to_commit_p99_ms": TARGET_COMMIT_P99_MS,
        "burst_lost": 0,
        "burst_doubled": 0,
        "burst_last_commit_s": TARGET_BURST_LAST_COMMIT_S,
        "edge_rss_mb": TARGET_EDGE_RSS_MB,
    }
    result["targets_met"] = {
        "press_to_commit_p99": commit_p99 is not None and commit_p99 <= TARGET_COMMIT_P99_MS,
        "burst_lost": b["lost"] == 0,
        "burst_doubled": b["doubled"] == 0,
        "burst_last_commit": burst_last_commit_s is not None
        and burst_last_commit_s <= TARGET_BURST_LAST_COMMIT_S,
        "edge_rss": edge["rss_mb"] <= TARGET_EDGE_RSS_MB,
    }
    result["all_targets_met"] = all(result["targets_met"].values())
    return result


def _fmt(s: dict[str, Any]) -> str:
    if not s["n"]:
        return "no samples"
    return f"p50 {s['p50']:.1f}  p95 {s['p95']:.1f}  p99 {s['p99']:.1f}  max {s['max']:.1f} ms  (n={s['n']})"


def _p(s: dict[str, Any]) -> str:
    return f"{s['p50']:7.1f} / {s['p99']:7.1f}" if s["n"] else "      -"


def render(r: dict[str, Any]) -> str:
    met = r["targets_met"]

    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    c = r["context"]
    lines = [
        f"alarm-path: {r['posts']} posts in {r['workers']} fleet processes (outboxes on "
        f"{r['outbox']}), heartbeat "
        f"{r['heartbeat_s']:g} s, connected in {c['connect_s']} s",
        "",
        f"paced: {r['presses']} presses at {r['rate_per_s']:g}/s",
        f"  press -> committed    {_fmt(r['press_to_commit_ms'])}",
        f"  press -> ACK at edge  {_fmt(r['press_to_ack_ms'])}",
        f"    of which press -> server received  {_fmt(c['press_to_received_ms_paced'])}",
        f"    and received -> committed          {_fmt(c['received_to_committed_ms_paced'])}",
        f"  press -> durable (server's Ack.ts, after COMMIT) {_fmt(c['press_to_durable_ms_paced'])}",
        f"  lost {r['paced_lost']}, doubled {r['paced_doubled']}",
        "",
        f"burst: {r['burst_presses']} presses within {r['burst_window_s']:g} s "
        f"(first to last press {r['burst_press_span_s']} s)",
        f"  committed {r['burst_committed']}, lost {r['burst_lost']}, doubled {r['burst_doubled']}",
        f"  first press -> last commit {r['burst_last_commit_s']} s, -> last ACK {r['burst_last_ack_s']} s",
        f"  press -> committed    {_fmt(r['burst_press_to_commit_ms'])}",
        f"  press -> ACK at edge  {_fmt(r['burst_press_to_ack_ms'])}",
        f"    of which press -> server received  {_fmt(c['press_to_received_ms_burst'])}",
        f"    and received -> committed          {_fmt(c['received_to_committed_ms_burst'])}",
        f"  simulated hand late by (fleet load)  {_fmt(c['edge_lag_ms_burst'])}",
        "",
        "hops (a bystander MQTT client timing events and ACKs on the broker), p50 / p99 ms:",
        *(f"  {name:<28} paced {_p(c['hops_ms_paced'][name])}   burst {_p(c['hops_ms_burst'][name])}"
          for name in c["hops_ms_paced"]),
        "",
        f"server: CPU {r['server_cpu_pct']}% of one core over {c['measured_s']} s "
        f"(paced {r['server_cpu_pct_paced']}%, burst {r['server_cpu_pct_burst']}%), "
        f"RSS {r['server_rss_mb']} MB (peak {r['server_rss_peak_mb']} MB)",
        f"broker CPU {c['broker_cpu_pct']}%, fleet CPU {c['fleet_cpu_pct']}% "
        f"(burst {c['fleet_cpu_pct_burst']}%), fleet RSS {c['fleet_rss_mb']} MB, longest GC pause "
        f"{c['fleet_gc_max_pause_ms']} ms ({c['fleet_gc_full_collections']} full; fleet_gc="
        f"{c['fleet_gc']})",
        f"one edge agent idle: RSS {r['edge_rss_mb']} MB (USS {r['edge_uss_mb']} MB)",
        f"other processes on this machine used {c['other_cpu_pct']}% of a core meanwhile "
        f"(load average {c['load_avg_1m']}){': figures disturbed' if c['other_cpu_pct'] > 25 else ''}",
        f"edge counters: {c['edge_counters'] or 'none'}; server: {c['server_metrics']}",
        *([f"hostile post: {r['hostile_sent']} garbage messages at {r['hostile_rate']:g}/s, "
           f"{c['hostile']['refused_by_broker']} refused by the broker (topics a post may not "
           f"write), {r['hostile_rejected']} rejected by the server, "
           f"{c['hostile']['disconnects']} disconnects"] if "hostile_sent" in r else []),
        "",
        "targets:",
        f"  [{mark(met['press_to_commit_p99'])}] press -> committed p99 <= "
        f"{TARGET_COMMIT_P99_MS:g} ms (paced): {r['press_to_commit_ms']['p99']}",
        f"  [{mark(met['burst_lost'])}] burst lost = 0: {r['burst_lost']}",
        f"  [{mark(met['burst_doubled'])}] burst doubled = 0: {r['burst_doubled']}",
        f"  [{mark(met['burst_last_commit'])}] burst last commit <= "
        f"{TARGET_BURST_LAST_COMMIT_S:g} s after the first press: {r['burst_last_commit_s']}",
        f"  [{mark(met['edge_rss'])}] one edge agent idle RSS <= {TARGET_EDGE_RSS_MB:g} MB: "
        f"{r['edge_rss_mb']}",
        f"percentiles: {c['percentiles']}; elapsed {c['elapsed_s']} s",
    ]
    return "\n".join(lines)


async def _main_async(opts: Options, tmp: Path, cleanups: list[Callable[[], Any]]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    interrupted: list[int] = []

    def on_signal(sig: int) -> None:
        if not interrupted:
            _progress(f"{signal.Signals(sig).name}: stopping and cleaning up")
            task.cancel()
        interrupted.append(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    fleets: list[Fleet] = []
    try:
        async with asyncio.timeout(opts.timeout):
            return await _bench(opts, tmp, cleanups, fleets)
    except TimeoutError:
        raise BenchError(f"the benchmark did not finish within timeout={opts.timeout:g} s") from None
    except asyncio.CancelledError:
        if interrupted:
            raise Interrupted("interrupted") from None
        raise
    finally:
        for fleet in fleets:  # stop the agents cleanly (bounded); fleet.kill() is the fallback
            with contextlib.suppress(Exception):
                await fleet.stop()


def main(as_json: bool, raw_options: dict[str, str]) -> int:
    try:
        opts = Options.parse(raw_options)
    except ValueError as exc:
        print(f"alarmpost bench alarm-path: {exc}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="alarmpost-bench-"))
    cleanups: list[Callable[[], Any]] = []
    result: dict[str, Any] | None = None
    error = ""
    try:
        result = asyncio.run(_main_async(opts, tmp, cleanups))
    except (KeyboardInterrupt, Interrupted):
        error = "interrupted"
    except BenchError as exc:
        error = str(exc)
    except Exception as exc:  # report, clean up, exit 3: never leave processes behind
        log.exception("benchmark failed")
        error = f"{type(exc).__name__}: {exc}"
    finally:
        # Ignore further Ctrl-C while the children are being stopped (bounded: ~30 s at most).
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for cleanup in reversed(cleanups):
                with contextlib.suppress(Exception):
                    cleanup()
            if opts.keep:
                _progress(f"kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)
    if result is None:
        print(f"alarmpost bench alarm-path: {error}", file=sys.stderr)
        if as_json:
            print(json.dumps({"bench": "alarm-path", "error": error.splitlines()[0] if error else ""}))
        return 130 if error == "interrupted" else 3
    print(render(result), flush=True)
    if as_json:
        print(json.dumps(result), flush=True)
    return 0 if result["all_targets_met"] else 1


# ============================================================================ the fleet worker
class _Out:
    """JSON lines to the bench on stdout, written in batches (not one write per event)."""

    def __init__(self) -> None:
        self.buf: list[str] = []

    def line(self, **obj: Any) -> None:
        self.buf.append(json.dumps(obj, separators=(",", ":")))

    def flush(self) -> None:
        if self.buf:
            sys.stdout.write("\n".join(self.buf) + "\n")
            sys.stdout.flush()
            self.buf.clear()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            self.flush()


class _GcPauses:
    """How long the garbage collector stopped this process (after start-up)."""

    def __init__(self) -> None:
        self.max_s = 0.0
        self.total_s = 0.0
        self.full = 0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        pause = time.perf_counter() - self._start
        self.max_s = max(self.max_s, pause)
        self.total_s += pause
        if info.get("generation") == 2:
            self.full += 1

    def reset(self) -> None:
        self.max_s = self.total_s = 0.0
        self.full = 0


async def _worker(dep_dir: Path, ids: list[str], ramp: float, outbox_dir: Path | None,
                  fleet_gc: str) -> int:
    import psutil

    from edge.config import load_edge_config
    from firmware_sim.fleet import SimPost

    loop = asyncio.get_running_loop()
    gc_pauses = _GcPauses()
    out = _Out()
    flusher = asyncio.create_task(out.run())
    posts: dict[str, SimPost] = {}
    phase_of: dict[str, tuple[str, float]] = {}  # post -> (phase, scheduled press-down, UNIX)
    pressing: set[asyncio.Task[None]] = set()

    for post_id in ids:
        config = load_edge_config(dep_dir / "posts" / f"{post_id}.toml")
        if outbox_dir is not None:
            config.outbox.path = str(outbox_dir / f"{post_id}.db")
        post = SimPost(config)
        hold = post.config.hardware.hold_ms / 1000

        def on_event(ev: Any, _pid: str = post_id, _hold: float = hold) -> None:
            phase, sched = phase_of.get(_pid, ("?", 0.0))
            out.line(t="e", id=ev.id, p=ev.post, s=ev.seq, ts=ev.ts, ph=phase,
                     lag=ev.ts - (sched + _hold) if sched else None)

        def on_ack(ack: Any, received: float) -> None:
            out.line(t="a", id=ack.event_id, r=received, dup=ack.duplicate, ats=ack.ts)

        post.agent.press_listeners.append(on_event)
        post.agent.ack_listeners.append(on_ack)
        posts[post_id] = post

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def start_all() -> None:
        begin = loop.time()
        for k, post in enumerate(posts.values()):
            if ramp > 0:
                delay = begin + k / ramp - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            post.start()

    async def progress() -> None:
        last = -1
        while True:
            n = sum(1 for p in posts.values() if p.agent.connected.is_set())
            if n != last:
                out.line(t="progress", connected=n)
                last = n
            if n == len(posts):
                if fleet_gc in {"off", "freeze"}:
                    # A thousand agents in two processes make a heap no post has: a full garbage
                    # collection of it stalls the fleet's event loop for hundreds of ms (measured:
                    # see README). Freeze what start-up made, so collections scan only new objects,
                    # and (fleet_gc=off) collect no more while the figures are taken.
                    gc.collect()
                    gc.freeze()
                    if fleet_gc == "off":
                        gc.disable()
                out.line(t="ready", connected=n)
                return
            await asyncio.sleep(0.25)

    def press(phase: str, post_id: str, sched: float) -> None:
        phase_of[post_id] = (phase, sched)
        task = asyncio.create_task(posts[post_id].press())
        pressing.add(task)
        task.add_done_callback(pressing.discard)

    async def commands() -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        me = psutil.Process()
        while True:
            line = await reader.readline()
            if not line:
                return  # the bench is gone: stop
            msg = json.loads(line)
            cmd = msg.get("cmd")
            if cmd == "reset_gc":
                gc_pauses.reset()
            elif cmd == "schedule":
                base = loop.time() + (msg["t0"] - time.time())
                for offset, post_id in msg["presses"]:
                    loop.call_at(base + offset, press, msg["phase"], post_id, msg["t0"] + offset)
            elif cmd == "stats":
                counters: Counter[str] = Counter()
                for post in posts.values():
                    counters.update(post.agent.counters)
                t = me.cpu_times()
                out.line(t="stats", counters=dict(counters), cpu_s=t.user + t.system,
                         rss_mb=me.memory_info().rss / 2**20,
                         outbox=sum(p.agent.outbox_depth for p in posts.values()),
                         gc_max_ms=round(gc_pauses.max_s * 1000, 1),
                         gc_total_ms=round(gc_pauses.total_s * 1000, 1), gc_full=gc_pauses.full)
            elif cmd == "stop":
                return

    starter = asyncio.create_task(start_all())
    tasks = [asyncio.create_task(progress()), asyncio.create_task(commands()),
             asyncio.create_task(stop.wait())]
    await asyncio.wait(tasks[1:], return_when=asyncio.FIRST_COMPLETED)
    for task in [starter, *tasks]:
        task.cancel()
    await asyncio.gather(starter, *tasks, return_exceptions=True)
    try:
        await asyncio.wait_for(
            asyncio.gather(*(p.stop() for p in posts.values()), return_exceptions=True), 15)
    except TimeoutError:
        print("worker: not every agent stopped within 15 s", file=sys.stderr)
    out.line(t="stopped")
    flusher.cancel()
    out.flush()
    return 0


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alarm_path --worker")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--deployment", type=Path, required=True)
    parser.add_argument("--ids", type=Path, required=True, help="JSON list of post ids")
    parser.add_argument("--ramp", type=float, default=0.0, help="posts started per second")
    parser.add_argument("--outbox-dir", type=Path, help="keep the outboxes here, not in the deployment")
    parser.add_argument("--gc", choices=["off", "freeze", "on"], default="off",
                        help="the garbage collector once every post is connected")
    args = parser.parse_args(argv)
    # A fleet in one process would log a thousand posts' lines: warnings and worse only.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    ids = json.loads(args.ids.read_text())
    return asyncio.run(_worker(args.deployment, ids, args.ramp, args.outbox_dir, args.gc))


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
