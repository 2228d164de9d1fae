"""The post's hardware behind one small interface: a button in; strobe, siren and a
"help is coming" lamp out. One backend per kind of post (see :func:`edge.hardware.make_hardware`):

- :mod:`edge.hardware.gpio`: gpiozero pins on the edge computer itself (``backend = "gpio"``, or
  ``"mock"`` for gpiozero's ``MockFactory``);
- :mod:`edge.hardware.ioboard`: a microcontroller board on a serial line (``backend = "ioboard"``),
  which also reports tamper, mains and battery (:class:`Supervised`).

:class:`ButtonGuard` turns raw button edges into accepted presses for backends that see edges.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

PressCallback = Callable[[int], None]  # called with how long the button was held (ms)


class Hardware(Protocol):
    """What the agent needs from a post's hardware."""

    def start(self, loop: asyncio.AbstractEventLoop, on_press: PressCallback) -> None: ...
    def set_strobe(self, on: bool) -> None: ...
    def set_siren(self, on: bool) -> None: ...
    def set_help(self, on: bool) -> None: ...
    @property
    def button(self) -> bool: ...
    @property
    def strobe(self) -> bool: ...
    @property
    def siren(self) -> bool: ...
    @property
    def help(self) -> bool: ...
    def close(self) -> None: ...


class ButtonGuard:
    """Turns raw button edges into accepted presses.

    A press counts once the button has stayed down for ``hold_s`` (a brush does not); after a
    press the button must stay up for ``debounce_s`` before another can count, so contact bounce
    on release and a long hold both give exactly one press. Runs on the event loop.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        hold_s: float,
        debounce_s: float,
        on_accept: PressCallback,
    ) -> None:
        self._loop = loop
        self._hold_s = hold_s
        self._debounce_s = debounce_s
        self._on_accept = on_accept
        self.down = False
        self._down_at = 0.0
        self._armed = True
        self._hold_timer: asyncio.TimerHandle | None = None
        self._rearm_timer: asyncio.TimerHandle | None = None
        self.edges = 0

    def edge(self, pressed: bool) -> None:
        self.edges += 1
        if pressed == self.down:
            return
        self.down = pressed
        if pressed:
            self._down_at = time.monotonic()
            if self._rearm_timer is not None:  # bounce before the button settled up
                self._rearm_timer.cancel()
                self._rearm_timer = None
            if self._armed:
                self._hold_timer = self._loop.call_later(self._hold_s, self._accept)
        else:
            if self._hold_timer is not None:
                self._hold_timer.cancel()
                self._hold_timer = None
            if not self._armed:
                self._rearm_timer = self._loop.call_later(self._debounce_s, self._rearm)

    def _accept(self) -> None:
        self._hold_timer = None
        self._armed = False
        self._on_accept(int((time.monotonic() - self._down_at) * 1000))

    def _rearm(self) -> None:
        self._rearm_timer = None
        self._armed = True

    def close(self) -> None:
        for timer in (self._hold_timer, self._rearm_timer):
            if timer is not None:
                timer.cancel()


FaultListener = Callable[[], None]


@runtime_checkable
class Supervised(Protocol):
    """Hardware that knows faults of its own (a lost link, an opened door, mains lost...)."""

    @property
    def faults(self) -> tuple[str, ...]: ...

    fault_listeners: list[FaultListener]  # called (on the loop) when ``faults`` changes
