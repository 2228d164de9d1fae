"""The IO board's serial protocol: frames, their codec, and the acknowledge/resend engine.

Pure: no I/O and no clock of its own (callers pass ``now``), so the edge backend
(:mod:`edge.hardware.ioboard`) and the simulated board (:mod:`firmware_sim.ioboard`) run the
same engine from either end. The wire format is documented in ``docs/serial.md``::

    0xA5 | LEN | SEQ | TYPE | PAYLOAD (LEN bytes, LEN <= 32) | CRC16 (big-endian)

The CRC (CRC-16/CCITT-FALSE: polynomial 0x1021, initial 0xFFFF, not reflected) covers LEN, SEQ,
TYPE and PAYLOAD. Every frame except an ACK is acknowledged with an ACK carrying its SEQ; a
sender has one frame in flight and resends it with backoff until that ACK arrives; a receiver
recognises a resent frame by its SEQ (the same as the last one accepted) and acknowledges it
again without acting on it twice. The first frame a station sends uses SEQ 0, which a receiver
always accepts as "the peer started afresh"; later frames count 1..255, 1, ...
"""

from __future__ import annotations

import binascii
import struct
from collections import Counter, deque
from dataclasses import dataclass

START = 0xA5
MAX_PAYLOAD = 32
HEADER = 4  # START, LEN, SEQ, TYPE
OVERHEAD = HEADER + 2  # + CRC
MAX_FRAME = OVERHEAD + MAX_PAYLOAD

# Both directions
ACK = 0x00
# Board -> edge
BOOT = 0x01  # payload: firmware version, ASCII, 1-16 bytes
BUTTON_PRESSED = 0x02  # payload: u16 press number, u16 held ms (the board's hold guard passed)
BUTTON_RELEASED = 0x03  # payload: u16 press number, u16 held ms
TAMPER_OPENED = 0x04
TAMPER_CLOSED = 0x05
MAINS_LOST = 0x06
MAINS_RESTORED = 0x07
BATTERY = 0x08  # payload: u16 millivolts
STATUS = 0x09  # payload: u8 relays, u8 inputs, u16 battery millivolts
# Edge -> board
SET_RELAYS = 0x20  # payload: u8 relays (the whole state)
STATUS_REQUEST = 0x21
PING = 0x22
SET_FAILSAFE = 0x23  # payload: u8 0/1: switch strobe and siren on a press by itself

# Relay bits (SET_RELAYS, STATUS)
STROBE = 0x01
SIREN = 0x02
LAMP = 0x04
RELAY_MASK = STROBE | SIREN | LAMP
# Input bits (STATUS)
IN_BUTTON = 0x01
IN_TAMPER_OPEN = 0x02
IN_MAINS_OK = 0x04

NAMES = {
    ACK: "ack", BOOT: "boot", BUTTON_PRESSED: "button_pressed", BUTTON_RELEASED: "button_released",
    TAMPER_OPENED: "tamper_opened", TAMPER_CLOSED: "tamper_closed", MAINS_LOST: "mains_lost",
    MAINS_RESTORED: "mains_restored", BATTERY: "battery", STATUS: "status",
    SET_RELAYS: "set_relays", STATUS_REQUEST: "status_request", PING: "ping",
    SET_FAILSAFE: "set_failsafe",
}
# The payload length each type must have (BOOT: 1..16, checked in parse_boot).
PAYLOAD_SIZES: dict[int, int] = {
    ACK: 0, BUTTON_PRESSED: 4, BUTTON_RELEASED: 4, TAMPER_OPENED: 0, TAMPER_CLOSED: 0,
    MAINS_LOST: 0, MAINS_RESTORED: 0, BATTERY: 2, STATUS: 4, SET_RELAYS: 1, STATUS_REQUEST: 0,
    PING: 0, SET_FAILSAFE: 1,
}
MAX_VERSION = 16


