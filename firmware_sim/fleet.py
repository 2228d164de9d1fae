"""A fleet of simulated posts: each a real :class:`edge.agent.EdgeAgent` on mock GPIO pins.

:class:`SimGpio` is the simulated hand and wiring: it builds the post's
:class:`edge.hardware.gpio.GpioHardware` on gpiozero's ``MockFactory`` and drives its button pin.

A simulated hand presses buttons the way people do: a clean press, a press with contact bounce,
a long hold, or a brush too short to count.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable
from pathlib import Path

from edge.agent import EdgeAgent
from edge.config import EdgeConfig, HardwareSection, load_edge_config
from edge.hardware.gpio import GpioHardware

log = logging.getLogger("alarmpost.sim")


class SimGpio:
    """The post's pins on gpiozero's MockFactory, and a finger on its button pin."""

    def __init__(self, config: HardwareSection) -> None:
        from gpiozero.pins.mock import MockFactory

        config.backend = "mock"
        self.factory = MockFactory()
        self.hardware = GpioHardware(config, pin_factory=self.factory)
        self._button_pin = self.factory.pin(config.button_pin)

    def button(self, pressed: bool) -> None:
        """Drive the button pin like a hand would (the button pulls the pin low)."""
        if pressed:
            self._button_pin.drive_low()
        else:
            self._button_pin.drive_high()


class SimPost:
    """One post: mock-pin hardware and the real agent driving it."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.gpio = SimGpio(config.hardware)
        self.hardware = self.gpio.hardware
        self.agent = EdgeAgent(config, self.hardware)
        self.post_id = config.post.id
        self.task: asyncio.Task[None] | None = None

    @classmethod
    def from_file(cls, path: Path | str) -> SimPost:
        return cls(load_edge_config(path))

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self.agent.run(), name=f"post-{self.post_id}")
        return self.task

    async def press(self, hold_s: float | None = None, bounce: int = 0) -> None:
        """Press and release; ``bounce`` extra contact chatters on both edges (1 ms apart).

        Returns once the button has been up long enough for the next press to count (no hand
        presses again within the debounce time).
        """
        hold = hold_s if hold_s is not None else self.config.hardware.hold_ms / 1000 + 0.05
        for _ in range(bounce):
            self.gpio.button(True)
            await asyncio.sleep(0.001)
            self.gpio.button(False)
            await asyncio.sleep(0.001)
        self.gpio.button(True)
        await asyncio.sleep(hold)
        for _ in range(bounce):
            self.gpio.button(False)
            await asyncio.sleep(0.001)
            self.gpio.button(True)
            await asyncio.sleep(0.001)
        self.gpio.button(False)
        await asyncio.sleep(self.config.hardware.debounce_ms / 1000 + 0.01)

    async def brush(self) -> None:
        """A touch shorter than the hold-time guard: must not count."""
        await self.press(hold_s=self.config.hardware.hold_ms / 1000 / 3)

    async def stop(self) -> None:
        self.agent.stop()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


class Fleet:
    def __init__(self, posts: Iterable[SimPost]) -> None:
        self.posts = {p.post_id: p for p in posts}
        self.pressing: set[asyncio.Task[None]] = set()  # presses under way

    @classmethod
    def from_dir(cls, directory: Path, limit: int | None = None) -> Fleet:
        files = sorted(directory.glob("*.toml"))[:limit]
        return cls(SimPost.from_file(f) for f in files)

    def start(self) -> None:
        for post in self.posts.values():
            post.start()

    async def wait_connected(self, within_s: float = 30.0) -> None:
        await asyncio.wait_for(
            asyncio.gather(*(p.agent.connected.wait() for p in self.posts.values())), within_s
        )

    async def random_presses(self, mean_interval_s: float, rng: random.Random) -> None:
        """Press a random post now and then (exponential gaps), forever."""
        posts = list(self.posts.values())
        while True:
            await asyncio.sleep(rng.expovariate(1 / mean_interval_s))
            post = rng.choice(posts)
            style = rng.random()
            if style < 0.6:
                coro = post.press()
            elif style < 0.8:
                coro = post.press(bounce=rng.randint(1, 5))
            elif style < 0.9:
                coro = post.press(hold_s=rng.uniform(1.0, 3.0))
            else:
                coro = post.brush()
            task = asyncio.create_task(coro)
            self.pressing.add(task)
            task.add_done_callback(self.pressing.discard)

    async def stop_pressing(self, finish_within: float = 0.0) -> None:
        """Let presses under way finish (up to ``finish_within`` seconds), cancel the rest.
        Cancel :meth:`random_presses` itself first so no new ones start."""
        tasks = list(self.pressing)
        if tasks and finish_within > 0:
            await asyncio.wait(tasks, timeout=finish_within)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.posts.values()))
