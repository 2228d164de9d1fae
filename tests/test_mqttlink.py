"""The one MQTT link (mqttlink): its settings, its states, the backoff, session resumption, typed
errors and a prompt stop, against a real private Mosquitto (the backoff's clock faked where the
passing of time is the point)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest

from mqttlink import (
    SESSION_TAKEN_OVER,
    Backoff,
    ConnectFailed,
    ConnectionDropped,
    HandlerFault,
    LinkError,
    LinkState,
    MqttLink,
    MqttSettings,
    NotAuthorised,
)
from protocol.settings import ConfigError, load, redacted
from protocol.topics import post_topic
from provisioning import deployment as d
from tests.helpers import RawMqtt, monitor_credentials, post_credentials

# The broker, the edge or the UI: the server's storage is not what these test.
pytestmark = pytest.mark.one_backend

OnConnected = Callable[[aiomqtt.Client, bool], Awaitable[None]]


def _settings(dep: d.Deployment, user: str, password: str, **kwargs: object) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=dep.broker_port, username=user, password=password,
                        **kwargs)  # type: ignore[arg-type]


def _server_account(dep: d.Deployment) -> tuple[str, str]:
    """The server's own account (no server runs in these tests, so nobody is kicked off)."""
    mqtt = tomllib.loads(dep.server_config.read_text())["mqtt"]
    return str(mqtt["username"]), str(mqtt["password"])


async def _forever(client: aiomqtt.Client, session_present: bool) -> None:
    await asyncio.Event().wait()


class _FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def _running(link: MqttLink) -> AsyncIterator[list[tuple[LinkState, LinkError | None]]]:
    """Run the link; yield the states it goes through; stop it (and it must stop) at the end."""
    seen: list[tuple[LinkState, LinkError | None]] = []
    link.state_listeners.append(lambda state, error: seen.append((state, error)))
    task = asyncio.create_task(link.run())
    try:
        yield seen
    finally:
        link.stop()
        await asyncio.wait_for(task, 10)
    assert link.state is LinkState.STOPPED and seen[-1] == (LinkState.STOPPED, None)


