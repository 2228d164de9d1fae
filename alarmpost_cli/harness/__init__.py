"""The process harness: the one place that starts, waits for, stops and keeps the logs of the
processes the demo, the benchmarks and the tests run.

=====================  =====================================================================
:class:`Mosquitto`     a generated broker directory's Mosquitto; ready when its log says
                       "running"; reload (SIGHUP) and wait; :func:`start_with_retry` picks
                       another port when the first was taken meanwhile
:class:`PostgreSQL`    a private PostgreSQL (>= 15) on a free port: initdb, start, a DSN, a
                       fresh empty database per test, fast shutdown
:class:`ServerProcess` ``alarmpost server`` as a child; ready when ``/healthz`` says so;
                       SIGTERM stop with its exit code, SIGKILL
=====================  =====================================================================

Each is a context manager (``with`` and ``async with``), has blocking and ``*_async`` waits,
keeps its log file, gets a signal when the process that started it dies (Linux), and raises a
:class:`HarnessError` subclass that says what to do. Writing configurations, passwords and ACLs
is :mod:`provisioning`'s job; this package only runs what it wrote.
"""

from alarmpost_cli.harness._process import HarnessError, die_with_parent, pid_alive, spawn, tail
from alarmpost_cli.harness.mosquitto import BrokerError, Mosquitto, find_mosquitto, start_with_retry
from alarmpost_cli.harness.postgres import (
    PostgresBinaries,
    PostgresError,
    PostgreSQL,
    find_postgres,
)
from alarmpost_cli.harness.server import ServerError, ServerProcess

__all__ = [
    "BrokerError",
    "HarnessError",
    "Mosquitto",
    "PostgreSQL",
    "PostgresBinaries",
    "PostgresError",
    "ServerError",
    "ServerProcess",
    "die_with_parent",
    "find_mosquitto",
    "find_postgres",
    "pid_alive",
    "spawn",
    "start_with_retry",
    "tail",
]
