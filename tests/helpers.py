"""Helpers for the tests: real processes, polling of cross-process state, API calls."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self

import aiohttp

from alarmpost_cli import harness
from firmware_sim.fleet import SimPost
from provisioning import deployment as d
from server.app import CentralServer
from server.config import load_server_config

ALARMPOST = [sys.executable, "-m", "alarmpost_cli.main"]


async def until(predicate: Callable[[], Any], within: float = 10.0, what: str = "condition") -> Any:
    """Poll a cross-process condition (a database row, an HTTP answer) until true or time out."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)


MakeDeployment = Callable[..., d.Deployment]


# Counters of faults in our own code (not in the input): a handler that raised, a session that
# failed. The server and the agents survive them by design, which is exactly why a test must
# look: a bug that the next reconnect papers over still delays an alarm.
AGENT_BUG_COUNTERS = ("session_errors", "handler_errors", "listener_errors", "call_task_errors",
                      "storage_watch_errors")


def assert_no_internal_errors(server: CentralServer | None = None,
                              agents: Iterable[Any] = ()) -> None:
    if server is not None:
        errors = server.metrics._counters.get("handler_errors_total", {})
        assert not any(errors.values()), f"the server's handlers failed: {dict(errors)}"
    for agent in agents:
        bugs = {k: agent.counters[k] for k in AGENT_BUG_COUNTERS if agent.counters[k]}
        assert not bugs, f"post {agent.post_id}: {bugs}"


class run_server:
    """``async with run_server(dep) as server``: in-process server, stopped cleanly on exit.
    On a clean exit it also checks that no handler failed (``expect_errors=True`` for tests
    that make one fail on purpose)."""

    def __init__(self, dep: d.Deployment, expect_errors: bool = False) -> None:
        self.server = CentralServer(load_server_config(dep.server_config))
        self.expect_errors = expect_errors

    async def __aenter__(self) -> CentralServer:
        self.task = asyncio.create_task(self.server.run())
        await asyncio.wait_for(self.server.ready.wait(), 10)
        return self.server

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        self.server.stop()
        await asyncio.wait_for(self.task, 10)
        if exc_type is None and not self.expect_errors:
            assert_no_internal_errors(self.server)


class run_posts:
    """``async with run_posts(dep, "P001", ...) as posts``: in-process agents on mock pins."""

    def __init__(self, dep: d.Deployment, *ids: str, connect: bool = True,
                 expect_errors: bool = False, **overrides: Any) -> None:
        self.posts: dict[str, SimPost] = {}
        self.connect = connect
        self.expect_errors = expect_errors
        for post_id in ids or [p.id for p in dep.posts]:
            post = SimPost.from_file(dep.post_config(post_id))
            for key, value in overrides.items():
                section, name = key.split("__")
                part = getattr(post.config, section)
                if type(part).__dataclass_params__.frozen:  # [mqtt] is mqttlink.MqttSettings
                    setattr(post.config, section, dataclasses.replace(part, **{name: value}))
                else:
                    setattr(part, name, value)
            self.posts[post_id] = post

    async def __aenter__(self) -> dict[str, SimPost]:
        for post in self.posts.values():
            post.start()
        await asyncio.wait_for(
            asyncio.gather(*(p.agent.started.wait() for p in self.posts.values())), 10
        )
        if self.connect:
            await asyncio.wait_for(
                asyncio.gather(*(p.agent.connected.wait() for p in self.posts.values())), 10
            )
        return self.posts

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        await asyncio.gather(*(p.stop() for p in self.posts.values()))
        if exc_type is None and not self.expect_errors:
            assert_no_internal_errors(agents=[p.agent for p in self.posts.values()])


class ServerProcess(harness.ServerProcess):
    """``alarmpost server`` for a deployment as a real child process (to be SIGKILLed,
    SIGSTOPped...), through the process harness."""

    def __init__(self, dep: d.Deployment, log_path: Path) -> None:
        super().__init__(dep.server_config, log_path)
        self.dep = dep


# ---------------------------------------------------------------------------- brokers
# The broker of each deployment a test made (``make_deployment``), by its directory, so a test
# can stop, restart, reload or read the log of its deployment's broker.
_brokers: dict[Path, harness.Mosquitto] = {}


def broker_of(dep: d.Deployment) -> harness.Mosquitto:
    """The Mosquitto of ``dep`` (the one ``make_deployment`` started, or a new, stopped handle)."""
    broker = _brokers.get(dep.broker_dir)
    if broker is None:
        broker = _brokers[dep.broker_dir] = harness.Mosquitto.for_deployment(dep)
    return broker


