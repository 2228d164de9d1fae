"""The IO board's frame codec and resend engine (edge/hardware/ioboard_protocol.py), pure."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.hardware import ioboard_protocol as p

# 2,500 + 4,000 + 2,500 + 1,000 = 10,000 cases in all.
frames = st.builds(p.Frame, st.integers(0, 255), st.integers(0, 255),
                   st.binary(max_size=p.MAX_PAYLOAD))
fast = settings(deadline=None, database=None)


def test_crc_is_ccitt_false() -> None:
    assert p.crc16(b"123456789") == 0x29B1


@settings(fast, max_examples=2500)
@given(st.lists(frames, max_size=4), st.integers(1, 64))
def test_round_trip_in_any_chunking(sent: list[p.Frame], chunk: int) -> None:
    wire = b"".join(f.encode() for f in sent)
    decoder = p.Decoder()
    got: list[p.Frame] = []
    for i in range(0, len(wire), chunk):
        got += decoder.feed(wire[i:i + chunk])
    assert got == sent
    assert decoder.counters["bad_crc"] == decoder.counters["garbage_bytes"] == 0


def _valid(frame: p.Frame) -> bool:
    body = bytes((len(frame.payload), frame.seq, frame.type)) + frame.payload
    return len(frame.payload) <= p.MAX_PAYLOAD and frame.encode()[-2:] == p.crc16(body).to_bytes(2, "big")


@settings(fast, max_examples=4000)
@given(st.binary(max_size=512))
def test_garbage_never_crashes_and_yields_only_frames_with_a_good_crc(garbage: bytes) -> None:
    decoder = p.Decoder()
    for frame in decoder.feed(garbage):
        assert _valid(frame)
    assert len(decoder._buf) < p.MAX_FRAME  # bounded


@settings(fast, max_examples=2500)
@given(st.lists(frames, min_size=1, max_size=4), st.data())
def test_bit_flips_and_truncation_lose_only_the_damaged_frames(sent: list[p.Frame],
                                                             data: st.DataObject) -> None:
    wire = bytearray(b"".join(f.encode() for f in sent))
    for _ in range(data.draw(st.integers(0, 3))):
        bit = data.draw(st.integers(0, len(wire) * 8 - 1))
        wire[bit // 8] ^= 1 << (bit % 8)
    cut = data.draw(st.integers(0, len(wire)))
    decoder = p.Decoder()
    got = decoder.feed(bytes(wire[:cut]))
    for frame in got:
        assert _valid(frame)
    # After the damage, a clean frame is always found again (resynchronisation).
    marker = p.Frame(7, p.PING)
    assert decoder.feed(marker.encode() * (p.MAX_FRAME // len(marker.encode()) + 2))[-1] == marker


@settings(fast, max_examples=1000)
@given(st.lists(frames, min_size=1, max_size=4), st.binary(min_size=1, max_size=64))
def test_a_frame_after_garbage_is_found(sent: list[p.Frame], garbage: bytes) -> None:
    decoder = p.Decoder()
    decoder.feed(garbage)
    decoder.feed(b"\x00" * p.MAX_FRAME)  # the line goes quiet long enough to flush any false start
    assert decoder.feed(b"".join(f.encode() for f in sent)) == sent


def test_lengths_are_bounded_before_use() -> None:
    decoder = p.Decoder()
    assert decoder.feed(bytes((p.START, 0xFF)) + b"\x00" * 300) == []
    assert decoder.counters["bad_length"] == 1
    assert len(decoder._buf) == 0


def test_payloads_are_checked_per_type() -> None:
    station = p.Station(0.05, 1.0)
    frames, acks = station.feed(p.encode(1, p.BUTTON_PRESSED, b"\x00") + p.encode(2, 0x7F)
                                + p.encode(3, p.BOOT, b"\x01bad"), 0.0)
    assert frames == []
    assert station.counters["refused"] == 3
    assert acks == p.encode(1, p.ACK) + p.encode(2, p.ACK) + p.encode(3, p.ACK)


def test_stations_deliver_everything_once_over_a_lossy_line() -> None:
    """Two stations over a simulated line that drops, duplicates and corrupts 10 % each."""
    rng = random.Random(1)
    a, b = p.Station(0.05, 0.5, max_queue=1024), p.Station(0.05, 0.5)
    b.send(p.BOOT, b"t-1")
    a.send(p.PING)
    for n in range(1, 301):
        a.send(p.BUTTON_PRESSED, p.press_payload(n, 100))
    got: list[int] = []

    def line(data: bytes) -> bytes:
        if not data or rng.random() < 0.1:
            return b""
        if rng.random() < 0.1:
            flipped = bytearray(data)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            data = bytes(flipped)
        return data * 2 if rng.random() < 0.1 else data

    now = 0.0
    while (a.pending or b.pending) and now < 600:
        now += 0.01
        for src, dst in ((a, b), (b, a)):
            frames, acks = dst.feed(line(src.poll(now)), now)
            src.feed(line(acks), now)
            got += [p.parse_press(f.payload)[0] for f in frames if f.type == p.BUTTON_PRESSED]
    assert got == list(range(1, 301))
    assert a.counters["resends"] > 0 and b.counters["duplicates"] > 0


def test_resend_backoff_doubles_to_its_ceiling() -> None:
    station = p.Station(0.05, 0.3)
    station.send(p.PING)
    times = []
    now = 0.0
    while len(times) < 6:
        if station.poll(now):
            times.append(round(now, 3))
        now += 0.001
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
    assert gaps == [0.05, 0.1, 0.2, 0.3, 0.3]
