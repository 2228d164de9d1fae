"""Console accounts for the command line (``alarmpost server user add|list``) and the demo."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from server.config import load_server_config
from server.storage import open_storage
from server.web.auth import Accounts


def list_users(config_path: Path | str) -> list[dict[str, Any]]:
    storage = open_storage(load_server_config(config_path).database)
    try:
        return Accounts(storage.accounts).users()
    finally:
        storage.close()


def add_user(config_path: Path | str, name: str, role: str, password: str,
             actor: str = "cli") -> None:
    """Raises :class:`server.web.auth.UserError` with what to change."""
    storage = open_storage(load_server_config(config_path).database)
    try:
        Accounts(storage.accounts).add_user(name, role, password, actor=actor)
    finally:
        storage.close()


def create_demo_user(config_path: Path | str, name: str = "demo") -> tuple[str, str]:
    """An operator account with a fresh random password for ``alarmpost demo``."""
    password = secrets.token_urlsafe(9)
    add_user(config_path, name, "operator", password, actor="demo")
    return name, password
