"""Counters, gauges and histograms rendered in the Prometheus text format (no dependency)."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + inner + "}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1


class Metrics:
    def __init__(self, namespace: str = "alarmpost") -> None:
        self.ns = namespace
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self._gauges: dict[str, Callable[[], float]] = {}
        self._histograms: dict[str, Histogram] = {}

    def counter(self, name: str, help_text: str) -> None:
        self._help[name] = ("counter", help_text)
        self._counters.setdefault(name, {})

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._counters[name]
        series[key] = series.get(key, 0) + n

    def value(self, name: str, **labels: str) -> float:
        return self._counters[name].get(tuple(sorted(labels.items())), 0)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._help[name] = ("gauge", help_text)
        self._gauges[name] = read

    def histogram(self, name: str, help_text: str, buckets: tuple[float, ...]) -> Histogram:
        self._help[name] = ("histogram", help_text)
        h = self._histograms[name] = Histogram(buckets)
        return h

    def render(self) -> str:
        out: list[str] = []
        for name, (kind, help_text) in self._help.items():
            full = f"{self.ns}_{name}"
            out.append(f"# HELP {full} {help_text}")
            out.append(f"# TYPE {full} {kind}")
            if kind == "counter":
                series = self._counters[name] or {(): 0}
                for key, value in sorted(series.items()):
                    out.append(f"{full}{_labels(dict(key))} {value:g}")
            elif kind == "gauge":
                out.append(f"{full} {self._gauges[name]():g}")
            else:
                h = self._histograms[name]
                cumulative = 0
                for bound, count in zip(h.buckets, h.counts, strict=False):
                    cumulative += count
                    out.append(f'{full}_bucket{{le="{bound:g}"}} {cumulative}')
                out.append(f'{full}_bucket{{le="+Inf"}} {h.n}')
                out.append(f"{full}_sum {h.total:g}")
                out.append(f"{full}_count {h.n}")
        return "\n".join(out) + "\n"
