"""Versioned schema migrations, one list per backend.

Each backend's module (:mod:`.sqlite`, :mod:`.postgresql`) is the one place its schema is
written: ``MIGRATIONS`` is a list of (version, name, step), a step being SQL text or a function
of the database. ``schema_version`` records what was applied; :func:`migrate` applies the rest in
order, each in its own transaction, so an interrupted upgrade resumes where it stopped.

A SQLite database written before versions were recorded (release 0.1) has the tables but no
``schema_version``: its migration 1 creates only what is missing and brings old columns and keys
up to date in place, then the later ones apply as on any database.
"""

from __future__ import annotations

import logging
import time

from server.storage.database import Database
from server.storage.migrations import postgresql, sqlite
from server.storage.migrations.steps import Migration

log = logging.getLogger("alarmpost.storage")


def migrations_for(db: Database) -> list[Migration]:
    return sqlite.MIGRATIONS if db.backend == "sqlite" else postgresql.MIGRATIONS


def current_version(db: Database) -> int:
    db.script("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
              "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
    return int(db.value("SELECT coalesce(max(version), 0) AS v FROM schema_version") or 0)


def migrate(db: Database) -> list[str]:
    """Apply every migration not yet applied; return the names of those applied now."""
    steps = migrations_for(db)
    have = current_version(db)
    latest = steps[-1][0]
    if have > latest:
        raise RuntimeError(f"the database's schema is version {have}, newer than this release's "
                           f"{latest}: run the release that wrote it, or a newer one")
    applied = []
    for version, name, step in steps:
        if version <= have:
            continue
        with db.transaction():
            if isinstance(step, str):
                db.script(step)
            else:
                step(db)
            db.execute("INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                       (version, name, time.time()))
        applied.append(f"{version:04d}_{name}")
        log.info("database schema: applied migration %04d %s", version, name)
    return applied
