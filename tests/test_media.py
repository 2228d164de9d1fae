"""The post's media engine against a second aiortc peer in the same process (no browser).

aioice skips 127.0.0.1: these need a non-loopback address on the machine (in a bare network
namespace, ``ip addr add 127.0.0.2/8 dev lo``).
"""

from __future__ import annotations

import asyncio
import fractions
import gc
import math

import numpy as np
import psutil
import pytest
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from edge.media import VIDEO_CLOCK, MediaEngine, MediaSettings, TestPatternTrack
from protocol.ulid import new_ulid


class ToneTrack(MediaStreamTrack):
    """The operator's microphone: a 440 Hz tone, 20 ms frames at 48 kHz."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pts = 0

    async def recv(self) -> AudioFrame:
        await asyncio.sleep(0.02)
        t = (np.arange(960) + self._pts) / 48000
        data = (np.sin(2 * math.pi * 440 * t) * 8000).astype(np.int16).reshape(1, -1)
        frame = AudioFrame.from_ndarray(data, format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, 48000)
        self._pts += 960
        return frame


class Operator:
    """The browser's side: recvonly video, a microphone, one complete offer."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.video: asyncio.Queue[MediaStreamTrack] = asyncio.Queue()
        self.pc.on("track", lambda track: self.video.put_nowait(track) if track.kind == "video"
                   else None)

    async def offer(self) -> str:
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTrack(ToneTrack())
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def answer(self, sdp: str) -> MediaStreamTrack:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        return await asyncio.wait_for(self.video.get(), 5)


async def call(engine: MediaEngine) -> tuple[str, Operator, MediaStreamTrack]:
    op = Operator()
    call_id = new_ulid()
    track = await op.answer(await engine.answer(call_id, await op.offer()))
    return call_id, op, track


async def test_test_pattern_is_paced_and_moves() -> None:
    track = TestPatternTrack("P001", 320, 240, fps=15)
    loop = asyncio.get_running_loop()
    started = loop.time()
    frames = [await track.recv() for _ in range(8)]
    took = loop.time() - started
    assert [f.pts for f in frames] == [i * VIDEO_CLOCK // 15 for i in range(8)]
    assert 7 / 15 - 0.05 < took < 7 / 15 + 0.25  # 15 fps, not aiortc's fixed 30
    a, b = (f.to_ndarray() for f in (frames[1], frames[5]))
    assert a.shape == (360, 320) and not np.array_equal(a, b)  # the block and the time move
    track.stop()


async def test_frames_arrive_and_audio_reaches_the_sink() -> None:
    engine = MediaEngine(MediaSettings(post_id="P001", width=320, height=240))
    call_id, op, track = await call(engine)
    assert engine.camera_open
    frames = [await asyncio.wait_for(track.recv(), 5) for _ in range(5)]
    assert frames[-1].width == 320 and frames[-1].pts > frames[0].pts
    for _ in range(100):
        if engine.sink.peak > 1000:
            break
        await asyncio.sleep(0.05)
    assert engine.sink.frames > 0 and engine.sink.peak > 1000  # the tone, not silence
    assert await engine.hangup(call_id)
    assert not engine.camera_open and not engine.calls
    with pytest.raises(MediaStreamError):
        while True:  # the operator's side sees the stream end
            await asyncio.wait_for(track.recv(), 5)
    await op.pc.close()
    await engine.close()


async def test_one_camera_serves_several_viewers() -> None:
    engine = MediaEngine(MediaSettings(post_id="P001", width=320, height=240))
    first, op1, track1 = await call(engine)
    second, op2, track2 = await call(engine)
    for track in (track1, track2):
        await asyncio.wait_for(track.recv(), 5)
    assert engine.opened_sources == 1 and len(engine.calls) == 2
    await engine.hangup(first)
    assert engine.camera_open  # the second viewer still watches
    await asyncio.wait_for(track2.recv(), 5)
    await engine.hangup(second)
    assert not engine.camera_open
    for op in (op1, op2):
        await op.pc.close()
    await engine.close()


async def test_fifty_call_cycles_leave_memory_flat_and_the_camera_free() -> None:
    engine = MediaEngine(MediaSettings(post_id="P001", width=320, height=240))
    proc = psutil.Process()

    async def cycle() -> None:
        call_id, op, track = await call(engine)
        await asyncio.wait_for(track.recv(), 5)
        await engine.hangup(call_id)
        await op.pc.close()

    for _ in range(20):  # warm up: codecs, caches, the allocator's arenas
        await cycle()
    gc.collect()
    before = proc.memory_info().rss
    for _ in range(50):
        await cycle()
    gc.collect()
    growth_mb = (proc.memory_info().rss - before) / 2**20
    print(f"RSS growth over 50 call cycles: {growth_mb:.1f} MB")
    assert not engine.camera_open and not engine.calls
    assert engine.opened_sources == 70
    assert growth_mb < 10, f"RSS grew {growth_mb:.1f} MB over 50 calls"
    await engine.close()


def test_the_idle_agent_does_not_load_the_media_stack() -> None:
    """aiortc/PyAV/OpenCV cost ~0.6 s and ~50 MB: only a ringing post loads them."""
    import subprocess
    import sys

    code = ("import sys, edge.agent, firmware_sim.fleet; "
            "print(sorted(m for m in ('aiortc', 'av', 'cv2', 'aioice') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


async def test_a_press_preloads_the_media_stack_once() -> None:
    import logging

    from edge.intercom import Intercom

    async def publish(signal: object) -> None:
        raise AssertionError("nothing to send")

    intercom = Intercom({"post_id": "P001"}, publish, logging.getLogger("test"))
    intercom.preload()
    first = intercom._loading
    intercom.preload()
    assert intercom._loading is first
    engine = await intercom._engine()
    assert engine.settings.post_id == "P001" and not engine.camera_open
    await intercom.close()
