"""A private PostgreSQL (>= 15): its own cluster on a free port, never the machine's own on 5432.

::

    pg = PostgreSQL(log_dir)            # log_dir/postgresql.log is kept after it stops
    with pg:                            # initdb (~1 s), start (~0.1 s), CREATE DATABASE alarmpost
        pg.dsn                          # postgresql://alarmpost@127.0.0.1:PORT/alarmpost
        with pg.fresh_database() as dsn:  # an empty database of its own, dropped afterwards
            ...

The cluster lives in a temporary directory (removed when it stops) unless ``data_dir`` is given.
PostgreSQL refuses to run as root: as root, the cluster belongs to the ``postgres`` account
(Debian's package creates it) and every process runs as that account; as anyone else it runs as
that user. ``postgres`` is this process's child (not a daemon of ``pg_ctl``), so it gets a fast
shutdown when this process dies, however it dies. Stopping it is SIGINT, which is what
``pg_ctl stop -m fast`` sends.

Connections use TCP on 127.0.0.1 with ``trust`` authentication: this cluster is for tests,
benchmarks and demos on one machine, not for production. Databases are made and dropped with the
cluster's own ``psql``: no module outside the server's storage package uses a database driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from alarmpost_cli.harness._process import HarnessError, kill_process, read_since, size_of, spawn
from provisioning.broker import free_port

log = logging.getLogger("alarmpost.harness.postgres")

MIN_VERSION = 15
INSTALL_HINT = (
    f"PostgreSQL (>= {MIN_VERSION}) was not found in /usr/lib/postgresql/*/bin or on PATH. "
    "Install it with:  sudo apt-get install -y postgresql   (the project's ./run script does "
    "this for you; the package also starts a server of its own on port 5432, which alarmpost "
    "never uses)."
)
SERVICE_ACCOUNT = "postgres"  # who runs the cluster when this process is root
DEBIAN_ROOT = Path("/usr/lib/postgresql")  # Debian's layout: one N/bin per major version
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_POLL_S = 0.01
_TOOLS = ("initdb", "postgres", "psql")
_counter = itertools.count(1)


class PostgresError(HarnessError):
    """PostgreSQL is missing, failed to start or to stop, or a database could not be made."""


@dataclass(frozen=True)
class PostgresBinaries:
    bindir: Path
    version: int

    @property
    def initdb(self) -> str:
        return str(self.bindir / "initdb")

    @property
    def postgres(self) -> str:
        return str(self.bindir / "postgres")

    @property
    def psql(self) -> str:
        return str(self.bindir / "psql")


def _major_version(postgres: Path) -> int | None:
    try:
        out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(match.group(1)) if match else None


def find_postgres(min_version: int = MIN_VERSION) -> PostgresBinaries:
    """The highest ``/usr/lib/postgresql/N/bin`` with N >= ``min_version`` (Debian's layout),
    else ``initdb`` and ``postgres`` on PATH; raise with an install hint."""
    found: list[PostgresBinaries] = []
    for bindir in DEBIAN_ROOT.glob("*/bin"):
        if not bindir.parent.name.isdigit():
            continue
        if all(os.access(bindir / tool, os.X_OK) for tool in _TOOLS):
            found.append(PostgresBinaries(bindir, int(bindir.parent.name)))
    usable = [b for b in found if b.version >= min_version]
    if usable:
        return max(usable, key=lambda b: b.version)
    initdb = shutil.which("initdb")
    if initdb is not None:
        bindir = Path(initdb).resolve().parent
        if all(os.access(bindir / tool, os.X_OK) for tool in _TOOLS):
            version = _major_version(bindir / "postgres")
            if version is not None and version >= min_version:
                return PostgresBinaries(bindir, version)
            found.append(PostgresBinaries(bindir, version or 0))
    if found:
        have = ", ".join(f"{b.version} ({b.bindir})" for b in found)
        raise PostgresError(f"alarmpost needs PostgreSQL >= {min_version}; found only {have}. "
                            + INSTALL_HINT.split(". ", 1)[1])
    raise PostgresError(INSTALL_HINT)


def _service_account() -> pwd.struct_passwd | None:
    """The account the cluster runs as when this process is root; None when not root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_ACCOUNT)
    except KeyError:
        raise PostgresError(
            f"running as root, and PostgreSQL refuses to run as root: it runs as the "
            f"{SERVICE_ACCOUNT!r} account, which does not exist here. Install Debian's "
            f"package (sudo apt-get install -y postgresql creates it) or run as a normal user."
        ) from None


