"""One small database interface over two backends: SQLite (embedded default) and PostgreSQL.

The stores of this package write their SQL once, in the subset both databases speak: ``?``
placeholders, ``ON CONFLICT ... DO UPDATE/NOTHING``, ``RETURNING``, ``coalesce``, ``CASE``, and
identifiers that are keywords in PostgreSQL (``"user"``) double-quoted. What differs lives in
each backend's schema (:mod:`server.storage.migrations`), never in a store.

Both backends are used synchronously from the server's event loop, as SQLite always was: a
statement on loopback PostgreSQL costs ~0.1 ms, a commit one WAL flush. Every call is bounded
(PostgreSQL: ``connect_timeout``, ``statement_timeout``, the pool's wait), so a database that
stops answering fails the call instead of hanging the server.

A transaction is ``with db.transaction():``. Blocks nest: an inner block is a savepoint, rolled
back alone if it raises. A statement outside any block commits on its own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

log = logging.getLogger("alarmpost.storage")

Params = Sequence[Any]


class DatabaseError(RuntimeError):
    """The database refused or could not be reached; the message says which and what to do."""


class IntegrityError(DatabaseError):
    """A constraint refused a write (unique key, foreign key, an append-only table)."""


class Database(ABC):
    """What the stores need of a database."""

    backend: ClassVar[str]

    @abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[None]: ...

    @abstractmethod
    def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; return the number of rows it changed."""

    @abstractmethod
    def executemany(self, sql: str, rows: Iterable[Params]) -> None: ...

    @abstractmethod
    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]: ...

    def one(self, sql: str, params: Params = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def value(self, sql: str, params: Params = ()) -> Any:
        """The first column of the first row, or None."""
        row = self.one(sql, params)
        return next(iter(row.values())) if row else None

    @abstractmethod
    def script(self, sql: str) -> None:
        """Run several statements (schema migrations only)."""

    @abstractmethod
    def settings(self) -> dict[str, str]:
        """The durability settings in force, as the database reports them."""

    @abstractmethod
    def close(self) -> None: ...


# ---------------------------------------------------------------------------- SQLite
class SqliteDatabase(Database):
    """sqlite-utils on one connection, WAL, foreign keys on, ``synchronous`` as configured
    (FULL by default: a committed, and so acknowledged, event survives a power cut)."""

    backend = "sqlite"

    def __init__(self, path: str, synchronous: str = "FULL", *, read_only: bool = False) -> None:
        import sqlite3

        import sqlite_utils

        self._sqlite3 = sqlite3
        self.path = path
        if read_only:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            self.db = sqlite_utils.Database(conn)
        else:
            try:
                self.db = sqlite_utils.Database(path)
            except sqlite3.Error as exc:
                raise DatabaseError(f"cannot open the database {path}: {exc}") from None
            self.db.enable_wal()
            self.db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._errors(), self.db.atomic():
            yield

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except self._sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        except self._sqlite3.Error as exc:
            raise DatabaseError(f"database {self.path}: {exc}") from exc

    def execute(self, sql: str, params: Params = ()) -> int:
        with self._errors():
            if self.db.conn.in_transaction:
                return int(self.db.execute(sql, params).rowcount)
            with self.db.atomic():
                return int(self.db.execute(sql, params).rowcount)

    def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        """All rows or none: in its own transaction, or as part of the one open."""
        with self._errors():
            if self.db.conn.in_transaction:
                self.db.conn.executemany(sql, rows)
                return
            with self.db.atomic():
                self.db.conn.executemany(sql, rows)

    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        with self._errors():
            return list(self.db.query(sql, params))

    def script(self, sql: str) -> None:
        with self._errors():
            if not self.db.conn.in_transaction:
                self.db.executescript(sql)
                return
            # executescript() would COMMIT the open transaction first: one statement at a time.
            pending = ""
            for line in sql.splitlines(keepends=True):
                pending += line
                if self._sqlite3.complete_statement(pending):
                    self.db.conn.execute(pending)
                    pending = ""
            if pending.strip():
                self.db.conn.execute(pending)

    def settings(self) -> dict[str, str]:
        return {
            "journal_mode": str(self.db.execute("PRAGMA journal_mode").fetchone()[0]),
            "synchronous": str(self.db.execute("PRAGMA synchronous").fetchone()[0]),
            "foreign_keys": str(self.db.execute("PRAGMA foreign_keys").fetchone()[0]),
        }

    def data_version(self) -> int:
        """Changes when another connection commits (SQLite only)."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def table_columns(self, table: str) -> list[tuple[str, int]]:
        """(name, primary-key position) of each column (schema migrations)."""
        return [(r[1], r[5]) for r in self.db.execute(f"PRAGMA table_info({table})").fetchall()]

    def close(self) -> None:
        self.db.close()


# ---------------------------------------------------------------------------- PostgreSQL
class PostgresDatabase(Database):
    """psycopg 3 with a connection pool. Each connection runs with ``synchronous_commit = on``
    (a COMMIT returns once its WAL is flushed) and a statement timeout. A transaction holds one
    connection of the pool from its outermost block to its end."""

    backend = "postgresql"

    def __init__(self, dsn: str, *, pool_size: int = 4, connect_timeout_s: float = 5.0,
                 statement_timeout_s: float = 5.0, read_only: bool = False) -> None:
        import psycopg
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        self._psycopg = psycopg
        self.dsn = dsn
        options = (f"-c synchronous_commit=on -c statement_timeout={int(statement_timeout_s * 1000)}"
                   " -c TimeZone=UTC")
        if read_only:
            options += " -c default_transaction_read_only=on"
        self._pool = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, open=False, timeout=connect_timeout_s,
            kwargs={"autocommit": True, "row_factory": dict_row, "options": options,
                    "connect_timeout": max(1, int(connect_timeout_s))},
            name="alarmpost",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except Exception as exc:
            self._pool.close()
            raise DatabaseError(f"cannot reach PostgreSQL at {_safe_dsn(dsn)}: {exc}; check "
                                "[database] dsn and that the server runs") from None
        self._local = threading.local()
        self._sql: dict[str, str] = {}

    def _translate(self, sql: str) -> str:
        out = self._sql.get(sql)
        if out is None:
            out = self._sql[sql] = sql.replace("%", "%%").replace("?", "%s")
        return out

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        psycopg = self._psycopg
        try:
            yield
        except (psycopg.errors.IntegrityError, psycopg.errors.RaiseException) as exc:
            raise IntegrityError(_message(exc)) from exc  # (the append-only triggers raise)
        except psycopg.Error as exc:
            raise DatabaseError(f"PostgreSQL: {_message(exc)}") from exc
        except UnicodeEncodeError as exc:  # a lone surrogate in a parameter: not storable text
            raise DatabaseError(f"PostgreSQL: a parameter is not text ({exc.reason})") from exc
        except Exception as exc:
            if type(exc).__name__ == "PoolTimeout":
                raise DatabaseError(f"PostgreSQL: no connection within the timeout ({exc})") from exc
            raise

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        with self._errors(), self._pool.connection() as conn:
            yield conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        outer = getattr(self._local, "conn", None)
        if outer is not None:
            with self._errors(), outer.transaction():  # a savepoint
                yield
            return
        with self._errors(), self._pool.connection() as conn:
            self._local.conn = conn
            try:
                with conn.transaction():
                    yield
            finally:
                self._local.conn = None

    def execute(self, sql: str, params: Params = ()) -> int:
        with self._errors(), self._connection() as conn:
            return int(conn.execute(self._translate(sql), params).rowcount)

    def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        """All rows or none: in its own transaction, or as part of the one open (no savepoint:
        two round trips fewer)."""
        if getattr(self._local, "conn", None) is not None:
            with self._errors(), self._local.conn.cursor() as cur:
                cur.executemany(self._translate(sql), list(rows))
            return
        with self.transaction(), self._connection() as conn, conn.cursor() as cur:
            cur.executemany(self._translate(sql), list(rows))

    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        with self._errors(), self._connection() as conn:
            return list(conn.execute(self._translate(sql), params).fetchall())

    def script(self, sql: str) -> None:
        with self._errors(), self._connection() as conn:
            conn.execute(sql)

    def settings(self) -> dict[str, str]:
        return {name: str(self.value(f"SHOW {name}"))
                for name in ("synchronous_commit", "fsync", "statement_timeout")}

    def close(self) -> None:
        self._pool.close()


def _message(exc: Exception) -> str:
    """PostgreSQL's own message, without the context lines psycopg appends."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    return str(primary) if primary else str(exc).strip().splitlines()[0]


def _safe_dsn(dsn: str) -> str:
    """The DSN without its password (never logged)."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        parts = conninfo_to_dict(dsn)
        if "password" in parts:
            parts["password"] = "***"
        return make_conninfo("", **parts)
    except Exception:
        return "(the configured DSN)"
