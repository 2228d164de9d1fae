"""Bounded logging of refusals: a hostile client must not be able to fill the server's disk.

Every refused message or request is counted in the metrics, always. Its log line is written for
the first ``burst`` refusals of one key (a post or address, and a reason) within ``window_s``;
the rest are only counted, and the next line that gets through says how many were left out. A
post publishing garbage at 200 messages a second then costs a few log lines a minute, not
3 GB a day.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0


class LogThrottle:
    """``allow(key)`` -> ``(write the line?, lines left out before it)``."""

    def __init__(self, burst: int = 5, window_s: float = 60.0, max_keys: int = 10_000) -> None:
        self.burst = burst
        self.window_s = window_s
        self.max_keys = max_keys
        self._windows: OrderedDict[Hashable, _Window] = OrderedDict()

    def allow(self, key: Hashable, now: float | None = None) -> tuple[bool, int]:
        now = time.monotonic() if now is None else now
        window = self._windows.get(key)
        if window is None or now - window.started >= self.window_s:
            left_out = window.suppressed if window is not None else 0
            window = _Window(started=now)
            self._windows[key] = window
            while len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)  # the oldest key: memory stays bounded
        else:
            left_out = 0
        self._windows.move_to_end(key)
        if window.logged < self.burst:
            window.logged += 1
            left_out, window.suppressed = left_out + window.suppressed, 0
            return True, left_out
        window.suppressed += 1
        return False, 0

    def __len__(self) -> int:
        return len(self._windows)


def left_out_note(count: int) -> str:
    """`` (N similar lines left out)`` to append to a log line, or ``""``."""
    return f" ({count} similar lines left out)" if count else ""