class PostgreSQL:
    """One private PostgreSQL server. See the module docstring.

    ``log_dir``: where ``postgresql.log`` goes (kept). ``data_dir``: the cluster (kept; default:
    a temporary directory removed by :meth:`stop`); as root it must be reachable by the
    ``postgres`` account, so not inside a private (0700) directory such as pytest's tmp_path.
    ``port``: default a free one, tried again if taken meanwhile. ``settings``: further
    ``-c NAME=VALUE`` server settings.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        data_dir: Path | None = None,
        port: int | None = None,
        user: str = "alarmpost",
        database: str = "alarmpost",
        settings: Mapping[str, str] | None = None,
        binaries: PostgresBinaries | None = None,
    ) -> None:
        for name in (user, database):
            if not _NAME_RE.match(name):
                raise ValueError(f"invalid PostgreSQL name {name!r}: use [a-z_][a-z0-9_]*")
        self.log_dir = log_dir
        self.data_dir = data_dir
        self.user = user
        self.database = database
        self.settings = dict(settings or {})
        self.binaries = binaries
        self.host = "127.0.0.1"
        self.port = port or 0
        self._fixed_port = port is not None
        self._base: Path | None = None  # temporary: the socket, and the cluster by default
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._started_at = 0.0

    # ------------------------------------------------------------------ where and what
    @property
    def log_path(self) -> Path:
        return self.log_dir / "postgresql.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def dsn_for(self, database: str) -> str:
        if not self.port:
            raise PostgresError("PostgreSQL has not been started")
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    @property
    def dsn(self) -> str:
        """The DSN of the ``database`` made at start (``alarmpost``)."""
        return self.dsn_for(self.database)

    @property
    def _cluster(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir
        assert self._base is not None
        return self._base / "data"

    # ------------------------------------------------------------------ start
    def _prepare(self) -> tuple[PostgresBinaries, pwd.struct_passwd | None]:
        binaries = self.binaries = self.binaries or find_postgres()
        account = _service_account()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self._base is None:
            self._base = Path(tempfile.mkdtemp(prefix="alarmpost-pg-"))
        if self.data_dir is None:
            self._cluster.mkdir(mode=0o700, exist_ok=True)
        else:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if account is not None:
            for path in (self._base, self._cluster):
                os.chown(path, account.pw_uid, account.pw_gid)
        return binaries, account

    def _initdb(self, binaries: PostgresBinaries, account: pwd.struct_passwd | None) -> None:
        if (self._cluster / "PG_VERSION").exists():
            return
        started = time.monotonic()
        offset = size_of(self.log_path)
        proc = spawn(
            [binaries.initdb, "-D", str(self._cluster), "-A", "trust", "-U", self.user,
             "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
            log_path=self.log_path, cwd=self._base, new_session=True,
            user=account.pw_name if account else None,
        )
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            kill_process(proc)
            raise PostgresError(f"initdb did not finish within 120 s; see {self.log_path}") from None
        if code != 0:
            hint = ""
            if account is not None:
                hint = (f" As root the cluster belongs to {account.pw_name!r}, which must be able to "
                        f"reach {self._cluster}: choose a data_dir outside private (0700) "
                        "directories, or leave it to a temporary one.")
            raise PostgresError(f"initdb failed with code {code}: "
                                f"{read_since(self.log_path, offset).strip()[-800:]}{hint}")
        log.info("initdb %s in %.2f s", self._cluster, time.monotonic() - started)

    def _spawn(self, binaries: PostgresBinaries, account: pwd.struct_passwd | None) -> None:
        if not self._fixed_port:
            self.port = free_port(self.host)
        assert self._base is not None
        args = [binaries.postgres, "-D", str(self._cluster), "-p", str(self.port),
                "-k", str(self._base), "-c", f"listen_addresses={self.host}"]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        self._offset = size_of(self.log_path)
        self._started_at = time.monotonic()
        # SIGINT is PostgreSQL's fast shutdown: what it gets if this process dies.
        self.proc = spawn(args, log_path=self.log_path, cwd=self._base, new_session=True,
                          death_signal=signal.SIGINT,
                          user=account.pw_name if account else None)

    def _check_ready(self) -> bool:
        """True once postmaster.pid says "ready" for our process; raise if it exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise PostgresError(
                f"postgres exited with code {self.proc.returncode} on port {self.port}: "
                f"{read_since(self.log_path, self._offset).strip()[-800:]} (log {self.log_path})"
            )
        try:
            lines = (self._cluster / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return False
        return len(lines) >= 8 and lines[0].strip() == str(self.proc.pid) \
            and lines[7].strip() == "ready"

    def _port_taken(self, exc: PostgresError) -> bool:
        return not self._fixed_port and ("Address already in use" in str(exc)
                                         or "could not create any TCP/IP sockets" in str(exc))

    def _not_ready(self, timeout: float) -> PostgresError:
        kill_process(self.proc)
        return PostgresError(f"postgres was not ready within {timeout} s; its log: {self.log_path}")

    def start(self, timeout: float = 30.0, attempts: int = 5) -> PostgreSQL:
        """initdb (once), start, wait until ready, create the ``database``. Returns self."""
        if self.running:
            return self
        binaries, account = self._prepare()
        self._initdb(binaries, account)
        for attempt in range(1, attempts + 1):
            self._spawn(binaries, account)
            deadline = time.monotonic() + timeout
            try:
                while not self._check_ready():
                    if time.monotonic() > deadline:
                        raise self._not_ready(timeout)
                    time.sleep(_POLL_S)
                break
            except PostgresError as exc:
                if attempt == attempts or not self._port_taken(exc):
                    raise
                log.info("port %d was taken meanwhile; trying another", self.port)
        self._after_start()
        return self

    async def start_async(self, within: float = 30.0, attempts: int = 5) -> PostgreSQL:
        """:meth:`start`, waiting on the event loop (initdb and CREATE DATABASE in a thread)."""
        if self.running:
            return self
        binaries, account = self._prepare()
        await asyncio.to_thread(self._initdb, binaries, account)
        for attempt in range(1, attempts + 1):
            self._spawn(binaries, account)
            deadline = time.monotonic() + within
            try:
                while not self._check_ready():
                    if time.monotonic() > deadline:
                        raise self._not_ready(within)
                    await asyncio.sleep(_POLL_S)
                break
            except PostgresError as exc:
                if attempt == attempts or not self._port_taken(exc):
                    raise
        await asyncio.to_thread(self._after_start)
        return self

    def _after_start(self) -> None:
        assert self.proc is not None and self.binaries is not None
        log.info("postgres %d running on %s:%d (pid %d, ready in %.2f s, log %s)",
                 self.binaries.version, self.host, self.port, self.proc.pid,
                 time.monotonic() - self._started_at, self.log_path)
        self._psql(f"SELECT 'CREATE DATABASE \"{self.database}\" TEMPLATE template0' "
                   f"WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = "
                   f"'{self.database}')\n\\gexec\n")

    # ------------------------------------------------------------------ stop
    def stop(self, timeout: float = 30.0) -> int | None:
        """Fast shutdown (SIGINT, as ``pg_ctl stop -m fast``); immediate (SIGQUIT) and then
        SIGKILL if it takes longer than ``timeout``. The temporary cluster goes, the log stays."""
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("postgres did not stop within %.0f s: immediate shutdown", timeout)
                self.proc.send_signal(signal.SIGQUIT)
                try:
                    code = self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    code = kill_process(self.proc)
        elif self.proc is not None:
            code = self.proc.returncode
        self._remove_temporary()
        return code

    async def stop_async(self, within: float = 30.0) -> int | None:
        """:meth:`stop` in a thread."""
        return await asyncio.to_thread(self.stop, within)

    def kill(self) -> None:
        """SIGKILL the postmaster, as in a crash (its backends notice and exit). The cluster
        stays, so :meth:`start` runs crash recovery on it."""
        kill_process(self.proc)

    def _remove_temporary(self) -> None:
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None

    # ------------------------------------------------------------------ databases
    def _psql(self, script: str, timeout: float = 60.0) -> str:
        """Run SQL (and psql's own commands, such as ``\\gexec``) on the ``postgres`` database."""
        if not self.running or self.binaries is None:
            raise PostgresError("PostgreSQL is not running")
        try:
            done = subprocess.run(
                [self.binaries.psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                 "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", "postgres"],
                input=script, capture_output=True, text=True, timeout=timeout, check=False,
                env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
            )
        except subprocess.TimeoutExpired:
            raise PostgresError(f"psql did not finish within {timeout:g} s: {script.strip()!r}; "
                                f"the server's log: {self.log_path}") from None
        if done.returncode != 0:
            raise PostgresError(f"psql failed ({script.strip()!r}): {done.stderr.strip()[-800:]}; "
                                f"the server's log: {self.log_path}")
        return done.stdout

    def create_database(self, name: str | None = None) -> str:
        """An empty database (``CREATE DATABASE ... TEMPLATE template0``); its DSN."""
        name = name or f"t{os.getpid()}_{next(_counter)}"
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid database name {name!r}: use [a-z_][a-z0-9_]*")
        self._psql(f'CREATE DATABASE "{name}" TEMPLATE template0;\n')
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, closing whatever connections still use it."""
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid database name {name!r}")
        self._psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE);\n')

    @contextlib.contextmanager
    def fresh_database(self) -> Iterator[str]:
        """``with pg.fresh_database() as dsn``: an empty database, dropped at the end."""
        dsn = self.create_database()
        try:
            yield dsn
        finally:
            if self.running:
                self.drop_database(dsn.rsplit("/", 1)[1])

    @contextlib.asynccontextmanager
    async def fresh_database_async(self) -> AsyncIterator[str]:
        dsn = await asyncio.to_thread(self.create_database)
        try:
            yield dsn
        finally:
            if self.running:
                await asyncio.to_thread(self.drop_database, dsn.rsplit("/", 1)[1])

    # ------------------------------------------------------------------ context managers
    def __enter__(self) -> PostgreSQL:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> PostgreSQL:
        return await self.start_async()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_async()