async def _until(predicate: Callable[[], object], within: float, what: str,
                 link: MqttLink) -> None:
    """Wait for ``predicate``, woken by each state change of ``link``."""
    changed = asyncio.Event()
    link.state_listeners.append(lambda state, error: changed.set())
    deadline = time.monotonic() + within
    while not predicate():
        changed.clear()
        try:
            await asyncio.wait_for(changed.wait(), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise AssertionError(f"timed out after {within} s waiting for {what}; states: "
                                 f"{[t.state.name for t in link.history]}") from None


# ---------------------------------------------------------------------------- settings
def test_settings_load_every_programs_mqtt_section_and_name_the_key_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep = d.create(tmp_path / "dep", d.district_posts(1))
    post = MqttSettings.from_section(tomllib.loads(dep.post_config("P001").read_text())["mqtt"])
    assert (post.port, post.password != "", post.clean_start) == (dep.broker_port, True, False)
    server = MqttSettings.from_section(tomllib.loads(dep.server_config.read_text())["mqtt"],
                                       defaults={"username": "server",
                                                 "client_id": "alarmpost-server"})
    assert server.username == "server" and server.identifier == "alarmpost-server"
    assert MqttSettings(username="P001").identifier == "P001"  # no client id: the user name

    def refused(section: dict[str, object], match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            MqttSettings.from_section(section)

    refused({"prot": 1883}, r"unknown key\(s\) \['prot'\] in \[mqtt\]")
    refused({"port": "many"}, r"\[mqtt\] port: expected an integer, got 'many'")
    refused({"port": 0}, r"\[mqtt\] port must be between 1 and 65535, got 0")
    refused({"keepalive_s": True}, r"\[mqtt\] keepalive_s: expected an integer")
    refused({"keepalive_s": 70000}, r"keepalive_s must be between 1 and 65535")
    refused({"session_expiry_s": -1}, r"session_expiry_s must be between 0 and 4294967295")
    refused({"clean_start": "perhaps"}, r"\[mqtt\] clean_start: expected true or false")
    refused({"host": " "}, r"\[mqtt\] host is empty")
    refused({"tls_cert_file": "c.pem"}, r"tls_cert_file is set but tls_ca_file is not")
    refused({"host": ["a"]}, r"\[mqtt\] host: expected a string")
    with pytest.raises(ConfigError, match=r"\[mqtt\] port: expected an integer"):
        MqttSettings(port="1883")  # type: ignore[arg-type]
    assert MqttSettings.from_section({"port": "2883", "clean_start": "yes"}).port == 2883

    # As a section of a program's configuration: the file and the environment, then checked.
    @dataclasses.dataclass
    class Program:
        mqtt: MqttSettings = dataclasses.field(default_factory=MqttSettings)

    path = tmp_path / "program.toml"
    path.write_text('[mqtt]\nhost = "broker.local"\npassword = "s3cret-pw"\n')
    monkeypatch.setenv("ALARMPOST_X_MQTT_PORT", "8883")
    program = load(Program, path, "ALARMPOST_X")
    assert (program.mqtt.host, program.mqtt.port) == ("broker.local", 8883)
    assert redacted(program)["mqtt"]["password"] == "***"
    monkeypatch.setenv("ALARMPOST_X_MQTT_PORT", "0")
    with pytest.raises(ConfigError, match="port must be between"):
        load(Program, path, "ALARMPOST_X")

    # The password never shows, and the settings cannot be changed under a running link.
    secret = program.mqtt
    assert "s3cret-pw" not in repr(secret) + str(secret) + secret.describe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        secret.port = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------- states, backoff
async def test_backoff_doubles_on_refusals_and_starts_over_after_a_connection_that_lived(
    deployment: d.Deployment,
) -> None:
    """Refused credentials: typed NotAuthorised, each wait twice the last up to the cap. A good
    connection that ends at once keeps doubling; one that lived (on the faked clock) starts the
    next wait over, unless the owner held the backoff (a clone took its session)."""
    user, password = post_credentials(deployment, "P001")
    clock = _FakeClock()
    refused = MqttLink(_settings(deployment, user, "wrong password"), _forever,
                       backoff=Backoff(initial_s=0.02, cap_s=0.16, lived_s=60, jitter=0,
                                       clock=clock))
    async with _running(refused) as seen:
        await _until(lambda: refused.counts["refused_not_authorised"] >= 5, 10, "5 refusals",
                     refused)
        assert refused.state is not LinkState.CONNECTED
    waits = [t.retry_in for t in refused.history if t.state is LinkState.BACKING_OFF]
    assert waits[:5] == [0.02, 0.04, 0.08, 0.16, 0.16]
    errors = [e for s, e in seen if s is LinkState.BACKING_OFF]
    assert all(isinstance(e, NotAuthorised) and e.code in {0x86, 0x87} for e in errors), errors
    assert [s for s, _ in seen[:4]] == [LinkState.CONNECTING, LinkState.BACKING_OFF,
                                        LinkState.CONNECTING, LinkState.BACKING_OFF]

    connections = 0

    async def on_connected(client: aiomqtt.Client, session_present: bool) -> None:
        nonlocal connections
        connections += 1
        assert link.state is LinkState.CONNECTED and link.event(LinkState.CONNECTED).is_set()
        assert not link.event(LinkState.CONNECTING).is_set()
        if connections == 4:
            clock.now += 60  # this connection lived
        if connections == 5:
            link.hold_backoff()
            clock.now += 60  # lived too, but the owner says it proves nothing
        if connections == 6:
            await asyncio.Event().wait()  # stays up until stop()

    link = MqttLink(_settings(deployment, user, password), on_connected,
                    backoff=Backoff(initial_s=0.02, cap_s=1.0, lived_s=60, jitter=0, clock=clock))
    async with _running(link) as seen:
        await _until(lambda: connections >= 6 and link.connected, 10, "the sixth connection",
                     link)
    waits = [t.retry_in for t in link.history if t.state is LinkState.BACKING_OFF]
    assert waits == [0.02, 0.04, 0.08, 0.02, 0.04]
    assert [s for s, _ in seen] == (
        [LinkState.CONNECTING, LinkState.CONNECTED, LinkState.BACKING_OFF] * 5
        + [LinkState.CONNECTING, LinkState.CONNECTED, LinkState.STOPPED]
    )
    assert all(e is None for _, e in seen)  # on_connected returned: not an error
    assert link.counts["handler_returned"] == 5 and link.counts["connected"] == 6


async def test_unreachable_broker_is_a_connect_failure() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once it is closed
    link = MqttLink(MqttSettings(port=port, username="P001"), _forever,
                    backoff=Backoff(initial_s=5.0, jitter=0))
    async with _running(link) as seen:
        await link.wait_for(LinkState.BACKING_OFF, 10)
    assert isinstance(seen[1][1], ConnectFailed) and "no connection to" in str(seen[1][1])
    assert link.counts["unreachable"] == 1


async def test_a_handler_fault_is_typed_and_the_link_goes_on(deployment: d.Deployment) -> None:
    user, password = post_credentials(deployment, "P001")
    calls = 0

    async def on_connected(client: aiomqtt.Client, session_present: bool) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the owner")
        await asyncio.Event().wait()

    link = MqttLink(_settings(deployment, user, password), on_connected,
                    backoff=Backoff(initial_s=0.01, jitter=0))
    async with _running(link) as seen:
        await _until(lambda: calls == 2 and link.connected, 10, "connected again", link)
    fault = next(e for s, e in seen if s is LinkState.BACKING_OFF)
    assert isinstance(fault, HandlerFault) and isinstance(fault.error, RuntimeError)
    assert link.counts["handler_faults"] == 1


# ---------------------------------------------------------------------------- the session
async def test_a_reconnect_resumes_the_session_and_gets_what_was_queued_meanwhile(
    deployment: d.Deployment,
) -> None:
    """Connect, subscribe at QoS 1, disconnect; another client publishes to it while the link is
    away; the next connection finds the session present and the message delivered."""
    user, password = post_credentials(deployment, "P001")
    ack_topic = post_topic("P001", "ack")
    first: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def subscribe(client: aiomqtt.Client, session_present: bool) -> None:
        sock = client._client.socket()
        assert isinstance(sock, socket.socket)  # TCP_NODELAY: protocol.transport.SOCKET_OPTIONS
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await client.subscribe(ack_topic, qos=1)
        first.set_result(session_present)
        await asyncio.Event().wait()

    settings = _settings(deployment, user, password)
    async with _running(MqttLink(settings, subscribe)):
        assert await asyncio.wait_for(first, 10) is False  # a fresh broker: a new session

    server = await asyncio.to_thread(RawMqtt, deployment, *_server_account(deployment), "server")
    try:
        assert await asyncio.to_thread(server.publish, ack_topic, b"queued while away") == 0
    finally:
        await asyncio.to_thread(server.close)

    got: asyncio.Future[tuple[bool, str, bytes]] = asyncio.get_running_loop().create_future()

    async def read(client: aiomqtt.Client, session_present: bool) -> None:
        async for message in client.messages:  # no subscribe: the session still has it
            assert isinstance(message.payload, bytes)
            got.set_result((session_present, str(message.topic), message.payload))
            await asyncio.Event().wait()

    link = MqttLink(settings, read)
    async with _running(link):
        assert await asyncio.wait_for(got, 10) == (True, ack_topic, b"queued while away")
        assert link.session_present is True and link.counts["sessions_resumed"] == 1


async def test_a_dropped_connection_is_typed_leaves_its_will_and_the_link_comes_back(
    deployment: d.Deployment,
) -> None:
    """Another client with the same credential takes the session (the broker makes the user
    name the client id): the link's connection is dropped, the broker publishes its Last Will,
    and once the other client has gone the link is connected again."""
    user, password = post_credentials(deployment, "P001")
    status = post_topic("P001", "status")
    watcher = await asyncio.to_thread(RawMqtt, deployment, *monitor_credentials(deployment),
                                      "monitor")
    await asyncio.to_thread(watcher.subscribe, status)
    link = MqttLink(_settings(deployment, user, password), _forever,
                    will=lambda: aiomqtt.Will(status, b"will", qos=1, retain=True),
                    backoff=Backoff(initial_s=0.3, jitter=0))
    try:
        async with _running(link) as seen:
            await link.wait_for(LinkState.CONNECTED, 10)
            other = await asyncio.to_thread(RawMqtt, deployment, user, password, "clone")
            await link.wait_for(LinkState.BACKING_OFF, 10)
            await asyncio.to_thread(watcher.wait_received, status, 5, b"will")
            await asyncio.to_thread(other.close)
            await _until(lambda: link.counts["connected"] >= 2 and link.connected, 10,
                         "connected again", link)
    finally:
        await asyncio.to_thread(watcher.close)
    dropped = next(e for s, e in seen if s is LinkState.BACKING_OFF)
    # Mosquitto 2.0.11 just closes the socket; brokers that follow MQTT 5 say 0x8E first.
    assert isinstance(dropped, ConnectionDropped), dropped
    assert link.counts["dropped"] >= 1


async def test_the_broker_saying_session_taken_over_is_read_from_paho() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from mqttlink._client import LinkClient

    client = LinkClient("127.0.0.1")
    client._on_disconnect(None, None, None, ReasonCode(PacketTypes.DISCONNECT, "Session taken over"))
    assert client.disconnect_reason == SESSION_TAKEN_OVER
    assert ConnectionDropped("lost", client.disconnect_reason).taken_over
    assert not ConnectionDropped("lost", 0x80).taken_over


async def test_a_clean_stop_says_goodbye_and_sends_no_will(deployment: d.Deployment) -> None:
    user, password = post_credentials(deployment, "P001")
    status = post_topic("P001", "status")
    refused: list[int] = []
    was_refused = asyncio.Event()

    def on_refused(code: int) -> None:
        refused.append(code)
        was_refused.set()

    async def publish_elsewhere(client: aiomqtt.Client, session_present: bool) -> None:
        await client.publish(post_topic("P002", "event"), b"{}", qos=1)  # not this post's
        await asyncio.Event().wait()

    async def goodbye(client: aiomqtt.Client) -> None:
        await client.publish(status, b"bye", qos=1, retain=True)

    watcher = await asyncio.to_thread(RawMqtt, deployment, *monitor_credentials(deployment),
                                      "monitor")
    server = await asyncio.to_thread(RawMqtt, deployment, *_server_account(deployment), "server")
    try:
        await asyncio.to_thread(watcher.subscribe, status)
        link = MqttLink(_settings(deployment, user, password), publish_elsewhere,
                        will=aiomqtt.Will(status, b"will", qos=1, retain=True),
                        before_disconnect=goodbye, on_publish_refused=on_refused)
        async with _running(link):
            await asyncio.wait_for(was_refused.wait(), 10)
        assert refused == [0x87] and link.counts["publish_refused"] == 1
        await asyncio.to_thread(watcher.wait_received, status, 5, b"bye")
        # Anything the broker sent on the topic after our DISCONNECT comes before this marker.
        assert await asyncio.to_thread(server.publish, status, b"marker") == 0
        await asyncio.to_thread(watcher.wait_received, status, 5, b"marker")
        assert (status, b"will") not in watcher.received
    finally:
        await asyncio.to_thread(watcher.close)
        await asyncio.to_thread(server.close)


# ---------------------------------------------------------------------------- stopping
async def test_stop_returns_promptly_while_backing_off_and_while_connecting(
    deployment: d.Deployment,
) -> None:
    user, _ = post_credentials(deployment, "P001")
    link = MqttLink(_settings(deployment, user, "wrong password"), _forever,
                    backoff=Backoff(initial_s=60, jitter=0))
    task = asyncio.create_task(link.run())
    await link.wait_for(LinkState.BACKING_OFF, 10)
    started = time.monotonic()
    link.stop()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 0.5 and link.state is LinkState.STOPPED

    # A "broker" that takes the connection and never answers CONNECT.
    accepted = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        accepted.set()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    link = MqttLink(MqttSettings(port=port, username="P001"), _forever, timeout_s=1.0)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(accepted.wait(), 10)
        assert link.event(LinkState.CONNECTING).is_set()
        started = time.monotonic()
        link.stop()
        await asyncio.wait_for(task, 5)
        assert time.monotonic() - started < 0.5 and link.state is LinkState.STOPPED
        # The abandoned attempt ends by its own time-out, without the link waiting for it.
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=5)
    finally:
        for writer in writers:
            writer.close()
        listener.close()
        await listener.wait_closed()
    assert link.counts["connected"] == 0


async def test_one_link_runs_once() -> None:
    link = MqttLink(MqttSettings(username="P001"), _forever)
    link.stop()
    await asyncio.wait_for(link.run(), 5)  # stopped before it ran: returns at once
    assert [t.state for t in link.history] == [LinkState.STOPPED]
    with pytest.raises(RuntimeError, match="already running or has run"):
        await link.run()


async def test_cancelling_run_closes_the_connection_at_once(deployment: d.Deployment) -> None:
    from mqttlink._client import LinkClient

    user, password = post_credentials(deployment, "P001")
    got: asyncio.Future[aiomqtt.Client] = asyncio.get_running_loop().create_future()

    async def on_connected(client: aiomqtt.Client, session_present: bool) -> None:
        got.set_result(client)
        await asyncio.Event().wait()

    link = MqttLink(_settings(deployment, user, password), on_connected)
    task = asyncio.create_task(link.run())
    client = await asyncio.wait_for(got, 10)
    assert isinstance(client, LinkClient)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert link.state is LinkState.STOPPED and link.client is None
    done, _ = await asyncio.wait({client.dropped}, timeout=5)
    assert done, "the connection was left open"
