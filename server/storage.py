"""Storage behind a small interface, so PostgreSQL can take over for multi-instance servers.

:class:`Storage` is the interface; :class:`SqliteStorage` is the embedded default (sqlite-utils,
WAL). The event id is the primary key: committing an event twice is a no-op that returns the
incident the first commit put it in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import sqlite_utils

from protocol.messages import Event
from protocol.ulid import new_ulid
from server.incidents import CLOSED, next_state


@dataclass(frozen=True)
class PostInfo:
    id: str
    name: str = ""
    school: str = ""
    address: str = ""
    lat: float | None = None
    lon: float | None = None


@dataclass(frozen=True)
class Committed:
    event_id: str
    incident_id: str
    duplicate: bool
    new_incident: bool
    test: bool = False  # opened while its post was in test mode (classified ``test``)


class Storage(Protocol):
    def upsert_posts(self, posts: Iterable[PostInfo]) -> None: ...
    def commit_events(self, batch: Sequence[tuple[Event, float]]) -> list[Committed]: ...
    def post_states(self) -> dict[str, tuple[str, float | None]]: ...
    def set_post_state(self, post_id: str, state: str, at: float, reason: str) -> None: ...
    def set_test_mode(self, post_id: str, on: bool, actor: str, reason: str,
                      at: float | None = None) -> dict[str, Any]: ...
    def in_test_mode(self, post_id: str) -> bool: ...
    def save_live(self, rows: Sequence[tuple[str, float, str]]) -> None: ...
    def resolve_idle_incidents(self, idle_s: float, now: float) -> list[str]: ...
    def transition(self, incident_id: str, to: str, actor: str, *, reason: str = "",
                   classification: str | None = None,
                   at: float | None = None) -> dict[str, Any]: ...
    def audit(self, incident_id: str) -> list[dict[str, Any]]: ...
    def note(self, incident_id: str, actor: str, action: str, detail: str = "") -> None: ...
    def posts(self) -> list[dict[str, Any]]: ...
    def post(self, post_id: str) -> dict[str, Any] | None: ...
    def incidents(self, state: str | None, limit: int) -> list[dict[str, Any]]: ...
    def incident(self, incident_id: str) -> dict[str, Any] | None: ...
    def events(self, post_id: str | None, limit: int) -> list[dict[str, Any]]: ...
    def faults(self, open_only: bool, limit: int) -> list[dict[str, Any]]: ...
    def open_incident_count(self) -> int: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS posts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    school TEXT NOT NULL DEFAULT '',
    address TEXT NOT NULL DEFAULT '',
    lat REAL,
    lon REAL,
    state TEXT NOT NULL DEFAULT 'unknown',
    state_since REAL,
    last_seen REAL,
    health TEXT,
    test_mode INTEGER NOT NULL DEFAULT 0,  -- presses open incidents classified `test`, unpaged
    test_mode_since REAL,
    test_mode_by TEXT,
    test_mode_reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS incidents (
    id TEXT PRIMARY KEY,
    post_id TEXT NOT NULL REFERENCES posts(id),
    state TEXT NOT NULL,
    opened_at REAL NOT NULL,
    last_event_at REAL NOT NULL,
    closed_at REAL,
    event_count INTEGER NOT NULL,
    first_event_id TEXT NOT NULL,
    acknowledged_by TEXT,
    acknowledged_at REAL,
    classification TEXT,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS incidents_active ON incidents(post_id)
    WHERE state NOT IN ('resolved', 'cancelled');
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id TEXT NOT NULL REFERENCES incidents(id),
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audit_incident ON audit(incident_id, id);
-- The audit log is append-only.
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    post_id TEXT NOT NULL REFERENCES posts(id),
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    pressed_at REAL NOT NULL,
    hold_ms INTEGER NOT NULL,
    received_at REAL NOT NULL,
    committed_at REAL NOT NULL,  -- written in the committing transaction, just before COMMIT
    incident_id TEXT NOT NULL REFERENCES incidents(id)
);
CREATE INDEX IF NOT EXISTS events_post ON events(post_id, seq);
CREATE TABLE IF NOT EXISTS faults (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    post_id TEXT NOT NULL REFERENCES posts(id),
    kind TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    started_at REAL NOT NULL,
    ended_at REAL
);
CREATE INDEX IF NOT EXISTS faults_open ON faults(post_id) WHERE ended_at IS NULL;
"""

