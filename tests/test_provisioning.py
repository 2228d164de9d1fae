"""Technician flow: generated files, a new post joining a running deployment."""

from __future__ import annotations

import base64
import signal
import stat
import tomllib
from pathlib import Path

import pytest

from protocol.settings import ConfigError
from provisioning import deployment as d
from provisioning.credentials import mosquitto_hash, mosquitto_verify
from tests.helpers import ServerProcess, db_rows, run_posts, until


def test_password_hashes_are_mosquittos_format() -> None:
    encoded = mosquitto_hash("s3cret")
    kind, iterations, salt, digest = encoded.split("$")[1:]
    assert (kind, iterations) == ("7", "101")
    assert len(base64.b64decode(salt)) == 12 and len(base64.b64decode(digest)) == 64
    assert mosquitto_verify("s3cret", encoded) and not mosquitto_verify("other", encoded)


def test_generated_deployment_keeps_secrets_private(tmp_path: Path) -> None:
    dep = d.create(tmp_path / "dep", d.district_posts(3))
    for path in [dep.server_config, dep.post_config("P001"), dep.broker_dir / "passwd"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    passwd = (dep.broker_dir / "passwd").read_text()
    assert [p.id for p in d.open_deployment(dep.directory).posts] == ["P001", "P002", "P003"]
    assert "password" not in passwd and passwd.count("$7$101$") == 4
    acl = (dep.broker_dir / "acl").read_text()
    assert "pattern write alarmpost/v1/post/%u/event" in acl
    assert "pattern readwrite" not in acl  # posts never get more than they need


async def test_new_post_joins_a_running_deployment(deployment: d.Deployment, tmp_path: Path) -> None:
    server = ServerProcess(deployment, tmp_path / "server.log")
    server.start()
    try:
        await server.wait_ready()
        spec = d.PostSpec(id="GATE-9", name="East gate", school="Jin'an No. 9 School",
                          address="9 Hualin Rd", lat=26.09, lon=119.31)
        d.add_post(deployment, spec, heartbeat_s=1.0, ack_timeout_s=0.5, hardware_backend="mock")
        deployment.mosquitto().reload()
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
        d.create(tmp_path / "a", d.district_posts(1), listen="0.0.0.0")
    dep = d.create(tmp_path / "b", d.district_posts(1), listen="0.0.0.0",
                   broker_host="alarms.example.org")
    conf = (dep.broker_dir / "mosquitto.conf").read_text()
    assert f"listener {dep.broker_port} 0.0.0.0" in conf
    post = tomllib.loads(dep.post_config("P001").read_text())
    assert post["mqtt"]["host"] == "alarms.example.org"
    server = tomllib.loads(dep.server_config.read_text())
    assert server["mqtt"]["host"] == "127.0.0.1"  # beside the broker
    again = d.open_deployment(dep.directory)
    assert (again.listen, again.broker_host) == ("0.0.0.0", "alarms.example.org")
