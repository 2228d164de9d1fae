"""The post's side of the video intercom: aiortc peer connections, camera, microphone, speaker.

Heavy (aiortc, PyAV, OpenCV: ~0.6 s and ~50 MB to import): only :mod:`edge.intercom` imports
this module, in a worker thread, when the post starts ringing.

* One video source per post (the camera through OpenCV, or a moving, timestamped test pattern),
  shared by every call through :class:`aiortc.contrib.media.MediaRelay`; it is opened with the
  first call and released with the last, so the camera is free whenever no one watches.
* The test pattern is paced here on a 90 kHz clock (``VideoStreamTrack`` assumes 30 fps) and
  drawn straight into a YUV 4:2:0 frame (no colour conversion before the VP8 encoder): only
  the luma plane is copied and drawn on per frame.
* The operator's audio goes to :class:`AudioSink` (the post's speaker; tests read its counters).
* No trickle: ``answer()`` takes the browser's complete offer and returns a complete answer.
  ICE servers are always passed explicitly (aiortc would otherwise use a public STUN server).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import av
import cv2
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

log = logging.getLogger("alarmpost.edge.media")

VIDEO_CLOCK = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)


class PacedVideoTrack(MediaStreamTrack):
    """A video track that paces itself at ``fps`` on the 90 kHz RTP clock."""

    kind = "video"

    def __init__(self, fps: float) -> None:
        super().__init__()
        self.fps = fps
        self._step = int(VIDEO_CLOCK / fps)
        self._start: float | None = None
        self._pts = 0
        self.frames = 0

    async def _next_pts(self) -> int:
        if self.readyState != "live":  # stopped: end the relay's reader, or it runs forever
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
            self._pts = 0
        else:
            self._pts += self._step
            wait = self._start + self._pts / VIDEO_CLOCK - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                if self.readyState != "live":
                    raise MediaStreamError
            elif wait < -1.0:  # fell far behind (a stalled loop): restart the clock, no burst
                self._start = time.monotonic() - self._pts / VIDEO_CLOCK
        self.frames += 1
        return self._pts


class TestPatternTrack(PacedVideoTrack):
    """Colour bars, a moving block and the post id with the wall-clock time, in YUV 4:2:0."""

    __test__ = False  # not a pytest test class

    def __init__(self, post_id: str, width: int = 640, height: int = 480, fps: float = 15.0) -> None:
        super().__init__(fps)
        self.post_id = post_id
        self.width, self.height = width - width % 2, height - height % 2
        w, h = self.width, self.height
        bars_bgr = np.zeros((h, w, 3), np.uint8)
        colours = [(255, 255, 255), (0, 255, 255), (255, 255, 0), (0, 255, 0), (255, 0, 255),
                   (0, 0, 255), (255, 0, 0), (40, 40, 40)]
        for i, colour in enumerate(colours):
            bars_bgr[:, i * w // len(colours):(i + 1) * w // len(colours)] = colour
        yuv = cv2.cvtColor(bars_bgr, cv2.COLOR_BGR2YUV_I420)  # (h * 3/2, w): Y then U, V
        self._base_y = yuv[:h].copy()
        self._chroma = yuv[h:].copy()
        self._buffer = np.empty_like(yuv)
        self._buffer[h:] = self._chroma

    def draw(self, n: int) -> np.ndarray[Any, Any]:
        w, h = self.width, self.height
        y = self._buffer[:h]
        np.copyto(y, self._base_y)
        x = (n * 8) % (w - 80)
        y[h // 2 - 40:h // 2 + 40, x:x + 80] = 235 if (n // 15) % 2 else 16
        y[h - 56:h - 8, 8:w - 8] = 16
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        ms = int(time.time() * 1000) % 1000
        cv2.putText(y, f"{self.post_id}  {stamp}.{ms:03d}  #{n}", (16, h - 22),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.8, 235, 2, cv2.LINE_8)
        return self._buffer

    async def recv(self) -> av.VideoFrame:
        pts = await self._next_pts()
        frame = av.VideoFrame.from_ndarray(self.draw(self.frames), format="yuv420p")
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        return frame


class CameraTrack(PacedVideoTrack):
    """Frames from an OpenCV capture device (an index like ``"0"`` or a path/URL)."""

    def __init__(self, source: str, width: int, height: int, fps: float) -> None:
        super().__init__(fps)
        self.source = source
        capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
        if not capture.isOpened():
            raise OSError(f"camera {source!r} could not be opened")
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self._capture: Any = capture

    async def recv(self) -> av.VideoFrame:
        pts = await self._next_pts()
        capture = self._capture
        if capture is None:
            raise MediaStreamError
        ok, image = await asyncio.to_thread(capture.read)
        if not ok:
            raise MediaStreamError
        frame = av.VideoFrame.from_ndarray(image, format="bgr24")
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        return frame

    def stop(self) -> None:
        super().stop()
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.release()


@dataclass
class AudioSink:
    """The post's speaker: what the operator says arrives here (tests read these counters)."""

    frames: int = 0
    samples: int = 0
    peak: int = 0
    sample_rate: int = 0
    tracks: int = 0

    def add(self, frame: av.AudioFrame) -> None:
        self.frames += 1
        self.samples += frame.samples
        self.sample_rate = frame.sample_rate
        data = frame.to_ndarray()
        if data.size:
            self.peak = max(self.peak, int(np.abs(data.astype(np.int32)).max()))


