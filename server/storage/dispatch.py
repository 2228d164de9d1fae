"""Dispatch: one job per incident being dispatched, and the pages sent to patrol teams.

The dispatcher keeps its working state in memory and writes every change through, so a restart
(or another instance taking over) resumes from here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from server.storage.database import Database

# Columns of a page row, in the order the dispatcher's page record takes them.
PAGE_COLUMNS = ("id", "incident_id", "team_id", "kind", "sent_at", "deadline", "state",
                "published_at", "answered_at", "detail")


class DispatchStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -------------------------------------------------------------- jobs
    def open_job(self, incident_id: str, post_id: str, pressed_at: float | None,
                 opened_at: float, now: float) -> bool:
        """Start a job (queued); False if the incident has one already."""
        return bool(self.db.execute(
            "INSERT INTO dispatch (incident_id, post_id, state, pressed_at, opened_at, updated_at) "
            "VALUES (?, ?, 'queued', ?, ?, ?) ON CONFLICT (incident_id) DO NOTHING",
            (incident_id, post_id, pressed_at, opened_at, now)))

    def active_jobs(self) -> list[dict[str, Any]]:
        """Jobs not done, ``exclude`` decoded, each with its ``pages``."""
        jobs = self.db.query("SELECT * FROM dispatch WHERE state <> 'done'")
        for job in jobs:
            job["exclude"] = set(json.loads(job["exclude"] or "[]"))
            job["pages"] = self.pages(job["incident_id"])
        return jobs

    def queue(self, incident_id: str, reason: str, now: float) -> None:
        self.db.execute("UPDATE dispatch SET state='queued', reason=?, updated_at=? "
                        "WHERE incident_id=?", (reason, now, incident_id))

    def paging(self, incident_id: str, attempts: int, rounds: int, now: float) -> None:
        self.db.execute(
            "UPDATE dispatch SET state='paging', reason='', attempts=?, rounds=?, "
            "first_page_at=coalesce(first_page_at, ?), updated_at=? WHERE incident_id=?",
            (attempts, rounds, now, now, incident_id))

    def assign(self, incident_id: str, team_id: str, now: float) -> None:
        self.db.execute("UPDATE dispatch SET state='assigned', team_id=?, accepted_at=?, "
                        "updated_at=? WHERE incident_id=?", (team_id, now, now, incident_id))

    def mark_time(self, incident_id: str, column: str, now: float) -> None:
        """The first time the assigned team was en route or on scene."""
        if column not in ("en_route_at", "on_scene_at"):
            raise ValueError(column)
        self.db.execute(f"UPDATE dispatch SET {column}=coalesce({column}, ?), updated_at=? "
                        "WHERE incident_id=?", (now, now, incident_id))

    def unassign(self, incident_id: str, now: float) -> None:
        self.db.execute("UPDATE dispatch SET team_id=NULL, state='queued', updated_at=? "
                        "WHERE incident_id=?", (now, incident_id))

    def restart(self, incident_id: str, exclude: Iterable[str], now: float) -> None:
        """Re-dispatch from the start: attempts reset, ``exclude`` kept off, earlier pages no
        longer count as tried or declined (their kind gets ``-old``)."""
        with self.db.transaction():
            self.db.execute("UPDATE dispatch SET attempts=0, exclude=?, updated_at=? "
                            "WHERE incident_id=?", (json.dumps(sorted(exclude)), now, incident_id))
            self.db.execute("UPDATE pages SET kind = kind || '-old' WHERE incident_id=? "
                            "AND kind NOT LIKE '%-old'", (incident_id,))

    def finish(self, incident_id: str, now: float) -> None:
        self.db.execute("UPDATE dispatch SET state='done', closed_at=?, updated_at=? "
                        "WHERE incident_id=?", (now, now, incident_id))

    def job(self, incident_id: str) -> dict[str, Any] | None:
        return self.db.one("SELECT * FROM dispatch WHERE incident_id=?", (incident_id,))

    # -------------------------------------------------------------- pages
    def add_pages(self, rows: Sequence[tuple[str, str, str, str, float, float]]) -> None:
        """(id, incident_id, team_id, kind, sent_at, deadline), all waiting."""
        self.db.executemany(
            "INSERT INTO pages (id, incident_id, team_id, kind, sent_at, deadline, state) "
            "VALUES (?, ?, ?, ?, ?, ?, 'waiting')", rows)

    def set_page(self, page_id: str, state: str, answered_at: float | None = None,
                 detail: str | None = None) -> None:
        """A page's new state; ``answered_at`` and ``detail`` only when given."""
        sets: list[str] = ["state=?"]
        values: list[object] = [state]
        if answered_at is not None:
            sets.append("answered_at=?")
            values.append(answered_at)
        if detail is not None:
            sets.append("detail=?")
            values.append(detail)
        self.db.execute(f"UPDATE pages SET {', '.join(sets)} WHERE id=?", (*values, page_id))

    def published(self, page_id: str, at: float) -> None:
        self.db.execute("UPDATE pages SET published_at=? WHERE id=?", (at, page_id))

    def page(self, page_id: str) -> dict[str, Any] | None:
        return self.db.one("SELECT * FROM pages WHERE id=?", (page_id,))

    def pages(self, incident_id: str) -> list[dict[str, Any]]:
        return self.db.query("SELECT * FROM pages WHERE incident_id=? ORDER BY sent_at, id",
                             (incident_id,))
