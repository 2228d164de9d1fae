"""Patrol teams: the registry, each team's live status and position, and the patrol app's
logins (a password per team, sessions stored as digests of their tokens).

Adding or removing a team bumps the ``teams`` registry version, so a running server (any
instance) notices a change made by another process, the command line included.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from server.storage.database import Database


class TeamExists(ValueError):
    pass


class TeamStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -------------------------------------------------------------- registry
    def add(self, team_id: str, name: str, contacts: Sequence[str], zone: dict[str, Any],
            shift: str, created_at: float) -> None:
        """Raises :class:`TeamExists`."""
        with self.db.transaction():
            if self.db.one("SELECT 1 AS hit FROM teams WHERE id=?", (team_id,)) is not None:
                raise TeamExists(f"team {team_id!r} already exists")
            self.db.execute(
                "INSERT INTO teams (id, name, contacts, zone, shift, created_at) "
                "VALUES (?,?,?,?,?,?)",
                (team_id, name, json.dumps(list(contacts)), json.dumps(zone), shift, created_at))
            self._bump()

    def remove(self, team_id: str) -> bool:
        with self.db.transaction():
            gone = self.db.execute("DELETE FROM teams WHERE id=?", (team_id,))
            self.db.execute("DELETE FROM team_live WHERE team_id=?", (team_id,))
            self.db.execute("DELETE FROM team_app_passwords WHERE team_id=?", (team_id,))
            self.db.execute("DELETE FROM team_sessions WHERE team_id=?", (team_id,))
            if gone:
                self._bump()
        return bool(gone)

    def _bump(self) -> None:
        self.db.execute("UPDATE registry_versions SET version = version + 1 WHERE name='teams'")

    def version(self) -> int:
        """Changes whenever a team is added or removed, by any process."""
        return int(self.db.value("SELECT version FROM registry_versions WHERE name='teams'") or 0)

    def all(self) -> list[dict[str, Any]]:
        """Every team, ``contacts`` and ``zone`` decoded."""
        rows = self.db.query("SELECT * FROM teams ORDER BY id")
        for row in rows:
            row["contacts"] = json.loads(row["contacts"] or "[]")
            row["zone"] = json.loads(row["zone"] or "{}")
        return rows

    def exists(self, team_id: str) -> bool:
        return self.db.one("SELECT 1 AS hit FROM teams WHERE id=?", (team_id,)) is not None

    # -------------------------------------------------------------- live status and position
    def live(self) -> dict[str, dict[str, Any]]:
        return {r["team_id"]: r for r in self.db.query("SELECT * FROM team_live")}

    def set_status(self, team_id: str, status: str, at: float) -> None:
        self.db.execute(
            "INSERT INTO team_live (team_id, status, status_at) VALUES (?, ?, ?) ON CONFLICT"
            "(team_id) DO UPDATE SET status=excluded.status, status_at=excluded.status_at",
            (team_id, status, at))

    def save_positions(self, rows: Sequence[tuple[str, float | None, float | None,
                                                  float | None]]) -> None:
        """(team_id, lat, lon, position_at) in one transaction."""
        self.db.executemany(
            "INSERT INTO team_live (team_id, lat, lon, position_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(team_id) DO UPDATE SET lat=excluded.lat, lon=excluded.lon, "
            "position_at=excluded.position_at", rows)

    # -------------------------------------------------------------- the patrol app's logins
    def set_app_password(self, team_id: str, password_hash: str) -> None:
        """Set or change a team's app password; its phones must log in again.
        Raises ``LookupError`` for an unknown team."""
        now = time.time()
        with self.db.transaction():
            if not self.exists(team_id):
                raise LookupError(team_id)
            self.db.execute(
                "INSERT INTO team_app_passwords (team_id, password_hash, updated_at) "
                "VALUES (?,?,?) ON CONFLICT(team_id) DO UPDATE SET "
                "password_hash=excluded.password_hash, updated_at=excluded.updated_at",
                (team_id, password_hash, now))
            self.db.execute("DELETE FROM team_sessions WHERE team_id=?", (team_id,))

    def app_password_count(self) -> int:
        return int(self.db.value("SELECT count(*) AS n FROM team_app_passwords") or 0)

    def app_password_hash(self, team_id: str) -> str | None:
        value = self.db.value(
            "SELECT p.password_hash FROM team_app_passwords p JOIN teams t ON t.id = p.team_id "
            "WHERE p.team_id=?", (team_id,))
        return str(value) if value is not None else None

    def add_session(self, token_hash: str, team_id: str, csrf: str, now: float,
                    expires_at: float) -> None:
        with self.db.transaction():
            self.db.execute("DELETE FROM team_sessions WHERE expires_at < ?", (now,))
            self.db.execute(
                "INSERT INTO team_sessions (token_hash, team_id, csrf, created_at, expires_at) "
                "VALUES (?,?,?,?,?)", (token_hash, team_id, csrf, now, expires_at))

    def session(self, token_hash: str) -> dict[str, Any] | None:
        """A session newer than its team's password (team_id, csrf, expires_at), or None."""
        return self.db.one(
            "SELECT s.team_id, s.csrf, s.expires_at FROM team_sessions s "
            "JOIN team_app_passwords p ON p.team_id = s.team_id "
            "JOIN teams t ON t.id = s.team_id "
            "WHERE s.token_hash=? AND s.created_at >= p.updated_at", (token_hash,))

    def end_session(self, token_hash: str) -> None:
        self.db.execute("DELETE FROM team_sessions WHERE token_hash=?", (token_hash,))
