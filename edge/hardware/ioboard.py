"""The serial IO-board backend: a microcontroller board reads the button, the door tamper switch
and the power supply and drives the strobe, siren and lamp relays; the edge talks to it over a
UART (protocol in ``docs/serial.md``, codec and resend engine in
:mod:`edge.hardware.ioboard_protocol`).

The device is opened with pyserial (baud rate and framing from ``[ioboard]``) and read on the
event loop (``loop.add_reader`` on its file descriptor; writes go out non-blocking, the rest
when the line can take it). The board guards its button itself (hold time, debounce) and sends
one ``button_pressed`` frame per press, which the agent takes as a press at once; the board also
switches strobe and siren on by itself (fail-safe, unless the post is silent), and the agent's
own switching that follows confirms it.

A line that fails (EIO, the adapter unplugged, the device gone) is closed, reported as the fault
``ioboard_link`` and reopened with backoff; a board that stops acknowledging is that fault too,
and one that says nothing for ``silence_s`` has its line reopened. A board that boots (its
``boot`` frame) gets the relay state and the fail-safe setting again. Tamper, mains and battery
become the faults ``tamper``, ``mains_lost`` and ``battery_low``. Everything the line brings is
bounded, counted and logged, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter

import serial

from edge.config import HardwareSection, IoBoardSection
from edge.hardware import ioboard_protocol as p
from edge.hardware.base import FaultListener, PressCallback

log = logging.getLogger("alarmpost.edge.ioboard")

BATTERY_HYSTERESIS_MV = 200
STATUS_EVERY_S = 1.0  # how often the edge asks for a status when the board has said nothing
_PARITY = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}
_STOPBITS = {"1": serial.STOPBITS_ONE, "2": serial.STOPBITS_TWO}


class IoBoardHardware:
    """The :class:`edge.hardware.base.Hardware` of a post built around a serial IO board."""

    def __init__(self, config: IoBoardSection, hardware: HardwareSection | None = None,
                 silent: bool = False) -> None:
        self.config = config
        self.silent = silent
        self.station = p.Station(config.ack_timeout_ms / 1000, config.resend_max_ms / 1000)
        self.counters: Counter[str] = Counter()
        self.fault_listeners: list[FaultListener] = []
        self.presses: list[int] = []  # the board's press numbers, in the order they came (last 4096)
        self.firmware = ""  # from the board's last boot frame
        self.boots = 0
        self.board_relays = 0  # as the board last reported them
        self.link_up = asyncio.Event()  # the device is open and the board has answered
        self._relays = 0  # as the edge wants them
        self._button = False
        self._tamper_open = False
        self._mains_lost = False
        self._battery_mv: int | None = None
        self._battery_low = False
        self._port: serial.Serial | None = None
        self._fd: int | None = None
        self._out = bytearray()
        self._lost: asyncio.Future[str] | None = None
        self._last_rx = 0.0
        self._faults: tuple[str, ...] = ("ioboard_link",)  # until the board has answered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_press: PressCallback | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stations_queued()

    def _stations_queued(self) -> None:
        # The first frame (SEQ 0) may arrive twice: a ping. Then the board learns what to do.
        self.station.send(p.PING)
        self._send_setup()

    def _send_setup(self) -> None:
        self.station.send(p.SET_FAILSAFE, bytes((0 if self.silent else 1,)), replace=True)
        self.station.send(p.SET_RELAYS, bytes((self._relays,)), replace=True)
        self.station.send(p.STATUS_REQUEST, replace=True)

    # ------------------------------------------------------------------ the Hardware interface
    def start(self, loop: asyncio.AbstractEventLoop, on_press: PressCallback) -> None:
        self._loop = loop
        self._on_press = on_press
        self._wake = asyncio.Event()
        self._tasks = [loop.create_task(self._keep_open(), name="ioboard-link"),
                       loop.create_task(self._pump(), name="ioboard-pump")]

    def _set(self, bit: int, on: bool) -> None:
        self._relays = (self._relays | bit) if on else (self._relays & ~bit)
        # Sent even when unchanged: after a press it confirms what the board did by itself.
        self.station.send(p.SET_RELAYS, bytes((self._relays,)), replace=True)
        if self._wake is not None:
            self._wake.set()

    def set_strobe(self, on: bool) -> None:
        self._set(p.STROBE, on)

    def set_siren(self, on: bool) -> None:
        self._set(p.SIREN, on)

    def set_help(self, on: bool) -> None:
        self._set(p.LAMP, on)

    @property
    def button(self) -> bool:
        return self._button

    @property
    def strobe(self) -> bool:
        return bool(self._relays & p.STROBE)

    @property
    def siren(self) -> bool:
        return bool(self._relays & p.SIREN)

    @property
    def help(self) -> bool:
        return bool(self._relays & p.LAMP)

    @property
    def faults(self) -> tuple[str, ...]:
        return self._faults

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._close_port()

    # ------------------------------------------------------------------ the line
    async def _keep_open(self) -> None:
        """Open the device, wait until the line fails, close it; again, with backoff."""
        delay = 0.05
        while True:
            try:
                self._open()
            except (OSError, serial.SerialException, ValueError) as exc:
                self.counters["open_failures"] += 1
                if self.counters["open_failures"] == 1 or delay >= self.config.reopen_max_s:
                    log.warning("IO board %s cannot be opened (%s); retrying",
                                self.config.device, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.reopen_max_s)
                continue
            delay = 0.05
            assert self._lost is not None
            why = await self._lost
            self.counters["link_lost"] += 1
            log.error("IO board link on %s lost (%s): reported as fault ioboard_link; reopening",
                      self.config.device, why)
            self._close_port()
            self._update_faults()

    def _open(self) -> None:
        bits, parity, stop = self.config.framing[0], self.config.framing[1], self.config.framing[2]
        port = serial.Serial(
            self.config.device, baudrate=self.config.baud, bytesize=int(bits),
            parity=_PARITY[parity], stopbits=_STOPBITS[stop], timeout=0, write_timeout=0,
            exclusive=True,
        )
        loop = self._loop
        assert loop is not None
        self._port = port
        self._fd = port.fileno()
        self._out.clear()
        self._lost = loop.create_future()
        self._last_rx = time.monotonic()
        self.station.decoder.reset()
        self.station.retry_now()
        self.station.send(p.STATUS_REQUEST, replace=True)
        loop.add_reader(self._fd, self._readable)
        self.counters["opens"] += 1
        log.info("IO board link on %s open (%d baud, %s)", self.config.device, self.config.baud,
                 self.config.framing)
        assert self._wake is not None
        self._wake.set()

    def _close_port(self) -> None:
        loop, fd, port = self._loop, self._fd, self._port
        self._fd = None
        self._port = None
        self.link_up.clear()
        if loop is not None and fd is not None:
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        if port is not None:
            with contextlib.suppress(Exception):
                port.close()

    def _lose(self, why: str) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(why)

    def _readable(self) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lose(f"read: {exc.strerror or exc}")
            return
        if not data:
            self._lose("end of file")
            return
        self.counters["bytes_in"] += len(data)
        now = time.monotonic()
        before = self.station.decoder.counters["frames"]
        frames, acks = self.station.feed(data, now)
        if self.station.decoder.counters["frames"] != before:
            self._last_rx = now
            if not self.link_up.is_set():
                self.link_up.set()
        while self.station.refused:
            frame, why = self.station.refused.popleft()
            log.warning("IO board frame refused: %s", why)
        if acks:
            self._write(acks)
        for frame in frames:
            try:
                self._handle(frame)
            except Exception:
                self.counters["handler_errors"] += 1
                log.exception("IO board frame %s could not be handled",
                              p.NAMES.get(frame.type, frame.type))
        assert self._wake is not None
        self._wake.set()  # an ACK may have freed the line for the next frame
        self._update_faults()

    def _write(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:
            return  # the line is down: the station resends once it is back
        if self._out:
            self._out += data
            return
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._lose(f"write: {exc.strerror or exc}")
            return
        if n < len(data):
            self._out += data[n:]
            assert self._loop is not None
            self._loop.add_writer(fd, self._writable)

    def _writable(self) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            n = os.write(fd, self._out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lose(f"write: {exc.strerror or exc}")
            return
        del self._out[:n]
        if not self._out:
            assert self._loop is not None
            self._loop.remove_writer(fd)

    async def _pump(self) -> None:
        """Send what the station has due; ask for a status when the board has been quiet."""
        wake = self._wake
        assert wake is not None
        while True:
            wake.clear()
            now = time.monotonic()
            if self._fd is not None:
                quiet = now - self._last_rx
                if quiet > self.config.silence_s:
                    # Open but mute (a board that hung, a device replaced under the same name):
                    # reopen it, which also reports the fault.
                    self._lose(f"the board said nothing for {quiet:.1f} s")
                elif quiet > STATUS_EVERY_S and self.station.pending == 0:
                    self.station.send(p.STATUS_REQUEST, replace=True)
                data = self.station.poll(now)
                if data:
                    self._write(data)
            self._update_faults()
            deadline = self.station.deadline() if self._fd is not None else None
            timeout = 0.25 if deadline is None else min(max(deadline - time.monotonic(), 0.0), 0.25)
            with contextlib.suppress(TimeoutError):  # (not wait_for: it can swallow a cancel)
                async with asyncio.timeout(timeout):
                    await wake.wait()

    # ------------------------------------------------------------------ what the board says
    def _handle(self, frame: p.Frame) -> None:
        t = frame.type
        self.counters[f"rx_{p.NAMES.get(t, 'unknown')}"] += 1
        if t == p.BUTTON_PRESSED:
            number, held = p.parse_press(frame.payload)
            self._button = True
            self.presses.append(number)
            del self.presses[:-4096]
            log.info("IO board: press %d (held %d ms)", number, held)
            assert self._on_press is not None
            self._on_press(held)
        elif t == p.BUTTON_RELEASED:
            self._button = False
        elif t == p.BOOT:
            self.firmware = p.parse_boot(frame.payload)
            self.boots += 1
            log.warning("IO board booted (firmware %s): restoring relays %s", self.firmware,
                        _relay_names(self._relays))
            self._send_setup()
        elif t == p.TAMPER_OPENED:
            self._tamper_open = True
        elif t == p.TAMPER_CLOSED:
            self._tamper_open = False
        elif t == p.MAINS_LOST:
            self._mains_lost = True
        elif t == p.MAINS_RESTORED:
            self._mains_lost = False
        elif t == p.BATTERY:
            self._battery(p.parse_u16(frame.payload))
        elif t == p.STATUS:
            relays, inputs, battery = p.parse_status(frame.payload)
            self.board_relays = relays & p.RELAY_MASK
            self._button = bool(inputs & p.IN_BUTTON)
            self._tamper_open = bool(inputs & p.IN_TAMPER_OPEN)
            self._mains_lost = not inputs & p.IN_MAINS_OK
            self._battery(battery)
            if self.board_relays != self._relays and self.station.pending == 0:
                self.counters["relays_corrected"] += 1
                self.station.send(p.SET_RELAYS, bytes((self._relays,)), replace=True)
        else:
            self.counters["unexpected_frames"] += 1
            log.warning("IO board sent a %s frame, which only the edge sends",
                        p.NAMES.get(t, hex(t)))

    def _battery(self, mv: int) -> None:
        self._battery_mv = mv
        low = self.config.battery_low_mv
        if mv < low:
            self._battery_low = True
        elif mv >= low + BATTERY_HYSTERESIS_MV:
            self._battery_low = False

    @property
    def battery_mv(self) -> int | None:
        return self._battery_mv

    # ------------------------------------------------------------------ faults
    def _link_fault(self, now: float) -> bool:
        return (self._fd is None or not self.link_up.is_set()
                or self.station.unacknowledged >= self.config.fault_after
                or now - self._last_rx > self.config.silence_s)

    def _update_faults(self) -> None:
        faults = []
        if self._link_fault(time.monotonic()):
            faults.append("ioboard_link")
        if self._tamper_open:
            faults.append("tamper")
        if self._mains_lost:
            faults.append("mains_lost")
        if self._battery_low:
            faults.append("battery_low")
        new = tuple(faults)
        if new == self._faults:
            return
        log.info("IO board faults: %s", ", ".join(new) or "none")
        self._faults = new
        for listener in self.fault_listeners:
            try:
                listener()
            except Exception:
                self.counters["listener_errors"] += 1
                log.exception("a fault listener failed")


def _relay_names(relays: int) -> str:
    names = [n for bit, n in ((p.STROBE, "strobe"), (p.SIREN, "siren"), (p.LAMP, "lamp"))
             if relays & bit]
    return "+".join(names) or "all off"
