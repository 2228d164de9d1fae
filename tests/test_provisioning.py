"""Technician flow: generated files, a new post joining a running deployment."""

from __future__ import annotations

import base64
import signal
import stat
from pathlib import Path

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
