"""Debian's Chromium under Playwright, for the console's browser tests and the video benchmark.

Never ``playwright install`` (it downloads a browser): the system's ``chromium`` package is used
through ``executable_path``. ``--use-fake-ui-for-media-stream`` also matters for WebRTC: without a
granted microphone Chromium hides its host addresses behind mDNS ``.local`` names that aioice
cannot resolve, and every answer stalls.
"""

from __future__ import annotations

import os
import shutil
from typing import Final

CHROMIUM_ARGS: Final = (
    "--no-sandbox",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",  # the ring may sound before any click
)

INSTALL_HINT: Final = (
    "Chromium was not found: install Debian's package with  sudo apt-get install -y chromium  "
    "(./run test does this); never `playwright install`"
)


def find_chromium() -> str | None:
    """Path of the system Chromium ($ALARMPOST_CHROMIUM, /usr/bin/chromium, or on PATH)."""
    for candidate in (os.environ.get("ALARMPOST_CHROMIUM", ""), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")
