"""The gpiozero backend: a pull-up button and three digital outputs on the edge computer's pins.

With ``backend = "mock"`` it runs on gpiozero's ``MockFactory`` so the same code runs on any
machine (the simulator, :class:`firmware_sim.fleet.SimGpio`, drives the mock pins; a caller may
also pass its own pin factory). gpiozero calls back from its own threads; everything is bridged
into asyncio with ``call_soon_threadsafe``. gpiozero's ``MockPin`` ignores ``bounce_time``, so
debouncing and the hold-time guard are done in :class:`edge.hardware.base.ButtonGuard`, for real
and mock pins alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from edge.config import HardwareSection
from edge.hardware.base import ButtonGuard, PressCallback
from protocol.settings import ConfigError


class GpioHardware:
    """gpiozero devices: a pull-up button, and three digital outputs."""

    def __init__(self, config: HardwareSection, pin_factory: Any = None) -> None:
        from gpiozero import DigitalInputDevice, DigitalOutputDevice
        from gpiozero.exc import BadPinFactory

        factory = pin_factory
        if factory is None and config.backend == "mock":
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

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()
        for device in (self._button, self._strobe, self._siren, self._help):
            device.close()
