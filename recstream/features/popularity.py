"""Item popularity: per-day counts (windowed, log-scaled at read) and trending by forward decay.

Trending uses forward decay (Cormode, Shkapenyuk, Srivastava, Xu, "Forward Decay: A Practical Time
Decay Model for Streaming Systems", ICDE 2009): an event of weight w at time t adds
w * 2^((t - L) / half_life) for a landmark L, so scores are only ever incremented; dividing by
2^((now - L) / half_life) at read gives the decayed score. The landmark moves every week (a new
key) so the exponent stays small; a reader merges the current and previous week.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from recstream.features import keys

DAY_S = 86_400
LANDMARK_PERIOD_S = 7 * DAY_S


def day(ts: float) -> int:
    return int(ts // DAY_S)


def count_key(kind: str, d: int) -> str:
    """Events of one type per product on one UTC day: a sorted set, product -> count."""
    return keys.popularity(kind, d)


def category_key(category: str, d: int) -> str:
    """Weighted events per product within a category on one UTC day."""
    return keys.category_popularity(category, d)


def expires_at(d: int, window_days: int) -> int:
    """A day's counts are dropped once no window can include them (Unix s)."""
    return (d + window_days + 1) * DAY_S


def window_days(now: float, window: int) -> list[int]:
    today = day(now)
    return [today - i for i in range(window)]


def log_scaled(count: float) -> float:
    """The ranker's popularity feature: log(1 + 7-day count), so one hit does not dwarf the rest."""
    return math.log1p(max(count, 0.0))


def landmark(ts: float) -> int:
    return int(ts // LANDMARK_PERIOD_S) * LANDMARK_PERIOD_S


def trend_key(lm: int, category: str | None = None) -> str:
    return keys.trend(lm, category)


def trend_increment(weight: float, ts: float, half_life_s: float) -> float:
    return weight * float(2.0 ** ((ts - landmark(ts)) / half_life_s))   # float ** float is typed Any


def trend_read_weights(now: float, half_life_s: float) -> dict[int, float]:
    """Per landmark, the factor that turns a stored score into its value decayed to `now`."""
    current = landmark(now)
    previous = current - LANDMARK_PERIOD_S
    return {lm: 2.0 ** (-(now - lm) / half_life_s) for lm in (current, previous)}


def merge_trend(lists: Iterable[tuple[float, Iterable[tuple[str, float]]]], n: int) -> list[tuple[str, float]]:
    """The best n of the landmarks' lists, each (weight from trend_read_weights, its (product, stored score)
    rows): a product's scores times their weights, summed; ties in first-seen order."""
    acc: dict[str, float] = {}
    for w, rows in lists:
        for m, sc in rows:
            acc[m] = acc.get(m, 0.0) + sc * w
    return sorted(acc.items(), key=lambda x: -x[1])[:n]


def trend_expires_at(lm: int) -> int:
    return lm + 2 * LANDMARK_PERIOD_S