class FrameError(ValueError):
    """A frame that decoded (its CRC is right) but whose type or payload is not acceptable."""


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (``crc16(b"123456789") == 0x29B1``)."""
    return binascii.crc_hqx(data, 0xFFFF)


@dataclass(frozen=True, slots=True)
class Frame:
    seq: int
    type: int
    payload: bytes = b""

    def encode(self) -> bytes:
        return encode(self.seq, self.type, self.payload)


def encode(seq: int, type_: int, payload: bytes = b"") -> bytes:
    if not 0 <= seq <= 255 or not 0 <= type_ <= 255:
        raise ValueError("seq and type are single bytes")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes (at most {MAX_PAYLOAD})")
    body = bytes((len(payload), seq, type_)) + payload
    return bytes((START,)) + body + crc16(body).to_bytes(2, "big")


class Decoder:
    """Bytes in, frames out. Garbage, truncated frames and bad CRCs are counted and skipped: the
    decoder drops the start byte it tried and resynchronises on the next one. The buffer never
    holds more than one maximal frame."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.counters: Counter[str] = Counter()

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        while buf:
            if buf[0] != START:
                at = buf.find(START)
                skipped = len(buf) if at < 0 else at
                self.counters["garbage_bytes"] += skipped
                del buf[:skipped]
                continue
            if len(buf) < 2:
                break
            length = buf[1]
            if length > MAX_PAYLOAD:  # bounded before anything else is read
                self.counters["bad_length"] += 1
                del buf[:1]
                continue
            end = OVERHEAD + length
            if len(buf) < end:
                break
            body = bytes(buf[1:end - 2])
            if crc16(body) != int.from_bytes(buf[end - 2:end], "big"):
                self.counters["bad_crc"] += 1
                del buf[:1]
                continue
            frames.append(Frame(body[1], body[2], body[3:]))
            self.counters["frames"] += 1
            del buf[:end]
        return frames

    def reset(self) -> None:
        """Forget a partial frame (the line was reopened)."""
        self._buf.clear()


def check(frame: Frame) -> None:
    """Raise :class:`FrameError` unless the frame's type is known and its payload fits it."""
    if frame.type == BOOT:
        parse_boot(frame.payload)
        return
    size = PAYLOAD_SIZES.get(frame.type)
    if size is None:
        raise FrameError(f"unknown frame type 0x{frame.type:02x}")
    if len(frame.payload) != size:
        raise FrameError(f"{NAMES[frame.type]} with {len(frame.payload)} payload bytes "
                         f"(must be {size})")


def parse_boot(payload: bytes) -> str:
    if not 1 <= len(payload) <= MAX_VERSION or not all(0x20 <= b < 0x7F for b in payload):
        raise FrameError("boot frame without a printable firmware version of 1-16 bytes")
    return payload.decode("ascii")


def press_payload(number: int, held_ms: int) -> bytes:
    return struct.pack(">HH", number & 0xFFFF, min(max(held_ms, 0), 0xFFFF))


def parse_press(payload: bytes) -> tuple[int, int]:
    number, held = struct.unpack(">HH", payload)
    return int(number), int(held)


def u16(value: int) -> bytes:
    return struct.pack(">H", min(max(value, 0), 0xFFFF))


def parse_u16(payload: bytes) -> int:
    return int(struct.unpack(">H", payload)[0])


def status_payload(relays: int, inputs: int, battery_mv: int) -> bytes:
    return bytes((relays & 0xFF, inputs & 0xFF)) + u16(battery_mv)


def parse_status(payload: bytes) -> tuple[int, int, int]:
    return payload[0], payload[1], parse_u16(payload[2:4])


@dataclass(slots=True)
class _Outgoing:
    seq: int
    type: int
    payload: bytes
    data: bytes
    attempts: int = 0
    due: float = 0.0
    first_sent: float = 0.0


