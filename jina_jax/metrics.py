"""Counters, gauges and histograms, rendered in Prometheus' text format (version 0.0.4), for the
server's `/metrics`. Thread-safe: the HTTP loop and the batching worker both record. No
dependency: the format is a few lines of text.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self.lock = threading.Lock()

    def key(self, labels: dict) -> tuple:
        if set(labels) != set(self.label_names):
            raise ValueError(
                f"{self.name} takes labels {list(self.label_names)}, got {sorted(labels)}"
            )
        return tuple(str(labels[n]) for n in self.label_names)

    def lines(self) -> list[str]:
        raise NotImplementedError

    def render(self) -> str:
        head = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        return "\n".join(head + self.lines())


class Counter(Metric):
    kind = "counter"

    def __init__(self, name, help, labels=()):
        super().__init__(name, help, labels)
        self.values: dict[tuple, float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels):
        key = self.key(labels)
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        with self.lock:
            return self.values.get(self.key(labels), 0.0)

    def lines(self):
        with self.lock:
            items = sorted(self.values.items())
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(Metric):
    """A value read when rendered (`function`), or set."""

    kind = "gauge"

    def __init__(self, name, help, function: Callable[[], float] | None = None):
        super().__init__(name, help)
        self.function, self.current = function, 0.0

    def set(self, value: float):
        self.current = float(value)

    def value(self) -> float:
        return float(self.function()) if self.function is not None else self.current

    def lines(self):
        return [f"{self.name} {_number(self.value())}"]


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets: Sequence[float], labels=()):
        super().__init__(name, help, labels)
        self.bounds = tuple(sorted(buckets)) + (math.inf,)
        # labels -> (counts per bound, sum, count); an unlabelled one shows zeros from the start
        self.series: dict[tuple, tuple] = {} if labels else {(): ([0] * len(self.bounds), 0.0, 0)}

    def observe(self, value: float, **labels):
        key = self.key(labels)
        with self.lock:
            counts, total, n = self.series.get(key, ([0] * len(self.bounds), 0.0, 0))
            counts = [c + (value <= b) for c, b in zip(counts, self.bounds)]
            self.series[key] = (counts, total + value, n + 1)

    def count(self, **labels) -> int:
        with self.lock:
            return self.series.get(self.key(labels), (None, 0.0, 0))[2]

    def lines(self):
        out = []
        with self.lock:
            items = sorted(self.series.items())
        for key, (counts, total, n) in items:
            for bound, c in zip(self.bounds, counts):
                le = 'le="' + _number(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {c}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {n}")
        return out


_AnyMetric = TypeVar("_AnyMetric", bound=Metric)


class Registry:
    def __init__(self):
        self.metrics: list[Metric] = []

    def add(self, metric: _AnyMetric) -> _AnyMetric:
        """Registers `metric` and returns it (as the Counter, Gauge or Histogram it is)."""
        if any(m.name == metric.name for m in self.metrics):
            raise ValueError(f"metric {metric.name} is already registered")
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(m.render() for m in self.metrics) + "\n"


def parse(text: str) -> dict[str, float]:
    """Samples of a rendered registry: {'name{labels}': value} (for tests and load scripts)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