def forget_broker(dep: d.Deployment) -> harness.Mosquitto | None:
    """Stop ``dep``'s broker if it runs and forget it (the fixture's teardown)."""
    broker = _brokers.pop(dep.broker_dir, None)
    if broker is not None:
        broker.stop()
    return broker


class SimProcess:
    """``alarmpost sim --control`` as a child process: commands in, JSON lines out."""

    def __init__(self, dep: d.Deployment, ids: list[str], log_path: Path) -> None:
        self.dep, self.ids, self.log_path = dep, ids, log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *ALARMPOST, "sim", "--deployment", str(self.dep.directory), "--control",
            "--only", *self.ids,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
        )
        log.close()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.lines.append(json.loads(line))
            self._changed.set()

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], count: int = 1,
                       within: float = 15.0) -> list[dict[str, Any]]:
        async def wait() -> list[dict[str, Any]]:
            while True:
                found = [line for line in self.lines if predicate(line)]
                if len(found) >= count:
                    return found
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(wait(), within)
        except TimeoutError:
            raise AssertionError(
                f"sim did not print {count} matching lines in {within} s; got {self.lines[-5:]}\n"
                + self.log_path.read_text()[-3000:]
            ) from None

    async def send(self, command: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with_suppress = self.proc
            try:
                with_suppress.send_signal(signal.SIGCONT)
                with_suppress.kill()
            except ProcessLookupError:
                pass
            await with_suppress.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def api(dep: d.Deployment, path: str, token: str | None = None) -> Any:
    """GET a server endpoint with the deployment's token; JSON or text back."""
    headers = {"Authorization": f"Bearer {dep.api_token if token is None else token}"}
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{dep.http_port}{path}", headers=headers
    ) as resp:
        if resp.content_type == "application/json":
            return await resp.json()
        return await resp.text()


def db_rows(dep: d.Deployment, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read the server's database directly (a separate, read-only connection, as an auditor
    would), on whichever backend the deployment's server uses."""
    from server.config import load_server_config
    from server.storage import open_database

    settings = load_server_config(dep.server_config).database
    if settings.backend == "sqlite" and not Path(settings.path).exists():
        return []
    db = open_database(settings, read_only=True)
    try:
        return [tuple(row.values()) for row in db.query(sql, params)]
    finally:
        db.close()


os.environ.setdefault("PYTHONUNBUFFERED", "1")


class BrowserClient:
    """A browser-like client of one of the server's web apps (``prefix`` "/console" or
    "/patrol"): its own cookie jar, the session's CSRF token, same-origin headers."""

    prefix = ""
    login_field = "name"
    default_password = ""

    def __init__(self, dep: d.Deployment) -> None:
        self.base = f"http://127.0.0.1:{dep.http_port}"
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    @property
    def origin(self) -> dict[str, str]:
        return {"Origin": self.base}

    async def login(self, who: str, password: str | None = None) -> aiohttp.ClientResponse:
        """Fetch the login page (its pre-login CSRF token), then log in as ``who``."""
        async with self.http.get(f"{self.base}{self.prefix}/login") as resp:
            page = await resp.text()
        match = re.search(r'name="csrf" content="([^"]+)"', page)
        assert match, page[:300]
        credentials = {self.login_field: who,
                       "password": self.default_password if password is None else password}
        async with self.http.post(
            f"{self.base}{self.prefix}/api/login", json=credentials,
            headers={"X-CSRF-Token": match.group(1), **self.origin},
        ) as resp:
            if resp.status == 200:
                self.csrf = (await resp.json())["csrf"]
            await resp.read()
            return resp

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(f"{self.base}{path}", allow_redirects=False) as resp:
            body = await resp.json() if resp.content_type == "application/json" else await resp.text()
            return resp.status, body

    async def post(self, path: str, body: Any = None, *, csrf: str | None = None,
                   origin: str | None = None, raw: bytes | None = None) -> tuple[int, Any]:
        headers = {"Origin": origin if origin is not None else self.base}
        token = self.csrf if csrf is None else csrf
        if token:
            headers["X-CSRF-Token"] = token
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else {
            "json": body if body is not None else {}}
        async with self.http.post(f"{self.base}{path}", headers=headers, allow_redirects=False,
                                  **kwargs) as resp:
            data = await resp.json() if resp.content_type == "application/json" else await resp.text()
            return resp.status, data

    async def ws(self, *, csrf: str | None = None,
                 origin: str | None = None) -> aiohttp.ClientWebSocketResponse:
        token = self.csrf if csrf is None else csrf
        return await self.http.ws_connect(
            f"{self.base}{self.prefix}/ws?csrf={token}",
            headers={"Origin": origin if origin is not None else self.base},
        )


