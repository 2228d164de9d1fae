"""Reconnect backoff that starts over after a connection that lived.

A connection refused or dropped at once doubles the wait (up to a cap), so a client does not
hammer a broker that is down or refusing it. A connection that stayed up for ``lived_s`` proves
the broker was fine: when it drops, the next outage starts again from the initial delay, instead
of every later outage making the client wait the whole cap before its first retry.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class Backoff:
    def __init__(self, initial_s: float = 0.2, cap_s: float = 10.0, lived_s: float = 3.0,
                 jitter: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        self.initial_s = initial_s
        self.cap_s = max(cap_s, initial_s)
        self.lived_s = lived_s
        self.jitter = jitter  # each wait is the delay times 1 ± jitter (clients must not retry in step)
        self._clock = clock
        self._delay = initial_s
        self._connected_at: float | None = None

    def next_delay(self) -> float:
        """How long to wait before the next attempt; the one after waits twice as long."""
        delay = self._delay
        self._delay = min(self._delay * 2, self.cap_s)
        if self.jitter:
            delay *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return delay

    def reset(self) -> None:
        self._delay = self.initial_s

    def connected(self) -> None:
        self._connected_at = self._clock()

    @property
    def lived(self) -> bool:
        """Whether the current (or last) connection has been up for ``lived_s``."""
        return self._connected_at is not None and self._clock() - self._connected_at >= self.lived_s

    def disconnected(self, *, reset_if_lived: bool = True) -> None:
        """The connection ended. ``reset_if_lived=False`` keeps backing off even after a long
        connection (when being connected is itself the trouble, such as a cloned credential)."""
        if reset_if_lived and self.lived:
            self.reset()
        self._connected_at = None