# Columns added after the first release: (table, column, definition). Databases created before
# get them by ALTER TABLE at start-up (SQLite cannot add a column "IF NOT EXISTS").
_ADDED_COLUMNS = (
    ("posts", "test_mode", "INTEGER NOT NULL DEFAULT 0"),
    ("posts", "test_mode_since", "REAL"),
    ("posts", "test_mode_by", "TEXT"),
    ("posts", "test_mode_reason", "TEXT NOT NULL DEFAULT ''"),
)


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Add the columns an older database lacks; return ``table.column`` of those added."""
    added = []
    for table, column, definition in _ADDED_COLUMNS:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})").fetchall()}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            added.append(f"{table}.{column}")
    return added


class SqliteStorage:
    """SQLite in WAL mode. Writes come from one event loop; reads may share the connection."""

    def __init__(self, path: str, synchronous: str = "FULL") -> None:
        self.db = sqlite_utils.Database(path)
        self.db.enable_wal()
        self.db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)
        migrate(self.db)
        # Posts in test mode: the alarm path's only look-up (when an incident opens).
        self._test_posts: set[str] = {
            row["id"] for row in self.db.query("SELECT id FROM posts WHERE test_mode=1")
        }
        self._open_incident: dict[str, str] = {
            row["post_id"]: row["id"]
            for row in self.db.query(
                "SELECT id, post_id FROM incidents WHERE state NOT IN ('resolved', 'cancelled')"
            )
        }

    # -------------------------------------------------------------- writes
    def upsert_posts(self, posts: Iterable[PostInfo]) -> None:
        with self.db.atomic():
            for p in posts:
                self.db.execute(
                    "INSERT INTO posts (id, name, school, address, lat, lon) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET name=excluded.name, "
                    "school=excluded.school, address=excluded.address, lat=excluded.lat, "
                    "lon=excluded.lon",
                    (p.id, p.name, p.school, p.address, p.lat, p.lon),
                )

    def commit_events(self, batch: Sequence[tuple[Event, float]]) -> list[Committed]:
        """Commit a batch of events in one transaction; open or join each post's incident."""
        results: list[Committed] = []
        now = time.time()
        conn = self.db.conn
        opened: dict[str, str] = {}
        with self.db.atomic():
            for event, received_at in batch:
                row = conn.execute(
                    "SELECT incident_id FROM events WHERE id=?", (event.id,)
                ).fetchone()
                if row is not None:
                    results.append(Committed(event.id, row[0], True, False))
                    continue
                incident_id = opened.get(event.post) or self._open_incident.get(event.post)
                new = incident_id is None
                test = False
                if incident_id is None:
                    incident_id = new_ulid(now)
                    test = event.post in self._test_posts
                    conn.execute(
                        "INSERT INTO incidents (id, post_id, state, opened_at, last_event_at, "
                        "event_count, first_event_id, classification) "
                        "VALUES (?, ?, 'new', ?, ?, 1, ?, ?)",
                        (incident_id, event.post, now, event.ts, event.id,
                         "test" if test else None),
                    )
                    conn.execute(
                        "INSERT INTO audit (incident_id, at, actor, action, to_state, detail) "
                        "VALUES (?, ?, ?, 'opened', 'new', ?)",
                        (incident_id, now, f"post:{event.post}",
                         f"{event.type} event {event.id}" + (" (post in test mode)" if test else "")),
                    )
                    opened[event.post] = incident_id
                else:
                    conn.execute(
                        "UPDATE incidents SET event_count = event_count + 1, "
                        "last_event_at = max(last_event_at, ?) WHERE id=?",
                        (event.ts, incident_id),
                    )
                conn.execute(
                    "INSERT INTO events (id, post_id, seq, type, pressed_at, hold_ms, "
                    "received_at, committed_at, incident_id) VALUES (?,?,?,?,?,?,?,?,?)",
                    (event.id, event.post, event.seq, event.type, event.ts, event.hold_ms,
                     received_at, time.time(), incident_id),
                )
                results.append(Committed(event.id, incident_id, False, new, test))
        self._open_incident.update(opened)
        return results

    def post_states(self) -> dict[str, tuple[str, float | None]]:
        return {
            r["id"]: (r["state"], r["last_seen"])
            for r in self.db.query("SELECT id, state, last_seen FROM posts")
        }

    def set_post_state(self, post_id: str, state: str, at: float, reason: str) -> None:
        """Record a transition; going offline opens a fault, coming back closes it."""
        with self.db.atomic():
            self.db.execute(
                "UPDATE posts SET state=?, state_since=? WHERE id=?", (state, at, post_id)
            )
            if state == "offline":
                self.db.execute(
                    "INSERT INTO faults (post_id, kind, detail, started_at) VALUES (?, ?, ?, ?)",
                    (post_id, "offline", reason, at),
                )
            else:
                self.db.execute(
                    "UPDATE faults SET ended_at=? WHERE post_id=? AND ended_at IS NULL",
                    (at, post_id),
                )

    def set_test_mode(self, post_id: str, on: bool, actor: str, reason: str,
                      at: float | None = None) -> dict[str, Any]:
        """Put a post in test mode or take it out (who, when, why are kept on the post); return
        the post. Raises ``LookupError`` for an unknown post."""
        at = time.time() if at is None else at
        with self.db.atomic():
            changed = self.db.execute(
                "UPDATE posts SET test_mode=?, test_mode_since=?, test_mode_by=?, "
                "test_mode_reason=? WHERE id=?",
                (int(on), at, actor, reason[:500], post_id),
            ).rowcount
        if not changed:
            raise LookupError(f"no post {post_id!r}")
        if on:
            self._test_posts.add(post_id)
        else:
            self._test_posts.discard(post_id)
        row = self.post(post_id)
        assert row is not None
        return row

    def in_test_mode(self, post_id: str) -> bool:
        return post_id in self._test_posts

    def save_live(self, rows: Sequence[tuple[str, float, str]]) -> None:
        """Persist (post_id, last_seen, health JSON) in one transaction."""
        with self.db.atomic():
            self.db.conn.executemany(
                "UPDATE posts SET last_seen=?, health=? WHERE id=?",
                [(seen, health, post_id) for post_id, seen, health in rows],
            )

    def transition(
        self,
        incident_id: str,
        to: str,
        actor: str,
        *,
        reason: str = "",
        classification: str | None = None,
        at: float | None = None,
    ) -> dict[str, Any]:
        """Move an incident (rules in :mod:`server.incidents`), append to the audit log, and
        return the incident as it is now. Raises ``LookupError`` or ``InvalidTransition``."""
        at = time.time() if at is None else at
        with self.db.atomic():
            row = self.db.conn.execute(
                "SELECT state FROM incidents WHERE id=?", (incident_id,)
            ).fetchone()
            if row is None:
                raise LookupError(f"no incident {incident_id!r}")
            current = row[0]
            new = next_state(current, to, classification)
            sets = ["state=?"]
            values: list[Any] = [new]
            if to == "acknowledged":
                sets += ["acknowledged_by=coalesce(acknowledged_by, ?)",
                         "acknowledged_at=coalesce(acknowledged_at, ?)"]
                values += [actor, at]
            if new in CLOSED:
                sets += ["closed_at=?", "classification=?", "note=?"]
                values += [at, classification, reason]
            self.db.conn.execute(
                f"UPDATE incidents SET {', '.join(sets)} WHERE id=?", (*values, incident_id)
            )
            self.db.conn.execute(
                "INSERT INTO audit (incident_id, at, actor, action, from_state, to_state, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (incident_id, at, actor, to, current, new,
                 reason if not classification else f"{classification}: {reason}".rstrip(": ")),
            )
        if new in CLOSED:
            self._open_incident = {
                p: i for p, i in self._open_incident.items() if i != incident_id
            }
        result = self.incident(incident_id)
        assert result is not None
        return result

    def note(self, incident_id: str, actor: str, action: str, detail: str = "") -> None:
        """Append an entry that does not change the state (a command, a call) to the audit log."""
        with self.db.atomic():
            self.db.execute(
                "INSERT INTO audit (incident_id, at, actor, action, detail) "
                "SELECT id, ?, ?, ?, ? FROM incidents WHERE id=?",
                (time.time(), actor, action, detail[:500], incident_id),
            )

    def audit(self, incident_id: str) -> list[dict[str, Any]]:
        return list(self.db.query(
            "SELECT at, actor, action, from_state, to_state, detail FROM audit "
            "WHERE incident_id=? ORDER BY id", (incident_id,)
        ))

    def resolve_idle_incidents(self, idle_s: float, now: float) -> list[str]:
        """Resolve (as ``test``) active incidents whose last press is older than ``idle_s``."""
        ids = [
            r["id"]
            for r in self.db.query(
                "SELECT id FROM incidents WHERE state NOT IN ('resolved', 'cancelled') "
                "AND last_event_at < ?",
                (now - idle_s,),
            )
        ]
        for incident_id in ids:
            self.transition(incident_id, "resolved", "system", classification="test",
                            reason=f"resolved automatically after {idle_s:g} s idle", at=now)
        return ids

    # -------------------------------------------------------------- reads
    def posts(self) -> list[dict[str, Any]]:
        return [_post_row(r) for r in self.db.query("SELECT * FROM posts ORDER BY id")]

    def post(self, post_id: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM posts WHERE id=?", (post_id,)))
        return _post_row(rows[0]) if rows else None

    def incidents(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first. ``state``: one of the states, or "open" (active) or "closed"."""
        params: tuple[str, ...] = ()
        if state == "open":
            where = "state NOT IN ('resolved', 'cancelled')"
        elif state == "closed":
            where = "state IN ('resolved', 'cancelled')"
        elif state:
            where, params = "state=?", (state,)
        if state:
            return list(self.db.query(
                f"SELECT * FROM incidents WHERE {where} ORDER BY opened_at DESC LIMIT ?",
                (*params, limit),
            ))
        return list(self.db.query(
            "SELECT * FROM incidents ORDER BY opened_at DESC LIMIT ?", (limit,)
        ))

    def incident(self, incident_id: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM incidents WHERE id=?", (incident_id,)))
        if not rows:
            return None
        row = rows[0]
        row["events"] = list(self.db.query(
            "SELECT * FROM events WHERE incident_id=? ORDER BY pressed_at", (incident_id,)
        ))
        row["timeline"] = self.audit(incident_id)
        return row

    def events(self, post_id: str | None, limit: int) -> list[dict[str, Any]]:
        if post_id:
            return list(self.db.query(
                "SELECT * FROM events WHERE post_id=? ORDER BY committed_at DESC LIMIT ?",
                (post_id, limit),
            ))
        return list(self.db.query(
            "SELECT * FROM events ORDER BY committed_at DESC LIMIT ?", (limit,)
        ))

    def faults(self, open_only: bool, limit: int) -> list[dict[str, Any]]:
        where = "WHERE ended_at IS NULL" if open_only else ""
        return list(self.db.query(
            f"SELECT * FROM faults {where} ORDER BY started_at DESC LIMIT ?", (limit,)
        ))

    def open_incident_count(self) -> int:
        return len(self._open_incident)

    def close(self) -> None:
        self.db.close()


def _post_row(row: dict[str, Any]) -> dict[str, Any]:
    health = row.get("health")
    row["health"] = json.loads(health) if health else None
    return row
