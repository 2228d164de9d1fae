"""``alarmpost provision init``: TLS by default, plain TCP only when asked and then on loopback,
a first admin account, private keys, and no secret in what the command prints."""

from __future__ import annotations

import io
import stat
import tomllib
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from cryptography import x509

from alarmpost_cli.harness import Mosquitto
from alarmpost_cli.main import main
from provisioning import deployment as d
from provisioning.broker import free_port
from server.config import load_server_config
from server.storage import open_storage
from tests.test_tls import _connack


def _init(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["provision", "init", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _stored_hash(dep: d.Deployment, name: str) -> str:
    storage = open_storage(load_server_config(dep.server_config).database)
    try:
        user = storage.accounts.user(name)
    finally:
        storage.close()
    assert user is not None and user["role"] == "admin", user
    return str(user["password_hash"])


def _secrets(dep: d.Deployment) -> list[str]:
    """Every password, token and private key the deployment holds."""
    found: list[str] = []
    for path in [dep.server_config, *dep.directory.glob("posts/*.toml"),
                 *dep.directory.glob("accounts/*.toml")]:
        cfg = tomllib.loads(path.read_text())
        found.append(cfg["mqtt"]["password"])
        if "http" in cfg:
            found.append(cfg["http"]["api_token"])
    for key in dep.tls_dir.glob("*.key"):
        found += [line for line in key.read_text().splitlines() if "-----" not in line]
    return found


def test_init_writes_a_tls_deployment_that_a_real_broker_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    rc, out, err = _init(capsys, str(tmp_path / "dep"), "--posts", "2", "--broker-port", str(port))
    assert rc == 0, err
    dep = d.open_deployment(tmp_path / "dep")
    assert dep.tls and dep.broker_port == port
    conf = (dep.broker_dir / "mosquitto.conf").read_text().splitlines()
    assert "allow_anonymous false" in conf
    assert [line for line in conf if line.startswith("listener")] == [f"listener {port} 127.0.0.1"]
    for line in [f"cafile {dep.ca_file}", f"certfile {dep.tls_dir / 'broker.crt'}",
                 f"keyfile {dep.tls_dir / 'broker.key'}", "tls_version tlsv1.2"]:
        assert line in conf
    for path in [dep.server_config, dep.post_config("P001"), d.account_config(dep, "monitor")]:
        assert tomllib.loads(path.read_text())["mqtt"]["tls_ca_file"], path
    assert (dep.directory / "posts" / "ca.crt").read_bytes() == dep.ca_file.read_bytes()
    for path in [*dep.tls_dir.glob("*.key"), dep.server_config, dep.post_config("P001"),
                 dep.broker_dir / "passwd"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert sorted(p.name for p in dep.tls_dir.glob("*.key")) == ["broker.key", "ca.key",
                                                                 "server.key"]

    # The admin password: shown once, on its own line, and stored hashed.
    lines = [line for line in out.splitlines() if "admin password" in line]
    assert len(lines) == 1
    password = lines[0].rsplit(": ", 1)[1]
    assert out.count(password) == 1 and password not in err
    assert PasswordHasher().verify(_stored_hash(dep, "admin"), password)
    # No other secret anywhere in what the command printed or logged.
    shown = out + err + caplog.text
    for secret in _secrets(dep):
        assert secret not in shown

    # The generated config runs: a post's credential over TLS, the CA from its own bundle.
    with Mosquitto.for_deployment(dep):
        post = tomllib.loads(dep.post_config("P001").read_text())["mqtt"]
        ca = dep.post_config("P001").parent / post["tls_ca_file"]  # beside the post's config
        assert _connack(dep, "P001", post["password"], cafile=ca) == 0
        with pytest.raises(ConnectionError):
            _connack(dep, "P001", post["password"], cafile=None)


def test_admin_password_from_stdin_is_not_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
    rc, out, err = _init(capsys, str(tmp_path / "dep"), "--posts", "0", "--admin-name", "root",
                         "--admin-password-stdin")
    assert rc == 0, err
    assert "correct horse" not in out + err and "admin password" not in out
    dep = d.open_deployment(tmp_path / "dep")
    assert PasswordHasher().verify(_stored_hash(dep, "root"), "correct horse battery")
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    rc, out, err = _init(capsys, str(tmp_path / "dep2"), "--admin-password-stdin")
    assert rc == 2 and "8 to 1024 characters" in err and not (tmp_path / "dep2").exists()


def test_plain_tcp_only_when_asked_and_only_on_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = _init(capsys, str(tmp_path / "plain"), "--posts", "1", "--plain-tcp")
    assert rc == 0, err
    dep = d.open_deployment(tmp_path / "plain")
    conf = (dep.broker_dir / "mosquitto.conf").read_text()
    assert not dep.tls and f"listener {dep.broker_port} 127.0.0.1" in conf
    assert "cafile" not in conf and not dep.tls_dir.exists()
    assert "tls_ca_file" not in dep.post_config("P001").read_text()

    for listen in ["0.0.0.0", "10.20.0.5"]:
        target = tmp_path / f"open-{listen}"
        rc, out, err = _init(capsys, str(target), "--plain-tcp", "--listen", listen,
                             "--broker-host", "10.20.0.5")
        assert rc == 2 and out == "" and f"refusing plain TCP on {listen}" in err
        assert "in clear" in err and "--insecure-open" in err and "Traceback" not in err
        assert not target.exists()
    rc, _, err = _init(capsys, str(tmp_path / "tls-open"), "--insecure-open")
    assert rc == 2 and "only applies with --plain-tcp" in err

    rc, _, err = _init(capsys, str(tmp_path / "lab"), "--posts", "1", "--plain-tcp", "--listen",
                         "0.0.0.0", "--broker-host", "10.20.0.5", "--insecure-open")
    assert rc == 0, err
    lab = d.open_deployment(tmp_path / "lab")
    assert f"listener {lab.broker_port} 0.0.0.0" in (lab.broker_dir / "mosquitto.conf").read_text()


def test_tls_on_every_interface_names_the_broker_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = _init(capsys, str(tmp_path / "dep"), "--posts", "1", "--listen", "0.0.0.0",
                         "--broker-host", "alarms.example.org")
    assert rc == 0, err
    dep = d.open_deployment(tmp_path / "dep")
    assert dep.broker_port == 8883
    cert = x509.load_pem_x509_certificate((dep.tls_dir / "broker.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "alarms.example.org" in san.get_values_for_type(x509.DNSName)
    assert "0.0.0.0" not in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    post = tomllib.loads(dep.post_config("P001").read_text())["mqtt"]
    server = tomllib.loads(dep.server_config.read_text())["mqtt"]
    assert (post["host"], server["host"]) == ("alarms.example.org", "127.0.0.1")
