"""Small streaming statistics: a sliding window of latencies with percentiles (pure)."""
from __future__ import annotations

from collections import deque

import numpy as np


class LatencyWindow:
    """The last `size` observations (seconds); percentiles in milliseconds."""

    def __init__(self, size: int = 50_000):
        self._values: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def extend(self, seconds: list[float]) -> None:
        self._values.extend(seconds)

    def __len__(self) -> int:
        return len(self._values)

    def percentiles_ms(self, qs: tuple[float, ...] = (50, 99)) -> dict[str, float]:
        if not self._values:
            return {f"p{q:g}": float("nan") for q in qs}
        values = np.percentile(np.fromiter(self._values, float), qs) * 1000
        return {f"p{q:g}": float(v) for q, v in zip(qs, values)}

    def clear(self) -> None:
        self._values.clear()
