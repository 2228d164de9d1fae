"""The process harness: Mosquitto, PostgreSQL and the server started, waited for and stopped."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import psycopg
import pytest

from alarmpost_cli import harness
from alarmpost_cli.harness import (
    BrokerError,
    Mosquitto,
    PostgresError,
    PostgreSQL,
    ServerError,
    ServerProcess,
)
from provisioning import broker as broker_config
from provisioning import deployment as d
from tests.helpers import api

# The broker, the edge or the UI: the server's storage is not what these test.
pytestmark = pytest.mark.one_backend

PASSWORD = "harness-test-password"


def broker_dir(path: Path, port: int | None = None) -> Path:
    broker_config.write_broker_dir(path, port=port or broker_config.free_port(),
                                   accounts={broker_config.SERVER_USER: PASSWORD})
    return path


def gone(pid: int) -> bool:
    """No such process, or only its zombie left (whoever reaps orphans here may not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in {"Z", "X"}


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    """A port taken by someone else (a listening socket on 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


# ---------------------------------------------------------------------------- Mosquitto
async def test_mosquitto_is_ready_when_it_says_so_and_takes_a_client_at_once(tmp_path: Path) -> None:
    directory = broker_dir(tmp_path / "broker")
    port = int(next(line.split()[1] for line in (directory / "mosquitto.conf").read_text()
                    .splitlines() if line.startswith("listener ")))
    async with Mosquitto(directory, port) as broker:
        assert broker.running and broker.pid is not None
        assert " running" in broker.log_path.read_text()
        async with aiomqtt.Client("127.0.0.1", port, username=broker_config.SERVER_USER,
                                  password=PASSWORD, identifier="server"):
            pass
        pid = broker.pid
    assert not broker.running and gone(pid)
    assert "Saving in-memory database" in broker.log_path.read_text()  # SIGTERM: a clean stop


def test_mosquitto_readiness_is_not_fooled_by_another_broker_on_its_port(tmp_path: Path) -> None:
    with harness.start_with_retry(broker_dir(tmp_path / "first")) as first:
        second = Mosquitto(broker_dir(tmp_path / "second", port=first.port), first.port)
        with pytest.raises(BrokerError, match="Address already in use"):
            second.start()  # a TCP probe would have seen the first broker answer
        assert not second.running and first.running


def test_start_with_retry_moves_to_another_port_when_its_port_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    second_dir = broker_dir(tmp_path / "second")
    with harness.start_with_retry(broker_dir(tmp_path / "first")) as first:
        ports = iter([first.port])  # the first pick is the port just taken by someone else
        real_free_port = broker_config.free_port
        monkeypatch.setattr(broker_config, "free_port",
                            lambda host="127.0.0.1": next(ports, None) or real_free_port(host))
        with harness.start_with_retry(second_dir) as second:
            assert second.running and second.port != first.port
            assert f"listener {second.port} " in second.config_path.read_text()
            log = second.log_path.read_text()
            assert "Address already in use" in log and " running" in log


def test_a_broker_that_cannot_start_says_why_and_where_its_log_is(tmp_path: Path) -> None:
    directory = broker_dir(tmp_path / "broker")
    with (directory / "mosquitto.conf").open("a") as fh:
        fh.write("no_such_option true\n")
    broker = Mosquitto(directory, 1883)
    with pytest.raises(BrokerError) as err:
        broker.start()
    assert "exited with code" in str(err.value) and str(broker.log_path) in str(err.value)
    assert not broker.running


async def test_reload_and_wait_returns_once_the_broker_reread_its_files(tmp_path: Path) -> None:
    directory = broker_dir(tmp_path / "broker")
    with harness.start_with_retry(directory) as broker:
        broker_config.write_password_file(directory / "passwd", {
            broker_config.SERVER_USER: PASSWORD, broker_config.MONITOR_USER: "new-password"})
        broker_config.write_acl(directory)
        await broker.reload_and_wait_async()
        async with aiomqtt.Client("127.0.0.1", broker.port, username=broker_config.MONITOR_USER,
                                  password="new-password", identifier="monitor"):
            pass  # the account written before the reload is known at once
        broker.reload_and_wait()
        assert broker.log_path.read_text().count("Reloading config") == 2
    with pytest.raises(BrokerError, match="not running"):
        broker.reload_and_wait()


def test_missing_mosquitto_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(BrokerError, match="apt-get install -y mosquitto"):
        harness.find_mosquitto()


# ---------------------------------------------------------------------------- PostgreSQL
def test_private_postgres_is_ours_and_commits_synchronously(postgres: PostgreSQL,
                                                            pg_database: str) -> None:
    assert postgres.running and postgres.port not in (0, 5432)
    assert f"127.0.0.1:{postgres.port}/" in pg_database and pg_database != postgres.dsn
    with psycopg.connect(pg_database) as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        assert conn.execute("SHOW port").fetchone() == (str(postgres.port),)
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                            ).fetchone() == (0,)
        conn.execute("CREATE TABLE t (a int)")
    with psycopg.connect(postgres.dsn) as conn:  # the database made at start exists too
        assert conn.execute("SELECT current_database()").fetchone() == ("alarmpost",)


def test_each_test_gets_an_empty_database_that_is_dropped_after(postgres: PostgreSQL) -> None:
    with postgres.fresh_database() as first, postgres.fresh_database() as second:
        assert first != second
        with psycopg.connect(first) as conn:
            conn.execute("CREATE TABLE t (a int)")
        with psycopg.connect(second) as conn:
            assert conn.execute("SELECT to_regclass('public.t')").fetchone() == (None,)
        open_connection = psycopg.connect(first)  # dropping closes what still uses it
    names = {first.rsplit("/", 1)[1], second.rsplit("/", 1)[1]}
    with psycopg.connect(postgres.dsn) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)",
                            (list(names),)).fetchall()
    assert left == []
    open_connection.close()


def test_postgres_starts_on_another_port_when_its_port_was_taken_and_stops_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listening_socket: socket.socket
) -> None:
    taken = listening_socket.getsockname()[1]
    ports = iter([taken])
    real_free_port = broker_config.free_port
    monkeypatch.setattr("alarmpost_cli.harness.postgres.free_port",
                        lambda host="127.0.0.1": next(ports, None) or real_free_port(host))
    pg = PostgreSQL(tmp_path / "logs")
    with pg:
        assert pg.running and pg.port != taken
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        cluster = pg._cluster
        assert (cluster / "PG_VERSION").exists()
    assert not pg.running and pg.proc is not None and pg.proc.returncode == 0
    assert not cluster.exists()  # the temporary cluster went ...
    log = pg.log_path.read_text()  # ... and the log stayed
    assert "Address already in use" in log and "database system is shut down" in log


def test_missing_postgres_says_how_to_install(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("alarmpost_cli.harness.postgres.DEBIAN_ROOT", tmp_path / "none")
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(PostgresError, match="apt-get install -y postgresql"):
        harness.find_postgres()
    with pytest.raises(PostgresError, match="apt-get install -y postgresql"):
        PostgreSQL(tmp_path / "logs").start()


def test_children_die_with_the_process_that_started_them(tmp_path: Path) -> None:
    """A test run or demo that is SIGKILLed leaves no broker and no database behind."""
    directory = broker_dir(tmp_path / "broker")
    script = textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        from alarmpost_cli.harness import PostgreSQL, start_with_retry
        broker = start_with_retry(Path({str(directory)!r}))
        pg = PostgreSQL(Path({str(tmp_path / 'pg')!r})).start()
        print(json.dumps({{"broker": broker.pid, "postgres": pg.pid, "base": str(pg._base)}}),
              flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        assert parent.stdout is not None
        pids = json.loads(parent.stdout.readline())
        assert not gone(pids["broker"]) and not gone(pids["postgres"])
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 15
        while not (gone(pids["broker"]) and gone(pids["postgres"])):
            assert time.monotonic() < deadline, f"still running: {pids}"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()
        if "pids" in locals():  # whatever the test found still running does not outlive it
            for pid, sig in ((pids["broker"], signal.SIGKILL), (pids["postgres"], signal.SIGQUIT)):
                if not gone(pid):
                    os.kill(pid, sig)
            shutil.rmtree(pids["base"], ignore_errors=True)
    assert "database system is shut down" in (tmp_path / "pg" / "postgresql.log").read_text()


# ---------------------------------------------------------------------------- the server
async def test_server_process_is_ready_on_healthz_and_stops_cleanly(
    deployment: d.Deployment, tmp_path: Path
) -> None:
    log_path = tmp_path / "server.log"
    async with ServerProcess.for_deployment(deployment, log_path) as server:
        assert server.running
        assert (await api(deployment, "/healthz"))["ok"] is True
        pid = server.pid
    assert server.returncode == 0 and pid is not None and gone(pid)
    assert log_path.read_text()  # the log stays

    server = ServerProcess.for_deployment(deployment, log_path)
    server.start()
    await server.wait_ready()
    assert server.kill() == -signal.SIGKILL
    assert server.stop() == -signal.SIGKILL  # stopping a dead server only reports how it ended


async def test_a_server_that_cannot_start_says_why_with_its_log(
    deployment: d.Deployment, tmp_path: Path
) -> None:
    config = tmp_path / "bad-server.toml"
    config.write_text(re.sub(r"default_heartbeat_s = \S+", 'default_heartbeat_s = "often"',
                             deployment.server_config.read_text()))
    server = ServerProcess(config, tmp_path / "server.log")
    server.start()
    with pytest.raises(ServerError) as err:
        await server.wait_ready()
    assert "exited with code" in str(err.value) and str(tmp_path / "server.log") in str(err.value)
    assert not server.running
    with pytest.raises(ServerError, match="cannot read the HTTP address"):
        await ServerProcess(tmp_path / "missing.toml", tmp_path / "x.log").wait_ready()
