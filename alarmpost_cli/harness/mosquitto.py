"""Mosquitto as a supervised child: start, wait until ready, reload, stop, kill.

The broker directory (``mosquitto.conf``, ``passwd``, ``acl``, ``data/``) is written by
:mod:`provisioning.broker`; this module only runs it. Its log is ``mosquitto.log`` in that
directory (the generated config says so) and stays there after the broker stops.

Readiness is read from the broker's own log: "running" while the process is still alive. A bare
TCP probe can be fooled by another broker on the same port (the new one then exits 1, "Address
already in use"), which :func:`start_with_retry` answers with another port.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from alarmpost_cli.harness._process import (
    HarnessError,
    kill_process,
    read_since,
    size_of,
    spawn,
    stop_process,
)
from provisioning import broker as broker_config

if TYPE_CHECKING:
    from provisioning.deployment import Deployment

log = logging.getLogger("alarmpost.harness.mosquitto")

INSTALL_HINT = (
    "Mosquitto (>= 2.0) was not found on PATH or in /usr/sbin. "
    "Install it with:  sudo apt-get install -y mosquitto   "
    "(the project's ./run script does this for you)."
)

_POLL_S = 0.005


class BrokerError(HarnessError):
    """Mosquitto is missing, failed to start, did not reload or exited."""


def find_mosquitto() -> str:
    """Path of the ``mosquitto`` binary, looking in ``/usr/sbin`` too; raise with an install hint."""
    found = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path="/usr/sbin:/usr/local/sbin:/sbin"
    )
    if not found:
        raise BrokerError(INSTALL_HINT)
    return found


class Mosquitto:
    """One Mosquitto process for a generated broker directory.

    ``start``/``stop``/``reload_and_wait`` block (a few ms); ``start_async``/``stop_async``/
    ``reload_and_wait_async`` wait on the event loop instead. ``with Mosquitto(...)`` and
    ``async with Mosquitto(...)`` start it and stop it at the end.
    """

    def __init__(self, directory: Path, port: int, host: str = "127.0.0.1") -> None:
        self.directory = directory
        self.port = port
        self.host = host
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    @classmethod
    def for_deployment(cls, dep: Deployment) -> Mosquitto:
        """The broker of a deployment written by :func:`provisioning.deployment.create`."""
        return cls(dep.broker_dir, dep.broker_port, dep.listen)

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    @property
    def config_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # ------------------------------------------------------------------ start
    def _spawn(self) -> bool:
        """Start the process; False if it already runs."""
        if self.running:
            return False
        binary = find_mosquitto()
        if not self.config_path.exists():
            raise BrokerError(f"{self.config_path} does not exist: write the broker directory "
                              "first (provisioning.broker.write_broker_dir)")
        self._offset = size_of(self.log_path)
        # Mosquitto writes its log itself (log_dest file); what it prints to stdout or stderr
        # (before it has read its config, say) is appended to the same file.
        self.proc = spawn([binary, "-c", str(self.config_path)], log_path=self.log_path)
        return True

    def _check_started(self) -> bool:
        """True once the broker reported "running"; raise if it exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BrokerError(
                f"mosquitto exited with code {self.proc.returncode} on port {self.port}: "
                f"{read_since(self.log_path, self._offset).strip()[-600:]} "
                f"(config {self.config_path}, log {self.log_path})"
            )
        if " running" in read_since(self.log_path, self._offset):
            log.info("mosquitto running on %s:%d (pid %d)", self.host, self.port, self.proc.pid)
            return True
        return False

    def _not_started(self, timeout: float) -> BrokerError:
        self.kill()
        return BrokerError(f"mosquitto did not report running within {timeout} s; its log: "
                           f"{self.log_path}")

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait for "running" in its log, checking the process stays alive."""
        if not self._spawn():
            return
        deadline = time.monotonic() + timeout
        while not self._check_started():
            if time.monotonic() > deadline:
                raise self._not_started(timeout)
            time.sleep(_POLL_S)

    async def start_async(self, within: float = 10.0) -> None:
        """:meth:`start`, waiting on the event loop."""
        if not self._spawn():
            return
        deadline = time.monotonic() + within
        while not self._check_started():
            if time.monotonic() > deadline:
                raise self._not_started(within)
            await asyncio.sleep(_POLL_S)

    # ------------------------------------------------------------------ stop
    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Mosquitto saves its persistence file and exits (SIGKILL after ``timeout``)."""
        stop_process(self.proc, signal.SIGTERM, timeout)

    async def stop_async(self, within: float = 10.0) -> None:
        """:meth:`stop`, waiting on the event loop."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + within
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                kill_process(self.proc)
                return
            await asyncio.sleep(_POLL_S)

    def kill(self) -> None:
        """SIGKILL: everything since the last autosave is lost, as in a crash."""
        kill_process(self.proc)

    # ------------------------------------------------------------------ reload
    def reload(self) -> None:
        """SIGHUP: re-read password and ACL files (revoked clients are dropped)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGHUP)

    def _begin_reload(self) -> int:
        if not self.running:
            raise BrokerError("mosquitto is not running")
        offset = size_of(self.log_path)
        self.reload()
        return offset

    def _reloaded(self, offset: int, deadline: float, timeout: float) -> bool:
        if "Reloading config" in read_since(self.log_path, offset):
            return True
        if time.monotonic() > deadline or not self.running:
            raise BrokerError(f"mosquitto did not reload within {timeout} s; its log: {self.log_path}")
        return False

    def reload_and_wait(self, timeout: float = 10.0) -> None:
        """SIGHUP, then wait until the broker logs that it reloads. Mosquitto re-reads its files
        in its main loop before it reads any further packet, so a client that connects after
        this returns meets the new password and ACL files."""
        offset = self._begin_reload()
        deadline = time.monotonic() + timeout
        while not self._reloaded(offset, deadline, timeout):
            time.sleep(_POLL_S)

    async def reload_and_wait_async(self, within: float = 10.0) -> None:
        """:meth:`reload_and_wait`, waiting on the event loop."""
        offset = self._begin_reload()
        deadline = time.monotonic() + within
        while True:
            if self._reloaded(offset, deadline, within):
                return
            await asyncio.sleep(_POLL_S)

    # ------------------------------------------------------------------ context managers
    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Mosquitto:
        await self.start_async()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_async()


def start_with_retry(directory: Path, *, host: str = "127.0.0.1", attempts: int = 5) -> Mosquitto:
    """Pick a free port, (re)write the config for it, start; retry if the port was taken meanwhile.

    For a bare broker directory (``passwd`` and ``acl`` written): a deployment's clients have the
    port in their own configs, so a deployment's broker is started with :meth:`Mosquitto.start`.
    """
    last: Exception | None = None
    for _ in range(attempts):
        port = broker_config.free_port(host)
        (directory / "mosquitto.conf").write_text(
            broker_config.config_text(port=port, directory=directory, host=host))
        broker = Mosquitto(directory, port, host)
        try:
            broker.start()
            return broker
        except BrokerError as exc:
            last = exc
            if "Address already in use" not in str(exc):
                raise
            log.info("port %d was taken meanwhile; trying another", port)
    raise BrokerError(f"no free port after {attempts} attempts: {last}")
