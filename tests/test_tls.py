"""A TLS deployment against a real Mosquitto: the server and a post over TLS, certificates
verified; clients that do not trust the deployment's CA, or that speak plain TCP, are refused."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import stat
import struct
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from provisioning import deployment as d
from provisioning.ca import CA_VALID_DAYS, LEAF_VALID_DAYS, CertificateAuthority
from tests.helpers import MakeDeployment, db_rows, post_credentials, run_posts, run_server, until

# The broker, the edge or the UI: the server's storage is not what these test.
pytestmark = pytest.mark.one_backend


def _connack(dep: d.Deployment, user: str, password: str, *, cafile: Path | None,
             server_hostname: str = "127.0.0.1") -> int:
    """A bare MQTT 3.1.1 CONNECT over TLS (trusting ``cafile``) or plain TCP (``cafile=None``);
    the CONNACK return code. Raises what the socket raises when the broker refuses."""
    def field(text: str) -> bytes:
        return struct.pack("!H", len(text)) + text.encode()

    body = field("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 30) + field(user) + field(user) \
        + field(password)
    packet = bytes([0x10, len(body)]) + body
    raw = socket.create_connection(("127.0.0.1", dep.broker_port), timeout=5)
    sock: socket.socket = raw
    try:
        if cafile is not None:
            context = ssl.create_default_context(cafile=str(cafile))
            sock = context.wrap_socket(raw, server_hostname=server_hostname)
        sock.sendall(packet)
        reply = sock.recv(4)
        if len(reply) < 4 or reply[0] != 0x20:
            raise ConnectionError(f"no CONNACK, got {reply!r}")
        return reply[3]
    finally:
        sock.close()


# Tests about the transport, not about storage, need not run once per storage backend.
one_backend = pytest.mark.parametrize("storage_backend", ["sqlite"], indirect=True)


@pytest.fixture
def tls_deployment(make_deployment: MakeDeployment) -> d.Deployment:
    return make_deployment(2, tls=True)


async def test_server_and_post_over_tls_commit_and_ack_a_press(
    tls_deployment: d.Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    dep = tls_deployment
    conf = (dep.broker_dir / "mosquitto.conf").read_text().splitlines()
    assert [line for line in conf if line.startswith("listener")] == [
        f"listener {dep.broker_port} 127.0.0.1"]  # one listener, and it is the TLS one
    assert f"cafile {dep.ca_file}" in conf and "tls_version tlsv1.2" in conf
    async with run_server(dep) as server:
        assert server.config.mqtt.tls
        async with run_posts(dep, "P001") as posts:
            assert posts["P001"].agent.config.mqtt.tls_ca_file == str(
                dep.post_config("P001").parent / "ca.crt")
            await posts["P001"].press()
            await until(lambda: posts["P001"].agent.outbox_depth == 0, 10, "ACK over TLS")
    assert db_rows(dep, "SELECT post_id FROM events") == [("P001",)]
    log = (dep.broker_dir / "mosquitto.log").read_text()
    assert "New client connected" in log and "as P001" in log and "as server" in log
    secrets = [post_credentials(dep, "P001")[1], d.account_credentials(dep, "monitor")[1],
               tomllib.loads(dep.server_config.read_text())["mqtt"]["password"]]
    shown = log + caplog.text
    assert f"mqtts://server@127.0.0.1:{dep.broker_port}" in caplog.text  # the server's own word
    assert not [s for s in secrets if s in shown]


@one_backend
async def test_the_servers_certificate_serves_the_console_over_https(
    tls_deployment: d.Deployment
) -> None:
    import aiohttp

    dep = tls_deployment
    with dep.server_config.open("a") as fh:
        fh.write(f'\n[console]\ntls_cert_file = "{dep.tls_dir / "server.crt"}"\n'
                 f'tls_key_file = "{dep.tls_dir / "server.key"}"\n')
    context = ssl.create_default_context(cafile=str(dep.ca_file))
    async with run_server(dep), aiohttp.ClientSession() as http:
        async with http.get(f"https://127.0.0.1:{dep.http_port}/console/", ssl=context) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(f"https://127.0.0.1:{dep.http_port}/console/",
                           ssl=ssl.create_default_context())  # the system's CAs: not ours


@one_backend
def test_a_client_that_does_not_trust_the_ca_is_refused(tls_deployment: d.Deployment,
                                                         tmp_path: Path) -> None:
    dep = tls_deployment
    user, password = post_credentials(dep, "P001")
    assert _connack(dep, user, password, cafile=dep.ca_file) == 0  # the control: trusted, in
    stranger = CertificateAuthority.create(tmp_path / "other-ca", "someone else's CA")
    with pytest.raises(ssl.SSLCertVerificationError):
        _connack(dep, user, password, cafile=stranger.cert_path)
    # The right CA, but a name the broker's certificate does not carry.
    with pytest.raises(ssl.SSLCertVerificationError, match=r"[Hh]ostname mismatch"):
        _connack(dep, user, password, cafile=dep.ca_file, server_hostname="elsewhere.example")
    # Over TLS, still no anonymous access and no wrong password (CONNACK 5: not authorized).
    assert _connack(dep, user, "wrong", cafile=dep.ca_file) == 5
    assert _connack(dep, "", "", cafile=dep.ca_file) == 5


@one_backend
def test_plain_tcp_to_the_tls_port_gets_nothing(tls_deployment: d.Deployment) -> None:
    dep = tls_deployment
    user, password = post_credentials(dep, "P001")
    with pytest.raises((ConnectionError, OSError)):
        _connack(dep, user, password, cafile=None)
    assert _connack(dep, user, password, cafile=dep.ca_file) == 0  # the same, over TLS: in


@one_backend
async def test_a_post_configured_for_plain_tcp_never_connects(tls_deployment: d.Deployment) -> None:
    async with run_posts(tls_deployment, "P002", connect=False, mqtt__tls_ca_file="") as posts:
        agent = posts["P002"].agent
        await asyncio.sleep(0)  # the agent's first connect attempt is under way
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(agent.connected.wait(), 1.5)


@one_backend
def test_tls_1_2_and_1_3_are_served_and_older_versions_are_not(tls_deployment: d.Deployment) -> None:
    def handshake(version: ssl.TLSVersion) -> str | None:
        context = ssl.create_default_context(cafile=str(tls_deployment.ca_file))
        context.minimum_version = context.maximum_version = version
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer an old version
        with socket.create_connection(("127.0.0.1", tls_deployment.broker_port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            return sock.version()

    assert handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert handshake(ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    with warnings.catch_warnings(), pytest.raises(ssl.SSLError, match="alert protocol version"):
        warnings.simplefilter("ignore", DeprecationWarning)  # Python's own, for TLS 1.1
        handshake(ssl.TLSVersion.TLSv1_1)  # the broker answers with an alert


@one_backend
def test_certificates_keys_and_validity(tls_deployment: d.Deployment) -> None:
    dep = tls_deployment
    for key in ["ca.key", "broker.key", "server.key"]:
        assert stat.S_IMODE((dep.tls_dir / key).stat().st_mode) == 0o600, key
    ca = x509.load_pem_x509_certificate(dep.ca_file.read_bytes())
    broker = x509.load_pem_x509_certificate((dep.tls_dir / "broker.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not broker.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1"}
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    days = (broker.not_valid_after_utc - broker.not_valid_before_utc).days
    assert days == LEAF_VALID_DAYS  # plus the hour it is back-dated
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days == CA_VALID_DAYS
    # Every client config trusts the CA, through a copy beside it.
    configs: list[tuple[Path, dict[str, Any]]] = [
        (dep.server_config, tomllib.loads(dep.server_config.read_text())),
        (dep.post_config("P001"), tomllib.loads(dep.post_config("P001").read_text())),
        (d.account_config(dep, "monitor"),
         tomllib.loads(d.account_config(dep, "monitor").read_text())),
    ]
    team = d.add_team_account(dep, "A")
    configs.append((team, tomllib.loads(team.read_text())))
    for path, cfg in configs:
        assert not Path(cfg["mqtt"]["tls_ca_file"]).is_absolute(), path  # a bundle travels
        ca_copy = path.parent / cfg["mqtt"]["tls_ca_file"]
        assert ca_copy.read_bytes() == dep.ca_file.read_bytes(), path


def test_the_servers_tls_files_are_relative_to_its_config_file(tmp_path: Path) -> None:
    """Like every path in the server's config, ``[mqtt] tls_*`` files are found beside it,
    whatever the working directory."""
    from server.config import load_server_config

    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    path = config_dir / "server.toml"
    path.write_text('[mqtt]\ntls_ca_file = "ca.crt"\ntls_cert_file = "/abs/server.crt"\n'
                    '[http]\napi_token = "t"\n')
    mqtt = load_server_config(path).mqtt
    assert mqtt.tls_ca_file == str(config_dir / "ca.crt")
    assert mqtt.tls_cert_file == "/abs/server.crt" and mqtt.tls_key_file == ""


def test_a_posts_and_a_teams_tls_files_are_relative_to_their_config_files(tmp_path: Path) -> None:
    """A device bundle (config + ca.crt beside it) works wherever it is copied to."""
    from edge.config import load_edge_config
    from firmware_sim.patrol import load_team_config

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    post = bundle / "P001.toml"
    post.write_text('[post]\nid = "P001"\n[mqtt]\ntls_ca_file = "ca.crt"\n')
    assert load_edge_config(post).mqtt.tls_ca_file == str(bundle / "ca.crt")
    team = bundle / "T1.toml"
    team.write_text('[team]\nid = "T1"\n[mqtt]\ntls_ca_file = "ca.crt"\n')
    assert load_team_config(team).mqtt.tls_ca_file == str(bundle / "ca.crt")
