"""The post's hardware behind one small interface: a button in; strobe, siren and a
"help is coming" lamp out.

:class:`GpioHardware` drives gpiozero devices. With ``backend = "mock"`` it uses gpiozero's
``MockFactory`` so the same code runs on any machine (the simulator drives the mock pins).
gpiozero calls back from its own threads; everything is bridged into asyncio with
``call_soon_threadsafe``. gpiozero's ``MockPin`` ignores ``bounce_time``, so debouncing and the
hold-time guard are done here, in :class:`ButtonGuard`, for real and mock pins alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from edge.config import HardwareSection
from protocol.settings import ConfigError

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


class GpioHardware:
    """gpiozero devices: a pull-up button, and three digital outputs."""

    def __init__(self, config: HardwareSection) -> None:
        from gpiozero import DigitalInputDevice, DigitalOutputDevice
        from gpiozero.exc import BadPinFactory

        factory = None
        if config.backend == "mock":
            from gpiozero.pins.mock import MockFactory

            factory = MockFactory()
        self.config = config
        self.pin_factory = factory
        try:
            # Not gpiozero's Button: its hold-detection thread wakes 10 times a second and we
            # never use it (ButtonGuard does hold and debounce); 500 idle posts cost ~10 % CPU.
            self._button = DigitalInputDevice(config.button_pin, pull_up=True,
                                              pin_factory=factory)
        except BadPinFactory:
            raise ConfigError(
                "no GPIO library found for [hardware] backend = \"gpio\": on a Raspberry Pi "
                "install one (sudo apt-get install python3-lgpio, or pip install lgpio); "
                "elsewhere use backend = \"mock\""
            ) from None
        self._strobe = DigitalOutputDevice(config.strobe_pin, pin_factory=factory)
        self._siren = DigitalOutputDevice(config.siren_pin, pin_factory=factory)
        self._help = DigitalOutputDevice(config.help_pin, pin_factory=factory)
        self.guard: ButtonGuard | None = None

    def start(self, loop: asyncio.AbstractEventLoop, on_press: PressCallback) -> None:
        self.guard = guard = ButtonGuard(
            loop, self.config.hold_ms / 1000, self.config.debounce_ms / 1000, on_press
        )

        def bridge(pressed: bool) -> Callable[[], None]:
            def callback() -> None:
                try:
                    running = asyncio.get_running_loop()
                except RuntimeError:
                    running = None
                if running is loop:
                    guard.edge(pressed)
                else:
                    loop.call_soon_threadsafe(guard.edge, pressed)

            return callback

        self._button.when_activated = bridge(True)
        self._button.when_deactivated = bridge(False)

    def set_strobe(self, on: bool) -> None:
        self._strobe.value = on

    def set_siren(self, on: bool) -> None:
        self._siren.value = on

    def set_help(self, on: bool) -> None:
        self._help.value = on

    @property
    def button(self) -> bool:
        return bool(self._button.is_active)

    @property
    def strobe(self) -> bool:
        return bool(self._strobe.value)

    @property
    def siren(self) -> bool:
        return bool(self._siren.value)

    @property
    def help(self) -> bool:
        return bool(self._help.value)

    # Simulation: drive the mock button pin like a hand would.
    def mock_button(self, pressed: bool) -> None:
        if self.pin_factory is None:
            raise RuntimeError("only a mock backend can be pressed in software")
        pin = self._button.pin
        if pressed:
            pin.drive_low()
        else:
            pin.drive_high()

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()
        for device in (self._button, self._strobe, self._siren, self._help):
            device.close()
