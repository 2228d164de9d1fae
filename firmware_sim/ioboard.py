"""A simulated IO board on a real pseudo-terminal: the board's side of ``docs/serial.md``.

:class:`SimBoard` opens a pty pair and points a symlink (the post's ``[ioboard] device``) at the
slave, so the edge opens a real serial device path with pyserial. The board keeps the master: it
reads the edge's frames from it and writes its own. It behaves like the firmware would: relays
(strobe, siren, lamp), a button with its own hold guard (one ``button_pressed`` per press, strobe
and siren switched on at once unless the edge turned fail-safe off), tamper switch, mains,
battery, a boot announcement, a status every second; every frame acknowledged, resent until
acknowledged, duplicates recognised.

Faults it injects (:class:`LineFaults`): frames dropped, duplicated or corrupted (one bit
flipped) at given rates, in both directions (on what the board writes, frame by frame, and on
what it reads, read by read); garbage bytes; a reboot (relays off, sequence numbers afresh, a
boot frame); the port vanishing (the pty closed and the symlink removed: the edge reads EIO)
and coming back (a new pty behind the same symlink).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
import tty
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edge.hardware import ioboard_protocol as p

log = logging.getLogger("alarmpost.sim.ioboard")


@dataclass
class LineFaults:
    """Rates (0..1) of what the line does to each frame the board writes and each read it makes."""

    drop: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0  # one bit flipped

    def apply(self, data: bytes, rng: random.Random, counters: Counter[str], way: str) -> bytes:
        if not data:
            return data
        if self.drop and rng.random() < self.drop:
            counters[f"{way}_dropped"] += 1
            return b""
        if self.corrupt and rng.random() < self.corrupt:
            counters[f"{way}_corrupted"] += 1
            flipped = bytearray(data)
            bit = rng.randrange(len(flipped) * 8)
            flipped[bit // 8] ^= 1 << (bit % 8)
            data = bytes(flipped)
        if self.duplicate and rng.random() < self.duplicate:
            counters[f"{way}_duplicated"] += 1
            data = data + data
        return data


class SimBoard:
    """The IO board's firmware, on the master side of a pty whose slave ``link`` points to."""

    def __init__(self, link: Path | str, *, firmware: str = "sim-1.0", hold_ms: int = 80,
                 ack_timeout_s: float = 0.05, resend_max_s: float = 1.0,
                 status_every_s: float = 1.0, faults: LineFaults | None = None,
                 seed: int = 0) -> None:
        self.link = Path(link)
        self.firmware = firmware
        self.hold_ms = hold_ms
        self.ack_timeout_s = ack_timeout_s
        self.resend_max_s = resend_max_s
        self.status_every_s = status_every_s
        self.faults = faults or LineFaults()
        self.rng = random.Random(seed)
        self.counters: Counter[str] = Counter()
        # The board's state
        self.relays = 0
        self.failsafe = True
        self.button = False
        self.tamper_open = False
        self.mains_ok = True
        self.battery_mv = 12600
        self.presses = 0  # press numbers given so far (since boot)
        self.relay_changes: list[tuple[float, int]] = []  # (monotonic time, relays), last 4096
        self.relays_changed = asyncio.Event()
        self.station = self._new_station()
        self._master: int | None = None
        self._slave: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_status = 0.0

    def _new_station(self) -> p.Station:
        station = p.Station(self.ack_timeout_s, self.resend_max_s, max_queue=4096)
        station.send(p.BOOT, self.firmware.encode("ascii"))  # SEQ 0: a boot may arrive twice
        return station

    # ------------------------------------------------------------------ life
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._open_pty()
        self._task = asyncio.create_task(self._pump(), name=f"simboard-{self.link.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._close_pty()

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # until the edge opens it: no echo, no line editing of the frames
        os.set_blocking(master, False)
        name = os.ttyname(slave)
        tmp = self.link.with_name(self.link.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(name)
        os.replace(tmp, self.link)
        self._master, self._slave = master, slave
        assert self._loop is not None
        self._loop.add_reader(master, self._readable)
        self.station.decoder.reset()
        self.station.retry_now()
        self._wake.set()
        log.info("IO board on %s -> %s", self.link, name)

    def _close_pty(self) -> None:
        if self._master is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._master)
            os.close(self._master)
        if self._slave is not None:
            os.close(self._slave)
        self._master = self._slave = None

    # ------------------------------------------------------------------ fault injection
    def vanish(self) -> None:
        """The port disappears (an adapter unplugged): pty closed, symlink gone. The board
        itself runs on and keeps resending what the edge has not acknowledged."""
        self._close_pty()
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        self.counters["vanished"] += 1

    def come_back(self) -> None:
        """The port is back: a new pty behind the same path."""
        self._open_pty()

    def reboot(self) -> None:
        """A power glitch: relays off, fail-safe back to its default, numbering afresh, a boot
        frame; what was waiting to be sent is lost, as in a real board's RAM."""
        self._switch(0)
        self.failsafe = True
        self.button = False
        self.presses = 0
        self.station = self._new_station()
        self.counters["reboots"] += 1
        self._wake.set()

    def garbage(self, n: int) -> None:
        """Write ``n`` random bytes onto the line (as noise would)."""
        self._raw_write(bytes(self.rng.randrange(256) for _ in range(n)))

    # ------------------------------------------------------------------ the board's inputs
    def press_now(self, held_ms: int | None = None) -> int:
        """A press the board's hold guard has just accepted and that was released: strobe and
        siren on at once (fail-safe), ``button_pressed`` and ``button_released`` queued. Returns
        the press number."""
        held = self.hold_ms + 20 if held_ms is None else held_ms
        number = self._pressed(held)
        self._send(p.BUTTON_RELEASED, p.press_payload(number, held))
        return number

    async def press(self, hold_s: float | None = None) -> int | None:
        """Press and hold for ``hold_s`` (default: the hold guard plus 50 ms), then release.
        Returns the press number, or None for a touch shorter than the board's hold guard."""
        hold = self.hold_ms / 1000 + 0.05 if hold_s is None else hold_s
        self.button = True
        guard = self.hold_ms / 1000
        number = None
        if hold >= guard:
            await asyncio.sleep(guard)
            number = self._pressed(self.hold_ms)
            await asyncio.sleep(hold - guard)
        else:
            await asyncio.sleep(hold)
        self.button = False
        if number is not None:
            self._send(p.BUTTON_RELEASED, p.press_payload(number, int(hold * 1000)))
        return number

    def _pressed(self, held_ms: int) -> int:
        self.presses = self.presses % 0xFFFF + 1
        if self.failsafe:
            self._switch(self.relays | p.STROBE | p.SIREN)
        self._send(p.BUTTON_PRESSED, p.press_payload(self.presses, held_ms))
        return self.presses

    def set_tamper(self, opened: bool) -> None:
        self.tamper_open = opened
        self._send(p.TAMPER_OPENED if opened else p.TAMPER_CLOSED)

    def set_mains(self, ok: bool) -> None:
        self.mains_ok = ok
        self._send(p.MAINS_RESTORED if ok else p.MAINS_LOST)

    def set_battery(self, mv: int) -> None:
        self.battery_mv = mv
        self._send(p.BATTERY, p.u16(mv), replace=True)

    # ------------------------------------------------------------------ outputs
    @property
    def strobe(self) -> bool:
        return bool(self.relays & p.STROBE)

    @property
    def siren(self) -> bool:
        return bool(self.relays & p.SIREN)

    @property
    def lamp(self) -> bool:
        return bool(self.relays & p.LAMP)

    def _switch(self, relays: int) -> None:
        relays &= p.RELAY_MASK
        if relays != self.relays:
            self.relays = relays
            self.relay_changes.append((time.monotonic(), relays))
            del self.relay_changes[:-4096]
            self.relays_changed.set()

    # ------------------------------------------------------------------ the line
    def _send(self, type_: int, payload: bytes = b"", replace: bool = False) -> None:
        self.station.send(type_, payload, replace=replace)
        self._wake.set()

    def _status(self) -> bytes:
        inputs = ((p.IN_BUTTON if self.button else 0) | (p.IN_TAMPER_OPEN if self.tamper_open else 0)
                  | (p.IN_MAINS_OK if self.mains_ok else 0))
        return p.status_payload(self.relays, inputs, self.battery_mv)

    def _raw_write(self, data: bytes) -> None:
        if self._master is None or not data:
            if data:
                self.counters["written_while_gone"] += 1
            return
        try:
            os.write(self._master, data)
        except (BlockingIOError, OSError):
            self.counters["write_failures"] += 1  # a full or gone line loses bytes, like a UART

    def _write(self, data: bytes) -> None:
        self._raw_write(self.faults.apply(data, self.rng, self.counters, "out"))

    def _readable(self) -> None:
        if self._master is None:
            return
        try:
            data = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError:
            return  # no slave open right now (EIO): nothing to read
        data = self.faults.apply(data, self.rng, self.counters, "in")
        frames, acks = self.station.feed(data, time.monotonic())
        if acks:
            # An ACK per frame, each its own write, so each can be lost on its own.
            for i in range(0, len(acks), p.OVERHEAD):
                self._write(acks[i:i + p.OVERHEAD])
        for frame in frames:
            self._handle(frame)
        self._wake.set()

    def _handle(self, frame: p.Frame) -> None:
        self.counters[f"rx_{p.NAMES.get(frame.type, 'unknown')}"] += 1
        if frame.type == p.SET_RELAYS:
            self._switch(frame.payload[0])
        elif frame.type == p.SET_FAILSAFE:
            self.failsafe = bool(frame.payload[0])
        elif frame.type == p.STATUS_REQUEST:
            self._send(p.STATUS, self._status(), replace=True)
        # PING: the ACK is the answer; anything else from the edge is ignored (acknowledged)

    async def _pump(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            if now - self._last_status >= self.status_every_s:
                self._last_status = now
                self.station.send(p.STATUS, self._status(), replace=True)
            data = self.station.poll(now)
            if data:
                self._write(data)
            deadline = self.station.deadline()
            next_status = self._last_status + self.status_every_s
            until = next_status if deadline is None else min(deadline, next_status)
            with contextlib.suppress(TimeoutError):  # (not wait_for: it can swallow a cancel)
                async with asyncio.timeout(max(until - time.monotonic(), 0.0)):
                    await self._wake.wait()
