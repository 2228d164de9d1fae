"""Technician flow: generated files, a new post joining a running deployment."""

from __future__ import annotations

import asyncio
import base64
import signal
import stat
import time
import tomllib
from pathlib import Path

import pytest

from protocol.messages import Command, Event, encode
from protocol.settings import ConfigError
from protocol.topics import post_topic
from protocol.ulid import new_ulid
from provisioning import deployment as d
from provisioning.broker import LISTENER_OPTIONS, MAX_PACKET_BYTES, config_text
from provisioning.credentials import mosquitto_hash, mosquitto_verify
from server.app import CentralServer
from tests.helpers import (
    RawMqtt,
    ServerProcess,
    broker_of,
    db_rows,
    monitor_credentials,
    post_credentials,
    run_posts,
    server_side_credentials,
    until,
)


def test_password_hashes_are_mosquittos_format() -> None:
    encoded = mosquitto_hash("s3cret")
    kind, iterations, salt, digest = encoded.split("$")[1:]
    assert (kind, iterations) == ("7", "101")
    assert len(base64.b64decode(salt)) == 12 and len(base64.b64decode(digest)) == 64
    assert mosquitto_verify("s3cret", encoded) and not mosquitto_verify("other", encoded)


def test_generated_deployment_keeps_secrets_private(tmp_path: Path) -> None:
    dep = d.create(tmp_path / "dep", d.district_posts(3))
    for path in [dep.server_config, dep.post_config("P001"), dep.broker_dir / "passwd",
                 d.account_config(dep, "monitor")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    passwd = (dep.broker_dir / "passwd").read_text()
    assert [p.id for p in d.open_deployment(dep.directory).posts] == ["P001", "P002", "P003"]
    assert "password" not in passwd and passwd.count("$7$101$") == 5  # server, monitor, 3 posts
    acl = (dep.broker_dir / "acl").read_text()
    assert "pattern write alarmpost/v1/post/%u/event" in acl
    # Posts never get more than they need: read and write only on their own status (a post
    # sees there a clone of itself announce itself), one direction everywhere else.
    assert [line for line in acl.splitlines() if line.startswith("pattern readwrite")] == [
        "pattern readwrite alarmpost/v1/post/%u/status"]


async def test_new_post_joins_a_running_deployment(deployment: d.Deployment, tmp_path: Path) -> None:
    server = ServerProcess(deployment, tmp_path / "server.log")
    server.start()
    try:
        await server.wait_ready()
        spec = d.PostSpec(id="GATE-9", name="East gate", school="Jin'an No. 9 School",
                          address="9 Hualin Rd", lat=26.09, lon=119.31)
        d.add_post(deployment, spec, heartbeat_s=1.0, ack_timeout_s=0.5, hardware_backend="mock")
        broker_of(deployment).reload()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        await until(lambda: "registry: 4 posts" in server.log_path.read_text(), 10,
                    "server reloaded its registry")
        async with run_posts(deployment, "GATE-9") as posts:
            await posts["GATE-9"].press()
            await until(lambda: posts["GATE-9"].agent.outbox_depth == 0, 10, "ACK for GATE-9")
        assert db_rows(deployment, "SELECT post_id FROM events") == [("GATE-9",)]
    finally:
        assert server.stop() == 0


def test_deployment_for_a_lan_broker(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--broker-host"):
        d.create(tmp_path / "a", d.district_posts(1), listen="0.0.0.0", tls=True)
    # Plain TCP off loopback only when explicitly opened: it carries passwords in clear.
    with pytest.raises(ConfigError, match="in clear"):
        d.create(tmp_path / "c", d.district_posts(1), listen="0.0.0.0",
                 broker_host="alarms.example.org")
    assert not (tmp_path / "c").exists()
    dep = d.create(tmp_path / "b", d.district_posts(1), listen="0.0.0.0",
                   broker_host="alarms.example.org", tls=True)
    assert "tls_version tlsv1.2" in (dep.broker_dir / "mosquitto.conf").read_text()
    conf = (dep.broker_dir / "mosquitto.conf").read_text()
    assert f"listener {dep.broker_port} 0.0.0.0" in conf
    post = tomllib.loads(dep.post_config("P001").read_text())
    assert post["mqtt"]["host"] == "alarms.example.org"
    server = tomllib.loads(dep.server_config.read_text())
    assert server["mqtt"]["host"] == "127.0.0.1"  # beside the broker
    again = d.open_deployment(dep.directory)
    assert (again.listen, again.broker_host, again.tls) == ("0.0.0.0", "alarms.example.org", True)
    opened = d.create(tmp_path / "d", d.district_posts(1), listen="0.0.0.0",
                      broker_host="10.20.0.5", insecure_open=True)
    assert not opened.tls and "cafile" not in (opened.broker_dir / "mosquitto.conf").read_text()


def test_broker_config_binds_client_ids_to_user_names_and_bounds_packets(tmp_path: Path) -> None:
    dep = d.create(tmp_path / "dep", d.district_posts(1))
    lines = (dep.broker_dir / "mosquitto.conf").read_text().splitlines()
    listener = lines.index(f"listener {dep.broker_port} 127.0.0.1")
    assert lines[listener + 1] == "use_username_as_clientid true"
    assert f"max_packet_size {MAX_PACKET_BYTES}" in lines
    # A listener added through config_text gets the per-listener options too.
    extra = config_text(port=1, directory=tmp_path, extra_listeners=["listener 8883 0.0.0.0",
                                                                      "cafile /ca.crt"])
    lines = extra.splitlines()
    at = lines.index("listener 8883 0.0.0.0")
    assert lines[at + 1: at + 1 + len(LISTENER_OPTIONS)] == list(LISTENER_OPTIONS)


def test_tool_accounts_are_provisioned_and_names_stay_apart(tmp_path: Path) -> None:
    dep = d.create(tmp_path / "dep", d.district_posts(1))
    acl = (dep.broker_dir / "acl").read_text()
    assert "user monitor\ntopic deny alarmpost/v1/post/monitor/#" in acl
    assert "user monitor\ntopic readwrite" not in acl
    path = d.add_server_account(dep, "server-2")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "user server-2\ntopic readwrite alarmpost/v1/#" in (dep.broker_dir / "acl").read_text()
    assert "user monitor" in (dep.broker_dir / "acl").read_text()  # still there after the rewrite
    for bad in ["server", "server-2", "P001", "monitor", "server-a/b", "team-A"]:
        with pytest.raises(ConfigError):
            d.add_server_account(dep, bad)
    for taken in ["monitor", "server-9", "Server-9"]:
        with pytest.raises(ConfigError, match="reserved"):
            d.add_post(dep, d.PostSpec(id=taken, name="x", school="x", address="x", lat=26.0,
                                       lon=119.0))


async def test_monitor_reads_everything_and_writes_nothing(
    deployment: d.Deployment, server: CentralServer
) -> None:
    monitor = await asyncio.to_thread(RawMqtt, deployment, *monitor_credentials(deployment),
                                      "bench-monitor")
    post = await asyncio.to_thread(RawMqtt, deployment, *post_credentials(deployment, "P001"),
                                   "P001")
    try:
        assert monitor.connack == 0
        await asyncio.to_thread(monitor.subscribe, "alarmpost/v1/#")
        event = encode(Event(id=new_ulid(), post="P001", seq=1, ts=time.time()))
        assert await asyncio.to_thread(post.publish, post_topic("P001", "event"), event) == 0
        assert await asyncio.to_thread(monitor.wait_received, post_topic("P001", "event")) == event
        await asyncio.to_thread(monitor.wait_received, post_topic("P001", "ack"))  # the server's
        for topic in [post_topic("P001", "event"), post_topic("P001", "ack"),
                      post_topic("P001", "cmd"), "alarmpost/v1/server/status",
                      "alarmpost/v1/post/monitor/event", "alarmpost/v1/team/monitor/answer"]:
            assert await asyncio.to_thread(monitor.publish, topic, b"{}") == 0x87, topic
        assert monitor.disconnects == [] and post.disconnects == []
    finally:
        await asyncio.to_thread(monitor.close)
        await asyncio.to_thread(post.close)
    assert db_rows(deployment, "SELECT COUNT(*) FROM events") == [(1,)]


async def test_a_server_side_account_speaks_as_the_server_without_disturbing_it(
    deployment: d.Deployment, server: CentralServer
) -> None:
    """An extra account made while the broker runs: the server's ACL, its own session."""
    user, password = server_side_credentials(deployment, "server-2")
    # Even asking for the server's client id: the broker makes it "server-2".
    tool = await asyncio.to_thread(RawMqtt, deployment, user, password, "alarmpost-server")
    try:
        async with run_posts(deployment, "P001") as posts:
            await asyncio.to_thread(tool.subscribe, post_topic("P001", "cmdresult"))
            cmd = Command(id=new_ulid(), post="P001", cmd="strobe_on", ts=time.time())
            assert await asyncio.to_thread(tool.publish, post_topic("P001", "cmd"), encode(cmd)) == 0
            await asyncio.to_thread(tool.wait_received, post_topic("P001", "cmdresult"))
            await posts["P001"].press()
            await until(lambda: posts["P001"].agent.outbox_depth == 0, 5, "the server still ACKs")
        assert tool.disconnects == []
    finally:
        await asyncio.to_thread(tool.close)
