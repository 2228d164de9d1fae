"""The storage package on both backends: schema versions, the upgrade of a release-0.1 database
in place, and the guarantees the alarm path stands on (one transaction per event batch,
(post, event id) unique, append-only audit, durable commits)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from protocol.messages import Event
from protocol.ulid import new_ulid
from server.storage import DatabaseError, IntegrityError, Storage
from server.storage.migrations import current_version, migrate, migrations_for
from server.web.auth import Accounts
from tests.storage_helpers import postgres_storage, sqlite_storage

RELEASE_DB = Path(__file__).parent / "data" / "release-0.1.0.sqlite"
# What that file holds: written by release 0.1.0's own code (a deployment of three posts, two
# teams, two console users; five events, one incident resolved, one assigned to team T01).
RELEASE_USER, RELEASE_PASSWORD = "alice", "alice-password-1"


def event(post: str, seq: int = 1, event_id: str | None = None) -> Event:
    return Event(id=event_id or new_ulid(), post=post, seq=seq, ts=time.time())


# --------------------------------------------------------------------- schema versions
def test_a_new_database_records_every_migration_and_a_second_start_applies_none(
        storage: Storage) -> None:
    steps = migrations_for(storage.db)
    assert current_version(storage.db) == steps[-1][0]
    versions = [r["version"] for r in storage.db.query(
        "SELECT version FROM schema_version ORDER BY version")]
    assert versions == [v for v, _, _ in steps]
    assert migrate(storage.db) == []


def test_a_database_of_a_newer_release_is_refused(storage: Storage) -> None:
    storage.db.execute("INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                       (999, "from the future", time.time()))
    with pytest.raises(RuntimeError, match="newer than this release"):
        migrate(storage.db)


async def test_a_release_0_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "server.db"
    shutil.copy(RELEASE_DB, path)
    store = sqlite_storage(path)
    try:
        assert current_version(store.db) == migrations_for(store.db)[-1][0]
        # Everything the old release wrote is still there and readable through the stores.
        assert [p["id"] for p in store.posts.all()] == ["P001", "P002", "P003"]
        assert store.posts.in_test_mode("P003")
        assert store.posts.open_fault_kinds() == {"P002": {"storage"}, "P003": {"offline"}}
        resolved = [i for i in store.incidents.recent("closed", 10)]
        assert len(resolved) == 1 and resolved[0]["classification"] == "false_alarm"
        timeline = [a["action"] for a in store.incidents.audit(resolved[0]["id"])]
        assert timeline == ["opened", "acknowledged", "call_answered", "resolved"]
        assert store.incidents.open_count() == 1
        events = store.incidents.events(None, 10)
        assert len(events) == 5
        # An old event resent after the upgrade is a duplicate of the stored one.
        old = next(e for e in events if e["post_id"] == "P001")
        (again,) = store.incidents.commit_events([(Event(
            id=old["id"], post="P001", seq=old["seq"], ts=old["pressed_at"], epoch="ep1"),
            time.time())])
        assert again.duplicate and again.incident_id == old["incident_id"]
        # The old accounts log in; the old teams, pages and commands are there.
        accounts = Accounts(store.accounts)
        user = await accounts.verify_async(RELEASE_USER, RELEASE_PASSWORD)
        assert user is not None and user.role == "admin"
        assert [t["id"] for t in store.teams.all()] == ["T01", "T02"]
        assert store.teams.app_password_hash("T01") is not None
        job = store.dispatch.active_jobs()
        assert len(job) == 1 and job[0]["team_id"] == "T01" and len(job[0]["pages"]) == 1
        assert store.commands.recent(None, 10)[0]["state"] == "done"
        # The new registry version is there and counts from the upgrade on.
        version = store.teams.version()
        store.teams.add("T03", "Team Three", [], {}, "", time.time())
        assert store.teams.version() == version + 1
        with pytest.raises(IntegrityError, match="append-only"):
            store.db.execute("DELETE FROM audit")
    finally:
        store.close()
    again_store = sqlite_storage(path)  # a second start has nothing left to migrate
    try:
        assert migrate(again_store.db) == []
    finally:
        again_store.close()


# --------------------------------------------------------------------- the guarantees
def test_durability_settings_hold(storage: Storage) -> None:
    settings = storage.db.settings()
    if storage.backend == "sqlite":
        assert settings["journal_mode"] == "wal" and settings["synchronous"] == "2"  # FULL
    else:
        assert settings["synchronous_commit"] == "on" and settings["fsync"] == "on"


def test_an_event_batch_commits_in_one_transaction(storage: Storage) -> None:
    good, bad = event("P001"), event("P404")  # P404: no such post, refused by its foreign key
    with pytest.raises(IntegrityError):
        storage.incidents.commit_events([(good, time.time()), (bad, time.time())])
    assert storage.incidents.events(None, 10) == [], "half a batch was committed"
    assert storage.incidents.open_count() == 0
    # The store's memory followed the rollback: the same event commits as new afterwards.
    (ok,) = storage.incidents.commit_events([(good, time.time())])
    assert ok.new_incident and not ok.duplicate


def test_post_and_event_id_are_unique(storage: Storage) -> None:
    shared = new_ulid()
    first, same_post, other_post = storage.incidents.commit_events(
        [(event("P001", 1, shared), time.time()), (event("P001", 1, shared), time.time()),
         (event("P002", 1, shared), time.time())])
    assert not first.duplicate and same_post.duplicate and not other_post.duplicate
    assert other_post.collision
    row = storage.db.one("SELECT * FROM events WHERE post_id='P001'")
    assert row is not None
    columns = ", ".join(row)
    with pytest.raises(IntegrityError):
        storage.db.execute(f"INSERT INTO events ({columns}) VALUES "
                           f"({', '.join('?' for _ in row)})", tuple(row.values()))


@pytest.mark.parametrize("table", ["audit", "console_audit"])
def test_audit_tables_refuse_update_and_delete(storage: Storage, table: str) -> None:
    (res,) = storage.incidents.commit_events([(event("P001"), time.time())])
    storage.accounts.audit("alice", "user_added", "bob")
    for sql in (f"UPDATE {table} SET actor='mallory'", f"DELETE FROM {table}"):
        with pytest.raises(IntegrityError, match="append-only"):
            storage.db.execute(sql)
    assert storage.incidents.audit(res.incident_id)[0]["actor"] == "post:P001"


def test_a_failed_inner_block_rolls_back_alone(storage: Storage) -> None:
    with storage.db.transaction():
        storage.accounts.audit("alice", "kept")
        with pytest.raises(IntegrityError), storage.db.transaction():
            storage.accounts.audit("alice", "dropped")
            storage.db.execute("UPDATE console_audit SET actor='x'")
    assert [r["action"] for r in storage.accounts.audit_log(10)] == ["kept"]


def test_a_database_that_cannot_be_reached_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="cannot reach PostgreSQL"):
        postgres_storage("postgresql://nobody@127.0.0.1:1/nothing?connect_timeout=1")
