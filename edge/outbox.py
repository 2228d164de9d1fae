"""The durable outbox: every event is on disk before it is sent, and leaves only on the ACK.

Standard-library sqlite3 (no sqlite-utils on the edge: it costs ~17 MB of RSS), WAL journal,
``synchronous=FULL`` so a committed event survives a power cut, not just a crash.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from protocol.messages import Event, encode

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('last_seq', 0);
"""


class Pending(NamedTuple):
    seq: int
    id: str
    payload: bytes


class Outbox:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def add(self, make: Callable[[int], Event]) -> Event:
        """Allocate the next sequence number, build the event with it, and commit both."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            (last,) = db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
            event = make(last + 1)
            db.execute("UPDATE meta SET value=? WHERE key='last_seq'", (event.seq,))
            db.execute(
                "INSERT INTO outbox (seq, id, payload, created) VALUES (?, ?, ?, ?)",
                (event.seq, event.id, encode(event), event.ts),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return event

    def pending(self) -> list[Pending]:
        """Every unacknowledged event, oldest first."""
        rows = self._db.execute("SELECT seq, id, payload FROM outbox ORDER BY seq").fetchall()
        return [Pending(seq, id_, bytes(payload)) for seq, id_, payload in rows]

    def remove(self, event_id: str) -> bool:
        """Drop an acknowledged event. Not fsynced: a delete lost to a power cut only means the
        event is resent, and the server acknowledges the duplicate without storing it again."""
        db = self._db
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            return db.execute("DELETE FROM outbox WHERE id=?", (event_id,)).rowcount > 0
        finally:
            db.execute("PRAGMA synchronous=FULL")

    def depth(self) -> int:
        (n,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(n)

    @property
    def last_seq(self) -> int:
        (n,) = self._db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        return int(n)

    def close(self) -> None:
        self._db.close()