class Station:
    """One end of the link: numbers, sends, resends and acknowledges frames.

    ``send`` queues a message; ``poll(now)`` returns the bytes due on the line now (a new frame,
    or a resend); ``feed(data, now)`` takes received bytes and returns the frames to act on (new
    ones only: ACKs and duplicates are handled here) and the bytes to write back (the ACKs).
    Queued messages of a type sent with ``replace=True`` are state (relays, status): a newer one
    replaces one still waiting. The queue is bounded; what does not fit is counted and dropped.
    The first frame a station sends gets SEQ 0, so it must be one that may act twice (a boot
    announcement, a ping).
    """

    def __init__(self, ack_timeout_s: float, resend_max_s: float, max_queue: int = 256) -> None:
        self.ack_timeout_s = ack_timeout_s
        self.resend_max_s = resend_max_s
        self.max_queue = max_queue
        self.decoder = Decoder()
        self.counters: Counter[str] = Counter()
        self._queue: deque[tuple[int, bytes]] = deque()
        self._next_seq = 0
        self.outstanding: _Outgoing | None = None
        self._last_rx: int | None = None
        self.last_ack_rtt_s: float | None = None
        # Frames with a good CRC but a bad type or payload, with why: for the caller to log.
        self.refused: deque[tuple[Frame, str]] = deque(maxlen=16)

    # ---------------------------------------------------------------- sending
    def send(self, type_: int, payload: bytes = b"", replace: bool = False) -> bool:
        if replace:
            for i, (queued, _) in enumerate(self._queue):
                if queued == type_:
                    self._queue[i] = (type_, payload)
                    return True
        if len(self._queue) >= self.max_queue:
            self.counters["queue_full"] += 1
            return False
        self._queue.append((type_, payload))
        return True

    def poll(self, now: float) -> bytes:
        out = self.outstanding
        if out is None:
            if not self._queue:
                return b""
            type_, payload = self._queue.popleft()
            seq = self._next_seq
            self._next_seq = seq % 255 + 1  # 0 once, then 1..255
            out = self.outstanding = _Outgoing(seq, type_, payload, encode(seq, type_, payload),
                                               first_sent=now)
        if out.due > now:
            return b""
        out.attempts += 1
        if out.attempts > 1:
            self.counters["resends"] += 1
        out.due = now + min(self.ack_timeout_s * 2 ** (out.attempts - 1), self.resend_max_s)
        return out.data

    def deadline(self) -> float | None:
        """When :meth:`poll` has something to send next (None: nothing to send)."""
        if self.outstanding is not None:
            return self.outstanding.due
        return 0.0 if self._queue else None

    @property
    def unacknowledged(self) -> int:
        """How many times the frame in flight has been sent without an ACK (0: none in flight)."""
        return self.outstanding.attempts if self.outstanding is not None else 0

    @property
    def pending(self) -> int:
        return len(self._queue) + (self.outstanding is not None)

    def retry_now(self) -> None:
        """Resend the frame in flight at the next poll (the line was just reopened)."""
        if self.outstanding is not None:
            self.outstanding.due = 0.0

    # ---------------------------------------------------------------- receiving
    def feed(self, data: bytes, now: float) -> tuple[list[Frame], bytes]:
        new: list[Frame] = []
        acks = bytearray()
        for frame in self.decoder.feed(data):
            if frame.type == ACK:
                out = self.outstanding
                if out is not None and frame.seq == out.seq and not frame.payload:
                    self.last_ack_rtt_s = now - out.first_sent
                    self.outstanding = None
                    self.counters["acked"] += 1
                else:
                    self.counters["acks_stale"] += 1
                continue
            acks += encode(frame.seq, ACK)
            if frame.seq != 0 and frame.seq == self._last_rx:
                self.counters["duplicates"] += 1
                continue
            self._last_rx = frame.seq
            try:
                check(frame)
            except FrameError as exc:
                # Acknowledged (resending it cannot make it right), counted, not acted on.
                self.counters["refused"] += 1
                self.refused.append((frame, str(exc)))
                continue
            new.append(frame)
        return new, bytes(acks)