@dataclass
class MediaSettings:
    post_id: str
    camera: str = ""  # "" = test pattern
    width: int = 640
    height: int = 480
    fps: float = 15.0
    ice_servers: list[str] = field(default_factory=list)
    ice_username: str = ""
    ice_password: str = ""


EndedListener = Callable[[str, str], None]  # call_id, reason


class MediaEngine:
    """Peer connections of one post, keyed by call id."""

    def __init__(self, settings: MediaSettings, on_ended: EndedListener | None = None) -> None:
        self.settings = settings
        self.on_ended = on_ended
        self.sink = AudioSink()
        self.calls: dict[str, RTCPeerConnection] = {}
        self._source: PacedVideoTrack | None = None
        self._relay: MediaRelay | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.opened_sources = 0

    @property
    def camera_open(self) -> bool:
        return self._source is not None

    def _ice(self) -> RTCConfiguration:
        s = self.settings
        servers = [
            RTCIceServer(urls=url, username=s.ice_username or None,
                         credential=s.ice_password or None)
            if url.startswith("turn") else RTCIceServer(urls=url)
            for url in s.ice_servers
        ]
        return RTCConfiguration(iceServers=servers)  # [] = none, never aiortc's public default

    def _video(self) -> MediaStreamTrack:
        if self._source is None or self._relay is None:
            s = self.settings
            self._source = (CameraTrack(s.camera, s.width, s.height, s.fps) if s.camera
                            else TestPatternTrack(s.post_id, s.width, s.height, s.fps))
            self._relay = MediaRelay()
            self.opened_sources += 1
            log.info("video source opened: %s", s.camera or "test pattern")
        return self._relay.subscribe(self._source, buffered=False)

    async def answer(self, call_id: str, offer_sdp: str) -> str:
        """Answer the browser's complete offer with a complete answer (no trickle)."""
        if call_id in self.calls:
            raise ValueError(f"call {call_id} exists")
        pc = RTCPeerConnection(self._ice())
        self.calls[call_id] = pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._spawn(self._play(track))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and self.calls.get(call_id) is pc:
                await self.hangup(call_id)
                if self.on_ended is not None:
                    self.on_ended(call_id, f"connection {pc.connectionState}")

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            # Attach to the browser's transceivers (after setRemoteDescription).
            for transceiver in pc.getTransceivers():
                if transceiver.kind == "video":
                    pc.addTrack(self._video())
                elif transceiver.kind == "audio":
                    pc.addTrack(AudioStreamTrack())  # the post's microphone (silence: none fitted)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception:
            await self.hangup(call_id)
            raise
        return str(pc.localDescription.sdp)

    async def _play(self, track: MediaStreamTrack) -> None:
        self.sink.tracks += 1
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if isinstance(frame, av.AudioFrame):
                    self.sink.add(frame)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def hangup(self, call_id: str) -> bool:
        pc = self.calls.pop(call_id, None)
        if pc is None:
            return False
        await pc.close()
        if not self.calls:
            self._release()
        return True

    def _release(self) -> None:
        if self._source is not None:
            self._source.stop()
            log.info("video source released")
        self._source = None
        self._relay = None

    async def close(self) -> None:
        for call_id in list(self.calls):
            await self.hangup(call_id)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._release()
