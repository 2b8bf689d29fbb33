"""Streaming statistics (pure): a cumulative latency histogram with log-spaced buckets, a stall watch,
and the timed stages of a request path.

Cumulative like a Prometheus histogram: two snapshots subtract to the histogram of the time
between them, so a dashboard or a benchmark gets percentiles over exactly its own window.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

LOWEST_S = 1e-4     # 0.1 ms
GROWTH = 1.05       # each bucket 5% wider than the last: percentiles within 5%
BUCKETS = int(math.log(1e4 / LOWEST_S, GROWTH)) + 2  # up to ~3 hours; the last bucket takes the rest


def bucket_upper_s(i: int) -> float:
    return LOWEST_S * GROWTH ** i


def percentiles_ms(counts: list[int] | np.ndarray, qs: tuple[float, ...] = (50, 99)) -> dict[str, float]:
    """Percentiles (upper bucket bounds, never rounded down) in milliseconds; NaN when empty."""
    counts = np.asarray(counts)
    total = counts.sum()
    if total == 0:
        return {f"p{q:g}": float("nan") for q in qs}
    cumulative = np.cumsum(counts)
    return {f"p{q:g}": bucket_upper_s(int(np.searchsorted(cumulative, total * q / 100))) * 1000 for q in qs}


class LatencyHistogram:
    def __init__(self) -> None:
        self.counts = np.zeros(BUCKETS, dtype=np.int64)

    def extend(self, seconds: list[float] | np.ndarray) -> None:
        x = np.maximum(np.asarray(seconds, dtype=float), LOWEST_S)
        idx = np.minimum(np.ceil(np.log(x / LOWEST_S) / math.log(GROWTH)).astype(np.int64), BUCKETS - 1)
        np.add.at(self.counts, idx, 1)

    def add(self, seconds: float) -> None:
        self.extend([seconds])

    def __len__(self) -> int:
        return int(self.counts.sum())

    def percentiles_ms(self, qs: tuple[float, ...] = (50, 99)) -> dict[str, float]:
        return percentiles_ms(self.counts, qs)


class StallWatch:
    """Spots a partition whose processing runs ahead of a committed offset that no longer moves
    (faust-streaming can stop committing a partition after a rebalance: its tracker's #216, #532).
    Normal work commits every second, so the committed offset keeps changing."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._since: dict[int, tuple[int, float]] = {}  # partition -> (committed offset, first seen at)

    def check(self, committed: dict[int, int], processed: dict[int, int], now: float) -> list[int]:
        """Partitions stalled for longer than the timeout; `processed`: last offset processed per
        partition this worker owns, `committed`: the group's next offset to read (-1: none)."""
        stalled = []
        for p, last in processed.items():
            c = committed.get(p, -1)
            if last + 1 <= c:
                self._since.pop(p, None)
                continue
            seen = self._since.get(p)
            if seen is None or seen[0] != c:
                self._since[p] = (c, now)
            elif now - seen[1] > self.timeout_s:
                stalled.append(p)
        return stalled


class Stages:
    """The named, timed stages of one request path: `with stage("read"): ...` adds the stage's wall
    time (awaits included) to `ms[name]`, in milliseconds; debug replies carry them."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = self.clock()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (self.clock() - t0) * 1000
