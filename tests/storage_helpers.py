"""Storage for tests, on the backend the run is for (see ``storage_backend`` in conftest)."""

from __future__ import annotations

import os
from pathlib import Path

from server.config import DatabaseSection
from server.storage import Storage, open_storage

BACKENDS = ("sqlite", "postgresql")


def backends_under_test() -> list[str]:
    """The backends a test run covers: both, unless ``ALARMPOST_TEST_STORAGE`` names one."""
    wanted = [b.strip() for b in os.environ.get("ALARMPOST_TEST_STORAGE", "").split(",") if b.strip()]
    unknown = set(wanted) - set(BACKENDS)
    if unknown:
        raise ValueError(f"ALARMPOST_TEST_STORAGE: unknown backend(s) {sorted(unknown)}; "
                         f"use {', '.join(BACKENDS)}")
    return wanted or list(BACKENDS)


def sqlite_storage(path: Path | str) -> Storage:
    """A SQLite storage in ``path`` with the server's defaults, schema migrated."""
    return open_storage(DatabaseSection(backend="sqlite", path=str(path)))


def postgres_storage(dsn: str) -> Storage:
    return open_storage(DatabaseSection(backend="postgresql", dsn=dsn))


def server_storage(config_path: Path | str) -> Storage:
    """The storage a deployment's server uses (its ``[database]`` section), schema migrated."""
    from server.config import load_server_config

    return open_storage(load_server_config(config_path).database)
