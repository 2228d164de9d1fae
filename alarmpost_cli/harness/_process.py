"""What every supervised child has in common: errors, spawning, dying with the parent, log tails."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO


class HarnessError(RuntimeError):
    """A process of the harness is missing, failed to start, did not become ready or exited."""


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child ``sig`` when its parent dies (Linux), else None.

    Demos, tests and benchmarks start brokers, databases and servers; if they are SIGKILLed, their
    children must not live on. ``prctl`` is looked up here, before the fork; the child only calls
    it. Beware: the signal follows the *thread* that forked, so only use it from a thread that
    lives as long as the parent (the main thread): :func:`spawn` does that check.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def setup() -> None:
        prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG

    return setup


def spawn(
    args: Sequence[str],
    *,
    log_path: Path | None = None,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    stdout_to_log: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    new_session: bool = True,
    death_signal: int = signal.SIGTERM,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``args`` with stdout and stderr appended to ``log_path`` (kept after the process).

    ``new_session``: the child does not get the terminal's Ctrl-C; whoever started it stops it in
    order. ``death_signal`` reaches the child when this process dies (from the main thread only).
    ``user``: run as that account (only as root; the parent-death signal is set after the switch,
    which would clear it otherwise).
    """
    preexec = die_with_parent(death_signal) if threading.current_thread() is threading.main_thread() \
        else None
    extra_groups: list[int] | None = [] if user is not None else None  # drop root's groups
    log = log_path.open("ab") if log_path is not None else None
    out: int | IO[bytes] = log if (log is not None and stdout_to_log) else subprocess.DEVNULL
    err: int | IO[bytes] = log if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            list(args),
            stdin=stdin,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=new_session,
            preexec_fn=preexec,
            user=user,
            group=user,
            extra_groups=extra_groups,
        )
    finally:
        if log is not None:
            log.close()  # the child has its own descriptor


def tail(path: Path, lines: int = 20, *, since: int = 0) -> str:
    """The last ``lines`` lines of a log (from byte ``since``), or a note that there is none."""
    try:
        with path.open("rb") as fh:
            fh.seek(since)
            text = fh.read().decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def read_since(path: Path, offset: int) -> str:
    """What a log gained since byte ``offset`` ("" when it does not exist yet)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
                 timeout: float = 15.0) -> int | None:
    """Send ``sig``, wait up to ``timeout`` s, SIGKILL if still there. The exit code, or None."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def kill_process(proc: subprocess.Popen[bytes] | None) -> int | None:
    """SIGKILL and reap. The exit code, or None."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    return proc.returncode


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