# ---------------------------------------------------------------------------- MQTT accounts
def post_credentials(dep: d.Deployment, post_id: str) -> tuple[str, str]:
    """(user, password) of a post's broker account, from its config file."""
    import tomllib

    return post_id, str(tomllib.loads(dep.post_config(post_id).read_text())["mqtt"]["password"])


def monitor_credentials(dep: d.Deployment) -> tuple[str, str]:
    """(user, password) of the deployment's read-only ``monitor`` account."""
    from provisioning.broker import MONITOR_USER

    return d.account_credentials(dep, MONITOR_USER)


def server_side_credentials(dep: d.Deployment, name: str = "server-2") -> tuple[str, str]:
    """(user, password) of an extra server-side account (the server's ACL), made on first use.

    The broker client id is the user name, so a tool that publishes as the server side needs an
    account of its own: borrowing the server's would disconnect the server. A running broker is
    reloaded, and this returns once it has re-read its password and ACL files.
    """
    if not d.account_config(dep, name).exists():
        d.add_server_account(dep, name)
        broker = broker_of(dep)
        if broker.running:
            broker.reload_and_wait()
    return d.account_credentials(dep, name)


class RawMqtt:
    """A bare MQTT 5 client (paho, in its own thread) that shows what the broker did: CONNACK,
    PUBACK and DISCONNECT reason codes. Blocking methods: call them with ``asyncio.to_thread``."""

    def __init__(self, dep: d.Deployment, user: str, password: str, client_id: str, *,
                 clean_start: bool = True) -> None:
        import threading

        import paho.mqtt.client as paho

        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=paho.MQTTv5)
        self.client.username_pw_set(user, password)
        self.connack: int | None = None
        self.assigned_id = ""  # the client id the broker says it gave us (MQTT 5), if any
        self.acks: dict[int, int] = {}
        self.received: list[tuple[str, bytes]] = []
        self.disconnects: list[int] = []
        self._cond = threading.Condition()

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            with self._cond:
                self.connack = int(reason.value)
                self.assigned_id = str(getattr(props, "AssignedClientIdentifier", "") or "")
                self._cond.notify_all()

        def on_disconnect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            with self._cond:
                self.disconnects.append(int(reason.value))
                self._cond.notify_all()

        def on_publish(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            with self._cond:
                self.acks[mid] = int(reason.value)
                self._cond.notify_all()

        def on_subscribe(client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
            with self._cond:
                self.acks[mid] = int(reasons[0].value)
                self._cond.notify_all()

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            with self._cond:
                self.received.append((message.topic, bytes(message.payload)))
                self._cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_disconnect = on_disconnect
        self.client.on_publish = on_publish
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", dep.broker_port, clean_start=clean_start)
        self.client.loop_start()
        with self._cond:
            assert self._cond.wait_for(lambda: self.connack is not None, 5), "no CONNACK"

    def publish(self, topic: str, payload: bytes, *, within: float = 5.0) -> int:
        """Publish QoS 1; return the broker's PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self.acks, within), f"no PUBACK on {topic}"
            return self.acks[info.mid]

    def subscribe(self, topic: str) -> None:
        """Subscribe (QoS 1) and wait for the broker's SUBACK."""
        _, mid = self.client.subscribe(topic, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self.acks, 5), "no SUBACK"

    def wait_received(self, topic: str, within: float = 5.0, payload: bytes | None = None) -> bytes:
        """The first message on ``topic`` (with exactly ``payload``, if given)."""
        def found() -> bytes | None:
            return next((p for t, p in self.received
                         if t == topic and (payload is None or p == payload)), None)

        with self._cond:
            assert self._cond.wait_for(lambda: found() is not None, within), f"nothing on {topic}"
            got = found()
            assert got is not None
            return got

    def wait_disconnected(self, within: float = 5.0) -> int | None:
        """The broker's DISCONNECT reason code, or None if still connected after ``within`` s."""
        with self._cond:
            if self._cond.wait_for(lambda: bool(self.disconnects), within):
                return self.disconnects[0]
            return None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
