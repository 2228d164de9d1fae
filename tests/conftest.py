"""Fixtures: real Mosquitto, real SQLite, real PostgreSQL, real processes.

Every test that needs a broker gets a whole private deployment (generated broker config with
password and ACL files, server config, registry, post configs) and its own Mosquitto on a free
port. Mosquitto starts in ~15 ms, and a broker per test keeps persistent sessions and retained
messages from leaking between tests.

Every test that stores anything runs on both database backends (``storage_backend``): SQLite
files, and PostgreSQL, started once per test session, on a free port, the first time a test asks for it
(``postgres``; ~1 s), and each test that wants one gets an empty database of its own
(``pg_database``; ~50-100 ms to create, dropped afterwards). Every process is started and stopped
by the process harness (:mod:`alarmpost_cli.harness`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from alarmpost_cli.harness import PostgreSQL, find_mosquitto
from provisioning import deployment as d
from server.app import CentralServer
from server.storage import PostInfo, Storage
from tests.helpers import MakeDeployment, ServerProcess, SimProcess, broker_of, forget_broker, run_server
from tests.storage_helpers import backends_under_test, postgres_storage, sqlite_storage


@pytest.fixture(scope="session", autouse=True)
def _mosquitto_installed() -> None:
    find_mosquitto()  # fails the session with the install hint if missing


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "one_backend: the test needs a deployment but not the server's storage (the "
        "broker, the edge, the browser UI): it runs on the first backend under test only")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A ``one_backend`` test keeps its variant for the first backend under test only (the
    others are deselected: reported as such, never run as skipped)."""
    first = backends_under_test()[0]
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("storage_backend") if callspec is not None else None
        if backend and backend != first and item.get_closest_marker("one_backend") is not None:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(params=backends_under_test())
def storage_backend(request: pytest.FixtureRequest) -> str:
    """The server's database in this test: every test that stores anything runs once on SQLite
    and once on PostgreSQL (``ALARMPOST_TEST_STORAGE=sqlite`` or ``=postgresql`` for one)."""
    backend: str = request.param
    return backend


@pytest.fixture
def make_deployment(tmp_path: Path, storage_backend: str,
                    request: pytest.FixtureRequest) -> Iterator[MakeDeployment]:
    """``make_deployment(n_posts, **timing)``: a deployment with its broker running, its server
    configured for this test's storage backend (PostgreSQL: an empty database of its own)."""
    made: list[d.Deployment] = []
    databases: list[str] = []

    def make(n_posts: int = 3, **kwargs: Any) -> d.Deployment:
        kwargs.setdefault("heartbeat_s", 1.0)
        kwargs.setdefault("ack_timeout_s", 0.5)
        kwargs.setdefault("resend_max_s", 2.0)
        if storage_backend == "postgresql":
            pg: PostgreSQL = request.getfixturevalue("postgres")
            dsn = pg.create_database()
            databases.append(dsn.rsplit("/", 1)[1])
            kwargs.setdefault("database", {"backend": "postgresql", "dsn": dsn})
        dep = d.create(tmp_path / f"dep{len(made)}", d.district_posts(n_posts), **kwargs)
        made.append(dep)
        broker_of(dep).start()  # tests reach it with tests.helpers.broker_of(dep)
        return dep

    yield make
    for dep in made:
        forget_broker(dep)
    if databases:
        pg = request.getfixturevalue("postgres")
        for name in databases:
            if pg.running:
                pg.drop_database(name)


@pytest.fixture
def deployment(make_deployment: MakeDeployment) -> d.Deployment:
    return make_deployment(3)


@pytest.fixture
async def server(deployment: d.Deployment,
                 request: pytest.FixtureRequest) -> AsyncIterator[CentralServer]:
    """The central server in this test's event loop, connected to the broker. At the end no
    handler may have failed, unless the test is marked ``expect_internal_errors``."""
    expect = request.node.get_closest_marker("expect_internal_errors") is not None
    async with run_server(deployment, expect_errors=expect) as srv:
        yield srv


@pytest.fixture
def server_process(deployment: d.Deployment, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(deployment, tmp_path / "server.log")
    yield proc
    proc.kill()


@pytest.fixture
async def sim_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[SimProcess]]]:
    sims: list[SimProcess] = []

    async def make(dep: d.Deployment, *ids: str) -> SimProcess:
        sim = SimProcess(dep, list(ids), tmp_path / f"sim{len(sims)}.log")
        sims.append(sim)
        await sim.start()
        return sim

    yield make
    for sim in sims:
        await sim.close()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgreSQL]:
    """One private PostgreSQL for the whole session, started when a test first asks for it.
    Its log stays in the session's temporary directory (``postgres*/postgresql.log``)."""
    with PostgreSQL(tmp_path_factory.mktemp("postgres")) as pg:
        yield pg


@pytest.fixture
def pg_database(postgres: PostgreSQL) -> Iterator[str]:
    """The DSN of an empty database of this test's own, dropped afterwards."""
    with postgres.fresh_database() as dsn:
        yield dsn


@pytest.fixture
def storage(storage_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Storage]:
    """The server's storage alone (no broker, no server) on this test's backend, two posts
    (P001, P002) registered."""
    if storage_backend == "sqlite":
        store = sqlite_storage(tmp_path / "server.db")
    else:
        store = postgres_storage(request.getfixturevalue("pg_database"))
    store.posts.upsert([PostInfo(id="P001"), PostInfo(id="P002")])
    yield store
    store.close()
