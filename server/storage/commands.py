"""Commands sent to posts from the console (silence, reset, ...) and how each ended."""

from __future__ import annotations

import time
from typing import Any

from server.storage.database import Database


class CommandStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, command_id: str, post_id: str, cmd: str, actor: str,
            incident_id: str | None, sent_at: float) -> None:
        self.db.execute(
            "INSERT INTO commands (id, post_id, cmd, actor, incident_id, sent_at, state) "
            "VALUES (?,?,?,?,?,?, 'sent')", (command_id, post_id, cmd, actor, incident_id, sent_at))

    def finish(self, command_id: str, state: str, detail: str) -> None:
        self.db.execute("UPDATE commands SET state=?, answered_at=?, detail=? WHERE id=?",
                        (state, time.time(), detail[:200], command_id))

    def get(self, command_id: str) -> dict[str, Any] | None:
        return self.db.one("SELECT * FROM commands WHERE id=?", (command_id,))

    def recent(self, post_id: str | None, limit: int) -> list[dict[str, Any]]:
        if post_id:
            return self.db.query("SELECT * FROM commands WHERE post_id=? "
                                 "ORDER BY sent_at DESC LIMIT ?", (post_id, limit))
        return self.db.query("SELECT * FROM commands ORDER BY sent_at DESC LIMIT ?", (limit,))
