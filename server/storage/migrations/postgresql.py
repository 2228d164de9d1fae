"""The PostgreSQL schema, as versioned migrations.

The same tables and keys as SQLite's (:mod:`.sqlite`): timestamps in seconds since the epoch
(DOUBLE PRECISION, never REAL, which is 4 bytes here), flags INTEGER 0/1, (post, event id) the
events' primary key, and the audit tables append-only through triggers that raise.
"""

from __future__ import annotations

from server.storage.migrations.steps import Migration

INITIAL = """
CREATE TABLE posts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    school TEXT NOT NULL DEFAULT '',
    address TEXT NOT NULL DEFAULT '',
    lat DOUBLE PRECISION,
    lon DOUBLE PRECISION,
    state TEXT NOT NULL DEFAULT 'unknown',
    state_since DOUBLE PRECISION,
    last_seen DOUBLE PRECISION,
    health TEXT,
    test_mode INTEGER NOT NULL DEFAULT 0,
    test_mode_since DOUBLE PRECISION,
    test_mode_by TEXT,
    test_mode_reason TEXT NOT NULL DEFAULT '',
    epoch TEXT NOT NULL DEFAULT '',
    max_seq BIGINT NOT NULL DEFAULT 0,
    seq_regressions BIGINT NOT NULL DEFAULT 0,
    seq_repeats BIGINT NOT NULL DEFAULT 0,
    epoch_changes BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE incidents (
    id TEXT PRIMARY KEY,
    post_id TEXT NOT NULL REFERENCES posts(id),
    state TEXT NOT NULL,
    opened_at DOUBLE PRECISION NOT NULL,
    last_event_at DOUBLE PRECISION NOT NULL,
    closed_at DOUBLE PRECISION,
    event_count BIGINT NOT NULL,
    first_event_id TEXT NOT NULL,
    acknowledged_by TEXT,
    acknowledged_at DOUBLE PRECISION,
    classification TEXT,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX incidents_active ON incidents(post_id) WHERE state NOT IN ('resolved', 'cancelled');
CREATE TABLE audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id TEXT NOT NULL REFERENCES incidents(id),
    at DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_incident ON audit(incident_id, id);
CREATE FUNCTION alarmpost_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only' USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION alarmpost_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION alarmpost_append_only();
CREATE TABLE events (
    id TEXT NOT NULL,
    post_id TEXT NOT NULL REFERENCES posts(id),
    seq BIGINT NOT NULL,
    type TEXT NOT NULL,
    pressed_at DOUBLE PRECISION NOT NULL,
    hold_ms BIGINT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    committed_at DOUBLE PRECISION NOT NULL,
    incident_id TEXT NOT NULL REFERENCES incidents(id),
    epoch TEXT NOT NULL DEFAULT '',
    clock_suspect INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (post_id, id)
);
CREATE INDEX events_post ON events(post_id, seq);
CREATE INDEX events_post_epoch_seq ON events(post_id, epoch, seq);
CREATE INDEX events_id ON events(id);
CREATE INDEX events_incident ON events(incident_id);
CREATE INDEX events_committed ON events(committed_at);
CREATE TABLE faults (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    post_id TEXT NOT NULL REFERENCES posts(id),
    kind TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    started_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION
);
CREATE INDEX faults_open ON faults(post_id) WHERE ended_at IS NULL;
CREATE TABLE commands (
    id TEXT PRIMARY KEY,
    post_id TEXT NOT NULL,
    cmd TEXT NOT NULL,
    actor TEXT NOT NULL,
    incident_id TEXT,
    sent_at DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL,
    answered_at DOUBLE PRECISION,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX commands_post ON commands(post_id, sent_at);
CREATE TABLE teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    contacts TEXT NOT NULL DEFAULT '[]',
    zone TEXT NOT NULL DEFAULT '{}',
    shift TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE team_live (
    team_id TEXT PRIMARY KEY,
    status TEXT,
    status_at DOUBLE PRECISION,
    lat DOUBLE PRECISION,
    lon DOUBLE PRECISION,
    position_at DOUBLE PRECISION
);
CREATE TABLE team_app_passwords (
    team_id TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE team_sessions (
    token_hash TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE dispatch (
    incident_id TEXT PRIMARY KEY,
    post_id TEXT NOT NULL,
    state TEXT NOT NULL,
    team_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    rounds INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    exclude TEXT NOT NULL DEFAULT '[]',
    pressed_at DOUBLE PRECISION,
    opened_at DOUBLE PRECISION NOT NULL,
    first_page_at DOUBLE PRECISION,
    accepted_at DOUBLE PRECISION,
    en_route_at DOUBLE PRECISION,
    on_scene_at DOUBLE PRECISION,
    closed_at DOUBLE PRECISION,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX dispatch_active ON dispatch(state) WHERE state <> 'done';
CREATE TABLE pages (
    id TEXT PRIMARY KEY,
    incident_id TEXT NOT NULL,
    team_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    sent_at DOUBLE PRECISION NOT NULL,
    deadline DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL,
    published_at DOUBLE PRECISION,
    answered_at DOUBLE PRECISION,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX pages_incident ON pages(incident_id);
CREATE INDEX pages_waiting ON pages(state) WHERE state = 'waiting';
CREATE TABLE console_users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE console_sessions (
    token_hash TEXT PRIMARY KEY,
    "user" TEXT NOT NULL REFERENCES console_users(name),
    csrf TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE console_audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    remote TEXT NOT NULL DEFAULT ''
);
CREATE TRIGGER console_audit_append_only BEFORE UPDATE OR DELETE ON console_audit
    FOR EACH ROW EXECUTE FUNCTION alarmpost_append_only();
CREATE TRIGGER console_audit_no_truncate BEFORE TRUNCATE ON console_audit
    FOR EACH STATEMENT EXECUTE FUNCTION alarmpost_append_only();
CREATE TABLE registry_versions (
    name TEXT PRIMARY KEY,
    version BIGINT NOT NULL DEFAULT 0
);
INSERT INTO registry_versions (name, version) VALUES ('teams', 0);
"""

MIGRATIONS: list[Migration] = [
    (1, "initial", INITIAL),
    (2, "registry_versions", "SELECT 1"),  # part of 1 on PostgreSQL: the numbers stay in step
]
