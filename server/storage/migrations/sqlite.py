"""The SQLite schema (the embedded default), as versioned migrations.

Timestamps are seconds since the epoch (REAL); flags are INTEGER 0/1; the audit tables refuse
UPDATE and DELETE by trigger.
"""

from __future__ import annotations

from server.storage.database import Database, SqliteDatabase
from server.storage.migrations.steps import Migration

# Release 0.1's tables, every one created only when missing (a database of that release has them).
INITIAL = """
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
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    post_id TEXT NOT NULL,
    cmd TEXT NOT NULL,
    actor TEXT NOT NULL,
    incident_id TEXT,
    sent_at REAL NOT NULL,
    state TEXT NOT NULL,
    answered_at REAL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS commands_post ON commands(post_id, sent_at);
CREATE TABLE IF NOT EXISTS teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    contacts TEXT NOT NULL DEFAULT '[]',
    zone TEXT NOT NULL DEFAULT '{}',
    shift TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS team_live (
    team_id TEXT PRIMARY KEY,
    status TEXT,
    status_at REAL,
    lat REAL,
    lon REAL,
    position_at REAL
);
CREATE TABLE IF NOT EXISTS team_app_passwords (
    team_id TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS team_sessions (
    token_hash TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dispatch (
    incident_id TEXT PRIMARY KEY,
    post_id TEXT NOT NULL,
    state TEXT NOT NULL,            -- queued | paging | assigned | done
    team_id TEXT,                   -- the team that accepted
    attempts INTEGER NOT NULL DEFAULT 0,   -- direct pages sent
    rounds INTEGER NOT NULL DEFAULT 0,     -- broadcast rounds sent
    reason TEXT NOT NULL DEFAULT '',       -- why it is queued
    exclude TEXT NOT NULL DEFAULT '[]',    -- teams an operator took off this incident
    pressed_at REAL,
    opened_at REAL NOT NULL,
    first_page_at REAL,
    accepted_at REAL,
    en_route_at REAL,
    on_scene_at REAL,
    closed_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dispatch_active ON dispatch(state) WHERE state != 'done';
CREATE TABLE IF NOT EXISTS pages (
    id TEXT PRIMARY KEY,
    incident_id TEXT NOT NULL,
    team_id TEXT NOT NULL,
    kind TEXT NOT NULL,             -- direct | broadcast | operator
    sent_at REAL NOT NULL,
    deadline REAL NOT NULL,
    state TEXT NOT NULL,            -- waiting | accepted | declined | timeout | withdrawn | cancelled
    published_at REAL,              -- handed to the broker (QoS 1 PUBACK)
    answered_at REAL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS pages_incident ON pages(incident_id);
CREATE INDEX IF NOT EXISTS pages_waiting ON pages(state) WHERE state = 'waiting';
CREATE TABLE IF NOT EXISTS console_users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS console_sessions (
    token_hash TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES console_users(name),
    csrf TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS console_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    remote TEXT NOT NULL DEFAULT ''
);
CREATE TRIGGER IF NOT EXISTS console_audit_no_update BEFORE UPDATE ON console_audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS console_audit_no_delete BEFORE DELETE ON console_audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

# Keyed by (post, id): an event id is unique only within its post.
EVENTS_TABLE = """CREATE TABLE IF NOT EXISTS {name} (
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
    clock_suspect INTEGER NOT NULL DEFAULT 0,  -- pressed_at is implausible
    PRIMARY KEY (post_id, id)
)"""
EVENT_COLUMNS = ("id, post_id, seq, type, pressed_at, hold_ms, received_at, committed_at, "
                 "incident_id, epoch, clock_suspect")

EVENT_INDEXES = """
CREATE INDEX IF NOT EXISTS events_post ON events(post_id, seq);
CREATE INDEX IF NOT EXISTS events_post_epoch_seq ON events(post_id, epoch, seq);
CREATE INDEX IF NOT EXISTS events_id ON events(id);
CREATE INDEX IF NOT EXISTS events_incident ON events(incident_id);
"""

# Columns added during release 0.1: databases created before get them in place.
ADDED_COLUMNS = (
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


def initial(db: Database) -> None:
    """Create what is missing; bring a release-0.1 database's columns and keys up to date."""
    assert isinstance(db, SqliteDatabase)
    db.script(INITIAL.replace("$EVENTS_TABLE", EVENTS_TABLE.format(name="events")))
    for table, column, definition in ADDED_COLUMNS:
        if column not in {name for name, _ in db.table_columns(table)}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            if (table, column) == ("posts", "max_seq"):  # the highest seq each post has used
                db.execute("UPDATE posts SET max_seq = (SELECT coalesce(max(seq), 0) FROM events "
                           "WHERE events.post_id = posts.id)")
    columns = db.table_columns("events")
    key = [name for name, pk in sorted(columns, key=lambda c: c[1]) if pk]
    if key != ["post_id", "id"]:
        # Early databases keyed events by id alone: rebuild the table (SQLite cannot change a
        # primary key), keeping every row.
        have = {name for name, _ in columns}
        wanted = [c.strip() for c in EVENT_COLUMNS.split(",")]
        source = ", ".join(c if c in have else ("''" if c == "epoch" else "0") for c in wanted)
        db.execute("DROP TABLE IF EXISTS events_rebuild")
        db.execute(EVENTS_TABLE.format(name="events_rebuild"))
        db.execute(f"INSERT INTO events_rebuild ({EVENT_COLUMNS}) SELECT {source} FROM events")
        db.execute("DROP TABLE events")
        db.execute("ALTER TABLE events_rebuild RENAME TO events")
    db.script(EVENT_INDEXES)


# Release 0.2: a version per registry, so every server instance sees a change another process
# made (a team added from the command line) without re-reading the registry all the time.
REGISTRY_VERSIONS = """
CREATE TABLE registry_versions (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL DEFAULT 0
);
INSERT INTO registry_versions (name, version) VALUES ('teams', 0);
"""

MIGRATIONS: list[Migration] = [
    (1, "initial", initial),
    (2, "registry_versions", REGISTRY_VERSIONS),
]
