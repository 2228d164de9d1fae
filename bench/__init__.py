"""Benchmarks that print figures: ``alarmpost bench NAME [--json] [KEY=VALUE ...]``.

Each benchmark is a module with ``main(as_json: bool, options: dict[str, str]) -> int``. With
``--json`` the last line of output is one JSON object. Timings are reported as p50/p95/p99 (see
:func:`percentile`), never asserted in tests.

Exit codes: 0 all targets met, 1 a target missed, 2 bad usage (unknown benchmark or option),
3 the benchmark could not run (broker, server or fleet failed).
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Sequence

# name -> (module, one-line description)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "alarm-path": (
        "bench.alarm_path",
        "press -> commit -> ACK latency with a 1,000-post fleet, a 1,000-press burst, "
        "server CPU/RSS and one edge agent's RSS; hostile_rate=N adds a post publishing garbage",
    ),
    "dispatch": (
        "bench.dispatch",
        "press -> page at the patrol team's device with 1,000 posts and 500 moving teams, team "
        "selection among 10,000 teams, a 200-alarm burst (all paged, none double-booked)",
    ),
    "mutation": (
        "bench.mutation",
        "mutation testing (mutmut) of the alarm path and the security guards: mutants killed, "
        "survived, score per module (about 30 min on 2 cores)",
    ),
    "video": (
        "bench.video",
        "video intercom in real Chromium: answer click -> first frame p50/p95 over 20 calls, "
        "edge CPU and RSS of one 640x480 15 fps VP8 stream, edge RSS growth over 50 calls",
    ),
}


def known_benchmarks() -> str:
    width = max(len(n) for n in BENCHMARKS)
    return "\n".join(f"  {name:<{width}}  {desc}" for name, (_, desc) in sorted(BENCHMARKS.items()))


def parse_options(options: Sequence[str]) -> dict[str, str]:
    """``["posts=200", "presses=100"]`` -> ``{"posts": "200", "presses": "100"}``."""
    out: dict[str, str] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"option {item!r} is not KEY=VALUE")
        out[key.strip().lower().replace("-", "_")] = value.strip()
    return out


def run_bench(name: str, as_json: bool, options: list[str]) -> int:
    """Run benchmark ``name``; unknown names print the list of known ones and return 2."""
    entry = BENCHMARKS.get(name)
    if entry is None:
        print(f"alarmpost bench: unknown benchmark {name!r}; known benchmarks:\n{known_benchmarks()}",
              file=sys.stderr)
        return 2
    try:
        parsed = parse_options(options)
    except ValueError as exc:
        print(f"alarmpost bench {name}: {exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(entry[0])
    return int(module.main(as_json, parsed))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks.

    This is numpy's default ("linear", Hyndman & Fan type 7) and ``statistics.quantiles(...,
    method="inclusive")``: position ``(n - 1) * q / 100`` in the sorted values, interpolated.
    ``nan`` for no values.
    """
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary_ms(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p95/p99/max in milliseconds (rounded to 0.01 ms) and the sample count ``n``.

    With no samples the figures are ``None`` (JSON ``null``), never NaN (not valid JSON).
    """
    ms = [s * 1000 for s in seconds]
    if not ms:
        return {"p50": None, "p95": None, "p99": None, "max": None, "n": 0}
    return {
        "p50": round(percentile(ms, 50), 2),
        "p95": round(percentile(ms, 95), 2),
        "p99": round(percentile(ms, 99), 2),
        "max": round(max(ms), 2),
        "n": len(ms),
    }
