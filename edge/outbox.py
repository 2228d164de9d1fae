"""The durable outbox: every event is on disk before it is sent, and leaves only on the ACK.

Standard-library sqlite3 (no sqlite-utils on the edge: it costs ~17 MB of RSS), WAL journal,
``synchronous=FULL`` so a committed event survives a power cut, not just a crash.

Sequence numbers are reserved before they are used: ``meta.seq_reserved`` runs a block
(:data:`RESERVE_BLOCK`) ahead of ``meta.last_seq``, committed with the events. When the disk fails,
the agent goes on numbering from memory inside the block it reserved while the disk worked
(:mod:`edge.storage`), so an outbox opened again must assume every reserved number may have been
used: :class:`Outbox` starts after ``seq_reserved``. A clean :meth:`Outbox.close` gives the unused
block back, so an ordinary restart leaves no gap; a crash leaves one (gaps are harmless, reuse is
not).

Every outbox has an ``epoch``: a random id made when it is created (an outbox from before epochs
gets one when it is opened). Events carry it, so the server can tell a post whose storage was
wiped (a new epoch, numbering from 1 again) from a post repeating its sequence numbers.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import string
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from protocol.messages import Event, encode

RESERVE_BLOCK = 64  # sequence numbers reserved ahead of use; renewed when half is left

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

_EPOCH_ALPHABET = string.ascii_letters + string.digits


def new_epoch() -> str:
    """A random epoch id (20 characters, ~119 bits). It starts with a letter, so SQLite's
    INTEGER affinity on ``meta.value`` never turns it into a number."""
    return secrets.choice(string.ascii_letters) + "".join(
        secrets.choice(_EPOCH_ALPHABET) for _ in range(19))


class Pending(NamedTuple):
    seq: int
    id: str
    payload: bytes


def _rollback(db: sqlite3.Connection) -> None:
    """Undo a failed transaction without hiding why it failed: SQLite rolls back by itself after
    some errors (a full disk at COMMIT), and a second ROLLBACK would raise "cannot rollback - no
    transaction is active" in place of the real error."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


class Outbox:
    """One outbox file. ``read_only=True`` reads what a read-only or full disk still holds (the
    epoch, the numbers used and reserved, the pending events) and never writes."""

    def __init__(self, path: Path | str, *, read_only: bool = False,
                 reserve_block: int = RESERVE_BLOCK) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.reserve_block = max(reserve_block, 2)
        self.skipped = 0  # numbers skipped at open: reserved before, possibly used from memory
        self._db = self._connect_read_only() if read_only else self._connect()
        try:
            if read_only:
                self.epoch = str(self._meta("epoch", ""))
                self.last_seq = int(self._meta("last_seq", 0))
                self.reserved_seq = max(int(self._meta("seq_reserved", 0)), self.last_seq)
            else:
                self._open_writable()
        except BaseException:
            self._db.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _connect_read_only(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise sqlite3.OperationalError(f"no outbox at {self.path}")
        uri = self.path.resolve().as_uri()
        last: sqlite3.Error | None = None
        # mode=ro reads the WAL too; immutable=1 is for a read-only disk where SQLite cannot
        # make the shared-memory file (it then reads the main file only).
        for flags in ("mode=ro", "immutable=1"):
            db = sqlite3.connect(f"{uri}?{flags}", uri=True, isolation_level=None,
                                 check_same_thread=False)
            try:
                db.execute("SELECT COUNT(*) FROM outbox").fetchone()
                return db
            except sqlite3.Error as exc:
                db.close()
                last = exc
        assert last is not None
        raise last

    def _meta(self, key: str, default: int | str) -> int | str:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else row[0]  # type: ignore[no-any-return,unused-ignore]

    def _open_writable(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)", (new_epoch(),))
            last = int(self._meta("last_seq", 0))
            reserved = int(self._meta("seq_reserved", last))
            if reserved > last:
                self.skipped = reserved - last
                last = reserved
            self._set_seqs(last, last + self.reserve_block)
            self.epoch = str(self._meta("epoch", ""))
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def _set_seqs(self, last: int, reserved: int) -> None:
        self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                             [("last_seq", last), ("seq_reserved", reserved)])
        self.last_seq, self.reserved_seq = last, reserved

    def _reserved_after(self, seq: int) -> int:
        """The reservation to keep once ``seq`` is used: at least half a block ahead."""
        if self.reserved_seq - seq >= self.reserve_block // 2:
            return self.reserved_seq
        return seq + self.reserve_block

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; if anything fails it is undone, the numbers kept in memory
        too, and the failure goes on to the caller."""
        db = self._db
        before = self.last_seq, self.reserved_seq
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            self.last_seq, self.reserved_seq = before
            raise

    def add(self, make: Callable[[int], Event]) -> Event:
        """Allocate the next sequence number, build the event with it, and commit both."""
        with self._transaction() as db:
            event = make(self.last_seq + 1)
            self._set_seqs(event.seq, self._reserved_after(event.seq))
            db.execute(
                "INSERT INTO outbox (seq, id, payload, created) VALUES (?, ?, ?, ?)",
                (event.seq, event.id, encode(event), event.ts),
            )
        return event

    def store(self, events: Iterable[Event], *, used_up_to: int = 0,
              acked: Iterable[str] = ()) -> int:
        """Write what was kept in memory while the disk failed, in one transaction: ``events``
        (with the numbers they were sent with), the highest number used (``used_up_to``), and
        the removal of events ``acked`` meanwhile. Returns how many events were written."""
        written = 0
        with self._transaction() as db:
            last = max(self.last_seq, used_up_to)
            for event in events:
                written += db.execute(
                    "INSERT OR IGNORE INTO outbox (seq, id, payload, created) VALUES (?, ?, ?, ?)",
                    (event.seq, event.id, encode(event), event.ts),
                ).rowcount
                last = max(last, event.seq)
            db.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in acked])
            self._set_seqs(last, max(self._reserved_after(last), last + 1))
        return written

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

    def close(self, *, release: bool = True) -> None:
        """Close; ``release`` gives the unused reserved numbers back (only a healthy outbox whose
        every used number is recorded may do that: the agent passes ``release=False`` after a
        storage fault)."""
        try:
            if release and not self.read_only and self.reserved_seq > self.last_seq:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("UPDATE meta SET value=? WHERE key='seq_reserved'",
                                     (self.last_seq,))
        finally:
            self._db.close()
