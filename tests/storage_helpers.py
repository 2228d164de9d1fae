"""Storage for tests, on the backend the run is for (see ``storage_backend`` in conftest)."""

from __future__ import annotations

import os
from pathlib import Path

from server.config import DatabaseSection
from server.storage import Storage, open_storage


def storage_backend() -> str:
    """``sqlite`` unless the run is for PostgreSQL (``ALARMPOST_TEST_STORAGE=postgresql``)."""
    return os.environ.get("ALARMPOST_TEST_STORAGE", "sqlite")


def sqlite_storage(path: Path | str) -> Storage:
    """A SQLite storage in ``path`` with the server's defaults, schema migrated."""
    return open_storage(DatabaseSection(backend="sqlite", path=str(path)))


def postgres_storage(dsn: str) -> Storage:
    return open_storage(DatabaseSection(backend="postgresql", dsn=dsn))


def server_storage(config_path: Path | str) -> Storage:
    """The storage a deployment's server uses (its ``[database]`` section), schema migrated."""
    from server.config import load_server_config

    return open_storage(load_server_config(config_path).database)
