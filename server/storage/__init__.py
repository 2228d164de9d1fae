"""Everything the server keeps, behind one door per concept, on SQLite or PostgreSQL.

::

    storage = open_storage(config.database)     # migrations applied
    storage.incidents   incidents, their events and audit log   (IncidentStore)
    storage.posts       posts, faults, test mode, health         (PostStore)
    storage.teams       patrol teams, live status, app logins    (TeamStore)
    storage.dispatch    dispatch jobs and pages                  (DispatchStore)
    storage.accounts    console users, sessions, console audit   (AccountStore)
    storage.commands    commands sent to posts                   (CommandStore)

No module outside this package issues SQL or imports a database driver
(``tests/test_architecture.py`` checks it). :mod:`.database` is the interface over the two
backends; :mod:`.migrations` holds each backend's schema as numbered migrations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from server.storage.accounts import AccountStore
from server.storage.commands import CommandStore
from server.storage.database import (
    Database,
    DatabaseError,
    IntegrityError,
    PostgresDatabase,
    SqliteDatabase,
)
from server.storage.dispatch import DispatchStore
from server.storage.incidents import (
    CLOCK_AHEAD_TOLERANCE_S,
    RESEND_MAX_AGE_S,
    Committed,
    IncidentStore,
    clock_suspect,
)
from server.storage.migrations import migrate
from server.storage.posts import PostInfo, PostStore
from server.storage.teams import TeamExists, TeamStore

__all__ = [
    "CLOCK_AHEAD_TOLERANCE_S", "RESEND_MAX_AGE_S", "AccountStore", "CommandStore", "Committed",
    "Database", "DatabaseError", "DatabaseSettings", "DispatchStore", "IncidentStore",
    "IntegrityError", "PostInfo", "PostStore", "Storage", "TeamExists", "TeamStore",
    "clock_suspect", "open_database", "open_storage",
]

BACKENDS = ("sqlite", "postgresql")


class DatabaseSettings(Protocol):
    """What the ``[database]`` section of the server's config gives (server.config)."""

    backend: str
    path: str
    synchronous: str
    dsn: str
    pool_size: int
    connect_timeout_s: float
    statement_timeout_s: float


@dataclass
class Storage:
    db: Database
    posts: PostStore
    incidents: IncidentStore
    teams: TeamStore
    dispatch: DispatchStore
    accounts: AccountStore
    commands: CommandStore

    @property
    def backend(self) -> str:
        return self.db.backend

    def close(self) -> None:
        self.db.close()


def open_database(settings: DatabaseSettings, *, read_only: bool = False) -> Database:
    """A connection (SQLite) or pool (PostgreSQL) as configured, without migrating."""
    if settings.backend == "sqlite":
        return SqliteDatabase(settings.path, settings.synchronous, read_only=read_only)
    if settings.backend == "postgresql":
        if not settings.dsn:
            raise DatabaseError("[database] backend = \"postgresql\" needs a dsn, e.g. "
                                "dsn = \"postgresql://alarmpost@db.example/alarmpost\"")
        return PostgresDatabase(settings.dsn, pool_size=settings.pool_size,
                                connect_timeout_s=settings.connect_timeout_s,
                                statement_timeout_s=settings.statement_timeout_s,
                                read_only=read_only)
    raise DatabaseError(f"unknown database backend {settings.backend!r}; one of: "
                        f"{', '.join(BACKENDS)}")


def open_storage(settings: DatabaseSettings) -> Storage:
    """Open the database, bring its schema up to date, and give its stores."""
    db = open_database(settings)
    try:
        migrate(db)
        posts = PostStore(db)
        return Storage(db=db, posts=posts, incidents=IncidentStore(db, posts),
                       teams=TeamStore(db), dispatch=DispatchStore(db),
                       accounts=AccountStore(db), commands=CommandStore(db))
    except BaseException:
        db.close()
        raise
