"""Console accounts: users (argon2 hashes, never passwords), sessions (digests of their tokens)
and the console's append-only audit log."""

from __future__ import annotations

import time
from typing import Any

from server.storage.database import Database


class AccountStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -------------------------------------------------------------- users
    def add_user(self, name: str, role: str, password_hash: str) -> bool:
        """False if the name is taken."""
        return bool(self.db.execute(
            "INSERT INTO console_users (name, role, password_hash, created_at) VALUES (?,?,?,?) "
            "ON CONFLICT (name) DO NOTHING", (name, role, password_hash, time.time())))

    def user(self, name: str) -> dict[str, Any] | None:
        """name, role, password_hash and disabled of an account, or None."""
        return self.db.one("SELECT name, role, password_hash, disabled FROM console_users "
                           "WHERE name=?", (name,))

    def users(self) -> list[dict[str, Any]]:
        return self.db.query("SELECT name, role, created_at, disabled FROM console_users "
                             "ORDER BY name")

    def count(self) -> int:
        return int(self.db.value("SELECT count(*) AS n FROM console_users") or 0)

    def enabled_admins_besides(self, name: str) -> int:
        return int(self.db.value("SELECT count(*) AS n FROM console_users WHERE role='admin' "
                                 "AND disabled=0 AND name<>?", (name,)) or 0)

    def set_role(self, name: str, role: str) -> None:
        self.db.execute("UPDATE console_users SET role=? WHERE name=?", (role, name))

    def set_disabled(self, name: str, disabled: bool) -> None:
        """Disabling ends every session of the user."""
        with self.db.transaction():
            self.db.execute("UPDATE console_users SET disabled=? WHERE name=?",
                            (int(disabled), name))
            if disabled:
                self.db.execute('DELETE FROM console_sessions WHERE "user"=?', (name,))

    def set_password_hash(self, name: str, password_hash: str) -> None:
        """A new password ends every session of the user."""
        with self.db.transaction():
            self.db.execute("UPDATE console_users SET password_hash=? WHERE name=?",
                            (password_hash, name))
            self.db.execute('DELETE FROM console_sessions WHERE "user"=?', (name,))

    # -------------------------------------------------------------- sessions
    def add_session(self, token_hash: str, user: str, csrf: str, now: float,
                    expires_at: float) -> None:
        with self.db.transaction():
            self.db.execute("DELETE FROM console_sessions WHERE expires_at < ?", (now,))
            self.db.execute(
                'INSERT INTO console_sessions (token_hash, "user", csrf, created_at, expires_at) '
                "VALUES (?,?,?,?,?)", (token_hash, user, csrf, now, expires_at))

    def session(self, token_hash: str) -> dict[str, Any] | None:
        """name, role, csrf and expires_at of an enabled user's session, or None."""
        return self.db.one(
            "SELECT u.name, u.role, s.csrf, s.expires_at FROM console_sessions s "
            'JOIN console_users u ON u.name = s."user" WHERE s.token_hash=? AND u.disabled=0',
            (token_hash,))

    def end_session(self, token_hash: str) -> None:
        self.db.execute("DELETE FROM console_sessions WHERE token_hash=?", (token_hash,))

    # -------------------------------------------------------------- audit
    def audit(self, actor: str, action: str, target: str = "", detail: str = "",
              remote: str = "") -> None:
        self.db.execute(
            "INSERT INTO console_audit (at, actor, action, target, detail, remote) "
            "VALUES (?,?,?,?,?,?)",
            (time.time(), actor, action, target[:200], detail[:500], remote[:100]))

    def audit_log(self, limit: int) -> list[dict[str, Any]]:
        return self.db.query("SELECT at, actor, action, target, detail, remote FROM console_audit "
                             "ORDER BY id DESC LIMIT ?", (limit,))
