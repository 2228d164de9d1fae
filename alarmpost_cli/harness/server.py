"""``alarmpost server`` as a supervised child: start, wait for /healthz, stop (SIGTERM), kill.

Its stdout and stderr are appended to a log file that stays after it stops. Readiness is the
server's own answer: ``GET /healthz`` (with the config's API token) says ``{"ok": true}`` once it
is connected to the broker.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alarmpost_cli.harness._process import HarnessError, kill_process, spawn, stop_process, tail

if TYPE_CHECKING:
    from provisioning.deployment import Deployment

ALARMPOST = [sys.executable, "-m", "alarmpost_cli.main"]
_POLL_S = 0.05


class ServerError(HarnessError):
    """The server failed to start, did not become ready or exited."""


def _http_settings(config: Path) -> tuple[str, int, str]:
    """(host to reach, port, API token) from a server config's ``[http]`` section."""
    try:
        http = tomllib.loads(config.read_text()).get("http", {})
        host = str(http.get("host", "127.0.0.1"))
        return ("127.0.0.1" if host in {"", "0.0.0.0", "::"} else host, int(http["port"]),
                str(http.get("api_token", "")))
    except (OSError, tomllib.TOMLDecodeError, KeyError, ValueError, TypeError) as exc:
        raise ServerError(f"cannot read the HTTP address from {config}: {exc}") from None


class ServerProcess:
    """One ``alarmpost server --config CONFIG`` process.

    ``log_level``: the server's ``--log-level``; ``env``, ``cwd``: the child's environment and
    working directory (default: this process's). ``async with ServerProcess(...)`` starts it,
    waits until it is ready and stops it at the end.
    """

    def __init__(
        self,
        config: Path,
        log_path: Path,
        *,
        log_level: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.config = config
        self.log_path = log_path
        self.log_level = log_level
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def for_deployment(cls, dep: Deployment, log_path: Path, **kwargs: Any) -> ServerProcess:
        return cls(dep.server_config, log_path, **kwargs)

    @property
    def command(self) -> list[str]:
        level = ["--log-level", self.log_level] if self.log_level else []
        return [*ALARMPOST, *level, "server", "--config", str(self.config)]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def tail(self, lines: int = 20) -> str:
        return "\n".join("  " + line for line in tail(self.log_path, lines).splitlines())

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Start the process (without waiting: see :meth:`wait_ready`)."""
        if self.running:
            return
        self.proc = spawn(self.command, log_path=self.log_path, env=self.env, cwd=self.cwd)

    def check_alive(self) -> None:
        """Raise :class:`ServerError` with its log if the process has exited."""
        if self.proc is None:
            raise ServerError("the server was not started")
        if self.proc.poll() is not None:
            raise ServerError(f"the server exited with code {self.proc.returncode}; its log "
                              f"({self.log_path}):\n{self.tail()}")

    async def wait_ready(self, within: float = 15.0,
                         check: Callable[[], None] | None = None) -> None:
        """Until ``/healthz`` answers ``{"ok": true}``. Raises :class:`ServerError` if the process
        exits or ``within`` s pass; ``check`` is called between tries (to raise on other trouble,
        such as the broker gone)."""
        import aiohttp

        host, port, token = _http_settings(self.config)
        url = f"http://{host}:{port}/healthz"
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token}"}, timeout=aiohttp.ClientTimeout(total=3)
        ) as http:
            while True:
                self.check_alive()
                if check is not None:
                    check()
                try:
                    async with http.get(url) as resp:
                        if resp.status == 200 and (await resp.json()).get("ok") is True:
                            return
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise ServerError(f"the server did not become ready (GET {url}) within "
                                      f"{within:g} s; its log ({self.log_path}):\n{self.tail()}")
                await asyncio.sleep(_POLL_S)

    # ------------------------------------------------------------------ stop
    def send_signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout`` s); the exit code (0: a clean stop)."""
        code = stop_process(self.proc, signal.SIGTERM, timeout)
        return 0 if code is None else code

    async def stop_async(self, within: float = 15.0) -> int:
        """:meth:`stop`, waiting on the event loop."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + within
            while self.proc.poll() is None:
                if time.monotonic() > deadline:
                    kill_process(self.proc)
                    break
                await asyncio.sleep(_POLL_S)
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL, as in a crash; the exit code (-9)."""
        code = kill_process(self.proc)
        return 0 if code is None else code

    # ------------------------------------------------------------------ context manager
    async def __aenter__(self) -> ServerProcess:
        self.start()
        try:
            await self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_async()
