"""What a migration is: (version, name, step), a step being SQL text or a function of the
database."""

from __future__ import annotations

from collections.abc import Callable

from server.storage.database import Database

Step = str | Callable[[Database], None]
Migration = tuple[int, str, Step]
