"""Posts: the registry's copy, online state, faults, test mode, last health, outbox sequence.

What the alarm path needs on every event (is the post in test mode, its outbox epoch and highest
seq) is kept in memory and written through, so committing an event reads nothing it need not.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from server.storage.database import Database


@dataclass(frozen=True)
class PostInfo:
    id: str
    name: str = ""
    school: str = ""
    address: str = ""
    lat: float | None = None
    lon: float | None = None


class PostStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.test_posts: set[str] = {
            r["id"] for r in db.query("SELECT id FROM posts WHERE test_mode=1")}
        # (epoch, highest seq) per post, as the committed events leave them.
        self.seq: dict[str, tuple[str, int]] = {
            r["id"]: (r["epoch"], int(r["max_seq"]))
            for r in db.query("SELECT id, epoch, max_seq FROM posts")}

    # -------------------------------------------------------------- writes
    def upsert(self, posts: Iterable[PostInfo]) -> None:
        with self.db.transaction():
            for p in posts:
                self.db.execute(
                    "INSERT INTO posts (id, name, school, address, lat, lon) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET name=excluded.name, "
                    "school=excluded.school, address=excluded.address, lat=excluded.lat, "
                    "lon=excluded.lon",
                    (p.id, p.name, p.school, p.address, p.lat, p.lon),
                )

    def set_state(self, post_id: str, state: str, at: float, reason: str) -> None:
        """Record a transition; going offline opens a fault, coming back closes it."""
        with self.db.transaction():
            self.db.execute("UPDATE posts SET state=?, state_since=? WHERE id=?",
                            (state, at, post_id))
            if state == "offline":
                self.db.execute(
                    "INSERT INTO faults (post_id, kind, detail, started_at) VALUES (?, ?, ?, ?)",
                    (post_id, "offline", reason, at))
            else:
                self.db.execute(
                    "UPDATE faults SET ended_at=? WHERE post_id=? AND kind='offline' "
                    "AND ended_at IS NULL", (at, post_id))

    def open_fault(self, post_id: str, kind: str, detail: str, at: float) -> bool:
        """Open a fault of ``kind`` unless one is open already; True if it was opened."""
        with self.db.transaction():
            if self.db.one("SELECT 1 AS open FROM faults WHERE post_id=? AND kind=? "
                           "AND ended_at IS NULL", (post_id, kind)) is not None:
                return False
            self.db.execute(
                "INSERT INTO faults (post_id, kind, detail, started_at) VALUES (?, ?, ?, ?)",
                (post_id, kind, detail[:500], at))
        return True

    def close_fault(self, post_id: str, kind: str, at: float) -> bool:
        """Close the open fault of ``kind``; True if there was one."""
        return bool(self.db.execute(
            "UPDATE faults SET ended_at=? WHERE post_id=? AND kind=? AND ended_at IS NULL",
            (at, post_id, kind)))

    def set_test_mode(self, post_id: str, on: bool, actor: str, reason: str,
                      at: float | None = None) -> dict[str, Any]:
        """Put a post in test mode or take it out (who, when, why are kept on the post); return
        the post. Raises ``LookupError`` for an unknown post."""
        at = time.time() if at is None else at
        changed = self.db.execute(
            "UPDATE posts SET test_mode=?, test_mode_since=?, test_mode_by=?, "
            "test_mode_reason=? WHERE id=?", (int(on), at, actor, reason[:500], post_id))
        if not changed:
            raise LookupError(f"no post {post_id!r}")
        if on:
            self.test_posts.add(post_id)
        else:
            self.test_posts.discard(post_id)
        row = self.get(post_id)
        assert row is not None
        return row

    def in_test_mode(self, post_id: str) -> bool:
        return post_id in self.test_posts

    def save_live(self, rows: Sequence[tuple[str, float, str]]) -> None:
        """Persist (post_id, last_seen, health JSON) in one transaction."""
        self.db.executemany("UPDATE posts SET last_seen=?, health=? WHERE id=?",
                            [(seen, health, post_id) for post_id, seen, health in rows])

    def record_seq(self, seqs: dict[str, tuple[str, int]],
                   tallies: dict[str, list[int]]) -> None:
        """Write the (epoch, highest seq) of each post in ``tallies`` with its anomaly counts
        (regressions, repeats, epoch changes); inside the committing transaction, which sets
        :attr:`seq` once it has committed."""
        rows = [(*seqs[post_id], regressions, repeats, changes, post_id)
                for post_id, (regressions, repeats, changes) in tallies.items()]
        if rows:  # one multi-row write, not one statement per post of the batch
            self.db.executemany(
                "UPDATE posts SET epoch=?, max_seq=?, seq_regressions=seq_regressions+?, "
                "seq_repeats=seq_repeats+?, epoch_changes=epoch_changes+? WHERE id=?", rows)

    # -------------------------------------------------------------- reads
    def states(self) -> dict[str, tuple[str, float | None]]:
        return {r["id"]: (r["state"], r["last_seen"])
                for r in self.db.query("SELECT id, state, last_seen FROM posts")}

    def open_fault_kinds(self) -> dict[str, set[str]]:
        """The kinds of fault open per post (to carry on after a restart)."""
        kinds: dict[str, set[str]] = {}
        for row in self.db.query("SELECT post_id, kind FROM faults WHERE ended_at IS NULL"):
            kinds.setdefault(row["post_id"], set()).add(row["kind"])
        return kinds

    def all(self) -> list[dict[str, Any]]:
        return [_post_row(r) for r in self.db.query("SELECT * FROM posts ORDER BY id")]

    def get(self, post_id: str) -> dict[str, Any] | None:
        row = self.db.one("SELECT * FROM posts WHERE id=?", (post_id,))
        return _post_row(row) if row else None

    def place(self, post_id: str) -> dict[str, Any]:
        """Name, school, address and position of a post (blank for an unknown one)."""
        row = self.db.one("SELECT name, school, address, lat, lon FROM posts WHERE id=?",
                          (post_id,))
        return row or {"name": "", "school": "", "address": "", "lat": None, "lon": None}

    def faults(self, open_only: bool, limit: int) -> list[dict[str, Any]]:
        where = "WHERE ended_at IS NULL" if open_only else ""
        return self.db.query(f"SELECT * FROM faults {where} ORDER BY started_at DESC LIMIT ?",
                             (limit,))


def _post_row(row: dict[str, Any]) -> dict[str, Any]:
    health = row.get("health")
    row["health"] = json.loads(health) if health else None
    return row
