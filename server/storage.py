"""Storage behind a small interface, so PostgreSQL can take over for multi-instance servers.

:class:`Storage` is the interface; :class:`SqliteStorage` is the embedded default (sqlite-utils,
WAL). An event is keyed by its post and its id: committing an event twice is a no-op that returns
the incident the first commit put it in, and another post's event with the same id is that post's
own event (a collision, counted by the caller), never a duplicate.

The incident lifecycle runs on the server's clock: an incident's ``opened_at`` and
``last_event_at`` are receipt times. The post's own time is kept as the event's ``pressed_at``; an
implausible one (ahead of the receipt beyond :data:`CLOCK_AHEAD_TOLERANCE_S`, or older than a
resend could explain, :data:`RESEND_MAX_AGE_S`) marks the event ``clock_suspect``. Per post the
storage follows the outbox ``epoch`` and the highest ``seq`` seen in it: a new event whose seq
repeats one of the same epoch, or goes below the highest, is a sequence anomaly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

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


# A post's clock may be this far ahead of the server's before its events are flagged.
CLOCK_AHEAD_TOLERANCE_S: Final = 300.0
# An event stamped longer ago than this is more than an outbox resend explains: flagged.
RESEND_MAX_AGE_S: Final = 30 * 86400.0


@dataclass(frozen=True)
class Committed:
    event_id: str
    incident_id: str
    duplicate: bool
    new_incident: bool
    test: bool = False  # opened while its post was in test mode (classified ``test``)
    collision: bool = False  # another post has an event with this id (this one is still new)
    clock_suspect: bool = False  # the post's stated time is implausible
    seq_anomaly: str = ""  # "regression" (below the epoch's highest) or "repeat"
    epoch_changed: str = ""  # the post's previous epoch, when this event starts a new one


def clock_suspect(pressed_at: float, received_at: float) -> bool:
    """True if a post's stated time cannot be right: ahead of the server beyond the tolerance,
    or older than any outbox resend (the post's outage) could explain."""
    return (pressed_at > received_at + CLOCK_AHEAD_TOLERANCE_S
            or pressed_at < received_at - RESEND_MAX_AGE_S)


class Storage(Protocol):
    def upsert_posts(self, posts: Iterable[PostInfo]) -> None: ...
    def commit_events(self, batch: Sequence[tuple[Event, float]]) -> list[Committed]: ...
    def post_states(self) -> dict[str, tuple[str, float | None]]: ...
    def set_post_state(self, post_id: str, state: str, at: float, reason: str) -> None: ...
    def open_fault(self, post_id: str, kind: str, detail: str, at: float) -> bool: ...
    def close_fault(self, post_id: str, kind: str, at: float) -> bool: ...
    def open_fault_kinds(self) -> dict[str, set[str]]: ...
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


_SCHEMA_TEMPLATE = """
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
    test_mode_reason TEXT NOT NULL DEFAULT '',
    epoch TEXT NOT NULL DEFAULT '',  -- the outbox epoch of the post's latest event
    max_seq INTEGER NOT NULL DEFAULT 0,  -- the highest seq seen in that epoch
    seq_regressions INTEGER NOT NULL DEFAULT 0,  -- new events below max_seq (same epoch)
    seq_repeats INTEGER NOT NULL DEFAULT 0,  -- new events reusing a seq (same epoch)
    epoch_changes INTEGER NOT NULL DEFAULT 0  -- the post's outbox started again (storage wiped)
);
CREATE TABLE IF NOT EXISTS incidents (
    id TEXT PRIMARY KEY,
    post_id TEXT NOT NULL REFERENCES posts(id),
    state TEXT NOT NULL,
    opened_at REAL NOT NULL,  -- the server's receipt time of the first event
    last_event_at REAL NOT NULL,  -- the server's receipt time of the latest event
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
$EVENTS_TABLE;
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

# Keyed by (post, id): an event id is unique only within its post.
_EVENTS_TABLE = """CREATE TABLE IF NOT EXISTS {name} (
    id TEXT NOT NULL,
    post_id TEXT NOT NULL REFERENCES posts(id),
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    pressed_at REAL NOT NULL,  -- the post's own clock, as it stated
    hold_ms INTEGER NOT NULL,
    received_at REAL NOT NULL,  -- the server's clock
    committed_at REAL NOT NULL,  -- written in the committing transaction, just before COMMIT
    incident_id TEXT NOT NULL REFERENCES incidents(id),
    epoch TEXT NOT NULL DEFAULT '',  -- the post's outbox epoch ('' from posts that send none)
    clock_suspect INTEGER NOT NULL DEFAULT 0,  -- pressed_at is implausible (see clock_suspect())
    PRIMARY KEY (post_id, id)
)"""
_EVENT_COLUMNS = ("id, post_id, seq, type, pressed_at, hold_ms, received_at, committed_at, "
                  "incident_id, epoch, clock_suspect")
# Indexes on columns a migration may have to add first.
_LATE_INDEXES = """
CREATE INDEX IF NOT EXISTS events_post ON events(post_id, seq);
CREATE INDEX IF NOT EXISTS events_post_epoch_seq ON events(post_id, epoch, seq);
CREATE INDEX IF NOT EXISTS events_id ON events(id);
CREATE INDEX IF NOT EXISTS events_incident ON events(incident_id);
"""

# Columns added after the first release: (table, column, definition). Databases created before
# get them by ALTER TABLE at start-up (SQLite cannot add a column "IF NOT EXISTS").
_ADDED_COLUMNS = (
    ("posts", "test_mode", "INTEGER NOT NULL DEFAULT 0"),
    ("posts", "test_mode_since", "REAL"),
    ("posts", "test_mode_by", "TEXT"),
    ("posts", "test_mode_reason", "TEXT NOT NULL DEFAULT ''"),
    ("posts", "epoch", "TEXT NOT NULL DEFAULT ''"),
    ("posts", "max_seq", "INTEGER NOT NULL DEFAULT 0"),
    ("posts", "seq_regressions", "INTEGER NOT NULL DEFAULT 0"),
    ("posts", "seq_repeats", "INTEGER NOT NULL DEFAULT 0"),
    ("posts", "epoch_changes", "INTEGER NOT NULL DEFAULT 0"),
)
_SCHEMA = _SCHEMA_TEMPLATE.replace("$EVENTS_TABLE", _EVENTS_TABLE.format(name="events"))


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Bring an older database up to this schema in place; return what was changed
    (``table.column`` for added columns, ``events.key`` when the events table was rebuilt)."""
    added = []
    for table, column, definition in _ADDED_COLUMNS:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})").fetchall()}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            added.append(f"{table}.{column}")
            if f"{table}.{column}" == "posts.max_seq":  # the highest seq each post has used
                db.execute("UPDATE posts SET max_seq = (SELECT coalesce(max(seq), 0) FROM events "
                           "WHERE events.post_id = posts.id)")
                db.conn.commit()
    key = [row[1] for row in sorted(db.execute("PRAGMA table_info(events)").fetchall(),
                                    key=lambda r: r[5]) if row[5]]
    if key != ["post_id", "id"]:
        # Releases before keyed events by id alone: rebuild the table (SQLite cannot change a
        # primary key) in one transaction, keeping every row.
        have = {row[1] for row in db.execute("PRAGMA table_info(events)").fetchall()}
        columns = [c.strip() for c in _EVENT_COLUMNS.split(",")]
        source = ", ".join(c if c in have else ("''" if c == "epoch" else "0") for c in columns)
        conn = db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DROP TABLE IF EXISTS events_rebuild")
            conn.execute(_EVENTS_TABLE.format(name="events_rebuild"))
            conn.execute(f"INSERT INTO events_rebuild ({_EVENT_COLUMNS}) SELECT {source} FROM events")
            conn.execute("DROP TABLE events")
            conn.execute("ALTER TABLE events_rebuild RENAME TO events")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        added.append("events.key")
    db.executescript(_LATE_INDEXES)
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
        self._seq: dict[str, tuple[str, int]] = {
            row["id"]: (row["epoch"], row["max_seq"])
            for row in self.db.query("SELECT id, epoch, max_seq FROM posts")
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
        """Commit a batch of events in one transaction; open or join each post's incident.

        ``batch`` holds (event, server receipt time). Incidents open and age on receipt times;
        the event's own ``ts`` is kept as ``pressed_at`` and flagged when implausible.
        """
        results: list[Committed] = []
        now = time.time()
        conn = self.db.conn
        opened: dict[str, str] = {}
        seqs = dict(self._seq)  # (epoch, highest seq) per post, as this batch leaves them
        tallies: dict[str, list[int]] = {}  # post -> [regressions, repeats, epoch changes]
        with self.db.atomic():
            for event, received_at in batch:
                row = conn.execute(
                    "SELECT incident_id FROM events WHERE post_id=? AND id=?", (event.post, event.id)
                ).fetchone()
                if row is not None:
                    results.append(Committed(event.id, row[0], True, False))
                    continue
                collision = conn.execute(
                    "SELECT 1 FROM events WHERE id=? AND post_id<>? LIMIT 1", (event.id, event.post)
                ).fetchone() is not None
                suspect = clock_suspect(event.ts, received_at)
                anomaly, old_epoch = self._check_seq(conn, event, seqs, tallies)
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
                        (incident_id, event.post, received_at, received_at, event.id,
                         "test" if test else None),
                    )
                    conn.execute(
                        "INSERT INTO audit (incident_id, at, actor, action, to_state, detail) "
                        "VALUES (?, ?, ?, 'opened', 'new', ?)",
                        (incident_id, now, f"post:{event.post}",
                         f"{event.type} event {event.id}" + (" (post in test mode)" if test else "")
                         + (" (the post's clock is implausible)" if suspect else "")),
                    )
                    opened[event.post] = incident_id
                else:
                    conn.execute(
                        "UPDATE incidents SET event_count = event_count + 1, "
                        "last_event_at = max(last_event_at, ?) WHERE id=?",
                        (received_at, incident_id),
                    )
                conn.execute(
                    f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (event.id, event.post, event.seq, event.type, event.ts, event.hold_ms,
                     received_at, time.time(), incident_id, event.epoch, int(suspect)),
                )
                results.append(Committed(event.id, incident_id, False, new, test, collision,
                                         suspect, anomaly, old_epoch))
            for post_id, (regressions, repeats, changes) in tallies.items():
                epoch, max_seq = seqs[post_id]
                conn.execute(
                    "UPDATE posts SET epoch=?, max_seq=?, seq_regressions=seq_regressions+?, "
                    "seq_repeats=seq_repeats+?, epoch_changes=epoch_changes+? WHERE id=?",
                    (epoch, max_seq, regressions, repeats, changes, post_id),
                )
        self._open_incident.update(opened)
        self._seq = seqs
        return results

    @staticmethod
    def _check_seq(conn: Any, event: Event, seqs: dict[str, tuple[str, int]],
                   tallies: dict[str, list[int]]) -> tuple[str, str]:
        """Follow the post's epoch and highest seq; return (anomaly, previous epoch if this
        event starts a new one). A first epoch after none ('') is not a change."""
        epoch, highest = seqs.get(event.post, ("", 0))
        tally = tallies.setdefault(event.post, [0, 0, 0])
        anomaly = changed = ""
        if event.epoch != epoch and epoch:
            # The post's outbox started again (storage wiped or replaced): seq starts afresh.
            changed = epoch
            tally[2] += 1
            highest = 0
        # (A first epoch after none is an upgraded post whose outbox, and seq, carry on.)
        if highest and event.seq <= highest:  # a number above the highest is new: no look-up
            if conn.execute("SELECT 1 FROM events WHERE post_id=? AND epoch=? AND seq=? LIMIT 1",
                            (event.post, event.epoch, event.seq)).fetchone() is not None:
                anomaly = "repeat"
                tally[1] += 1
            elif event.seq < highest:
                anomaly = "regression"
                tally[0] += 1
        seqs[event.post] = (event.epoch, max(highest, event.seq))
        return anomaly, changed

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
                    "UPDATE faults SET ended_at=? WHERE post_id=? AND kind='offline' "
                    "AND ended_at IS NULL",
                    (at, post_id),
                )

    def open_fault(self, post_id: str, kind: str, detail: str, at: float) -> bool:
        """Open a fault of ``kind`` unless one is open already; True if it was opened."""
        with self.db.atomic():
            if self.db.execute("SELECT 1 FROM faults WHERE post_id=? AND kind=? AND ended_at IS "
                               "NULL", (post_id, kind)).fetchone() is not None:
                return False
            self.db.execute(
                "INSERT INTO faults (post_id, kind, detail, started_at) VALUES (?, ?, ?, ?)",
                (post_id, kind, detail[:500], at),
            )
        return True

    def close_fault(self, post_id: str, kind: str, at: float) -> bool:
        """Close the open fault of ``kind``; True if there was one."""
        with self.db.atomic():
            closed = self.db.execute(
                "UPDATE faults SET ended_at=? WHERE post_id=? AND kind=? AND ended_at IS NULL",
                (at, post_id, kind),
            ).rowcount
        return bool(closed)

    def open_fault_kinds(self) -> dict[str, set[str]]:
        """The kinds of fault open per post (to carry on after a restart)."""
        kinds: dict[str, set[str]] = {}
        for row in self.db.query("SELECT post_id, kind FROM faults WHERE ended_at IS NULL"):
            kinds.setdefault(row["post_id"], set()).add(row["kind"])
        return kinds

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
            "SELECT * FROM events WHERE incident_id=? ORDER BY received_at, seq", (incident_id,)
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
