"""The post's hardware: one interface (:mod:`edge.hardware.base`), a backend per kind of post.

:func:`make_hardware` picks the backend that ``[hardware] backend`` names; each backend is
imported only when chosen (a GPIO post never loads pyserial).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.hardware.base import ButtonGuard, FaultListener, Hardware, PressCallback, Supervised

if TYPE_CHECKING:
    from edge.config import EdgeConfig
    from edge.hardware.gpio import GpioHardware

__all__ = ["ButtonGuard", "FaultListener", "GpioHardware", "Hardware", "PressCallback", "Supervised",
           "make_hardware"]

BACKENDS = ("gpio", "mock", "ioboard")


def make_hardware(config: EdgeConfig) -> Hardware:
    """The backend ``config.hardware.backend`` names: "gpio", "mock" (gpiozero's MockFactory)
    or "ioboard" (a serial IO board, configured in ``[ioboard]``)."""
    backend = config.hardware.backend
    if backend in ("gpio", "mock"):
        from edge.hardware.gpio import GpioHardware

        return GpioHardware(config.hardware)
    if backend == "ioboard":
        from edge.hardware.ioboard import IoBoardHardware

        return IoBoardHardware(config.ioboard, config.hardware, silent=config.post.silent)
    raise ValueError(f"unknown hardware backend {backend!r} (one of {', '.join(BACKENDS)})")


def __getattr__(name: str) -> object:
    if name == "GpioHardware":  # imported on use: gpiozero is not loaded for an IO-board post
        from edge.hardware.gpio import GpioHardware

        return GpioHardware
    raise AttributeError(name)
