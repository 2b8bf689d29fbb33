"""Serving's pure core: merging retrieval proposals, business rules, and reasons a person can read.

No Kafka, no Redis, no model: the retrieval agent feeds `Proposals`, the ranking agent calls
`select` on the ranker's scores and `reason` for each chosen item, and the API's fallback calls
`select` on trending items. Tests drive these directly.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from schemas.recommendations import SOURCES

# When several sources proposed an item, its reason comes from the most specific one.
REASON_ORDER = ("cobuy", "covis", "knn", "session", "als", "same_brand", "same_category", "popular")
# Ranking without a model (none trained yet): a fixed preference by source, then the source's score.
HEURISTIC_WEIGHT = {"cobuy": 6.0, "covis": 5.0, "knn": 4.5, "session": 4.0, "als": 3.0, "same_brand": 2.0,
                    "same_category": 1.5, "popular": 1.0}


@dataclass
class Proposals:
    """Candidates in proposal order; each source keeps its best score per item and the anchor behind it."""
    exclude: set[str] = field(default_factory=set)
    ids: list[str] = field(default_factory=list)
    _row: dict[str, int] = field(default_factory=dict)
    scores: dict[str, dict[int, float]] = field(default_factory=dict)
    anchors: dict[str, dict[int, str]] = field(default_factory=dict)

    def add(self, product_id: str | None, source: str, score: float, anchor: str | None = None, *,
            keep_excluded: bool = False) -> None:
        """keep_excluded: propose it even if excluded (a shard's ANN answer: the merge of all shards drops
        it after taking the top k, as one index over every item would have it take a slot)."""
        self.add_all(((product_id, score),), source, anchor, keep_excluded=keep_excluded)

    def add_all(self, rows: Iterable[tuple[str | None, float]], source: str, anchor: str | None = None, *,
                keep_excluded: bool = False) -> None:
        """`add` of each (product id, score), in order (one loop: an ANN answer is a few hundred rows)."""
        if source not in SOURCES:
            return
        ids, row_of, exclude = self.ids, self._row, self.exclude
        col = self.scores.get(source) or {}
        marks = self.anchors.get(source) or {}
        for product_id, score in rows:
            if not product_id or (product_id in exclude and not keep_excluded):
                continue
            row = row_of.get(product_id)
            if row is None:
                row = row_of[product_id] = len(ids)
                ids.append(product_id)
            old = col.get(row)
            if old is None or score > old:
                col[row] = float(score)
                if anchor is not None:
                    marks[row] = anchor
        if col:   # (a source none of whose rows was kept gets no column)
            self.scores[source] = col
        if marks:
            self.anchors[source] = marks

    def __len__(self) -> int:
        return len(self.ids)

    def columns(self) -> tuple[list[str], dict[str, list[float | None]], dict[str, list[str | None]]]:
        """What CandidateSet carries: ids, and per source one score (None: not proposed) and anchor per id."""
        n = len(self.ids)
        scores = {s: list(map(col.get, range(n))) for s, col in self.scores.items()}
        anchors = {s: list(map(col.get, range(n))) for s, col in self.anchors.items()}
        return self.ids, scores, anchors


def source_matrix(n: int, scores: Mapping[str, Sequence[float]]) -> np.ndarray:
    """(n, len(SOURCES)) with NaN where a source did not propose the candidate: ranking.Columns.sources."""
    out = np.full((n, len(SOURCES)), np.nan)
    for j, s in enumerate(SOURCES):
        if s in scores:
            out[:, j] = np.asarray(scores[s], np.float64)
    return out


def heuristic_scores(sources: np.ndarray, trending: np.ndarray) -> np.ndarray:
    """Scores when no ranker is loaded: the best source's weight, then its score's place among this
    request's scores of that source (min-max, in [0.01, 0.99]: a source's own order is kept whole; a
    fixed squash such as arctan would tie every co-purchase count above ten), then trending."""
    out = np.zeros(sources.shape[0])
    for j, s in enumerate(SOURCES):
        col = sources[:, j]
        has = ~np.isnan(col)
        if not has.any():
            continue
        lo, hi = float(np.min(col[has])), float(np.max(col[has]))
        place = (np.nan_to_num(col) - lo) / (hi - lo) if hi > lo else np.full(col.shape, 0.5)
        out = np.maximum(out, np.where(has, HEURISTIC_WEIGHT[s] + 0.01 + 0.98 * place, 0.0))
    scores: np.ndarray = out + 0.001 * np.log1p(np.nan_to_num(trending))
    return scores


@dataclass(frozen=True)
class Rules:
    count: int
    max_per_category: int = 3          # 0: no cap
    exclude: frozenset[str] = frozenset()   # the product on screen, the cart, recent purchases


def primary(kind: str, scores: Mapping[str, Sequence[float]], categories: Sequence[str | None],
            category: str | None) -> np.ndarray | None:
    """Rows that carry the widget's promise and go before all others: "customers also viewed" shows
    co-viewed items, "frequently bought together" co-purchased ones, "similar" stays in the product's
    category; the rest only fill up. None: no tier (homepage)."""
    n = len(categories)
    if kind in ("also_viewed", "cart"):
        col = scores.get("covis" if kind == "also_viewed" else "cobuy")
        return ~np.isnan(np.asarray(col, np.float64)) if col is not None else np.zeros(n, bool)
    if kind == "similar" and category:
        return np.array([c == category for c in categories], bool)
    return None


def select(ids: Sequence[str], scores: npt.ArrayLike, categories: Sequence[str | None], in_stock: Sequence[bool],
           rules: Rules, first: np.ndarray | None = None) -> list[int]:
    """Rows to return, best first (rows in `first` before the others): out-of-stock, excluded and
    repeated ids dropped; at most `max_per_category` per category while others are left (when too
    few are, the cap gives way rather than return fewer than `count`)."""
    key = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    order = np.argsort(-key, kind="stable")
    if first is not None:
        order = order[np.argsort(~np.asarray(first, bool)[order], kind="stable")]
    seen: set[str] = set()
    eligible = []
    for i in order:
        pid = ids[i]
        if pid in seen or pid in rules.exclude or not in_stock[i]:
            continue
        seen.add(pid)
        eligible.append(int(i))
    if not rules.max_per_category or first is not None:   # a widget about one product: no category cap
        return eligible[: rules.count]
    chosen: list[int] = []
    held: list[int] = []
    per_cat: dict[str | None, int] = {}
    for i in eligible:
        c = categories[i]
        if c is not None and per_cat.get(c, 0) >= rules.max_per_category:
            held.append(i)
            continue
        per_cat[c] = per_cat.get(c, 0) + 1
        chosen.append(i)
        if len(chosen) == rules.count:
            return chosen
    return chosen + held[: rules.count - len(chosen)]   # diversity gives way to filling the list


PROMISE = {"also_viewed": "covis", "cart": "cobuy"}   # the source a widget is named after


def best_source(row: int, scores: Mapping[str, Sequence[float]], kind: str | None = None) -> str | None:
    """The source the item's reason cites: the widget's own when it proposed the item, else the most specific."""
    order = (PROMISE[kind], *REASON_ORDER) if kind in PROMISE else REASON_ORDER
    for s in order:
        col = scores.get(s)
        if col is not None and not math.isnan(col[row]):
            return s
    return None


def _plural(n: float, word: str) -> str:
    k = max(1, int(round(n)))
    return f"{k} {word}{'' if k == 1 else 's'}"


def reason(source: str | None, *, kind: str, anchor_title: str | None = None, score: float = math.nan,
           category: str | None = None, brand: str | None = None, query_source: str = "none") -> str:
    """A sentence for the shopper: which signal proposed the item, and through what."""
    x = f"“{anchor_title}”" if anchor_title else "an item you viewed"
    if source == "cobuy":
        return f"bought together with {x} in {_plural(score, 'order')}" if score >= 1 else f"often bought with {x}"
    if source == "covis":
        return f"customers who viewed {x} also viewed this" + (f" ({_plural(score, 'time')})" if score >= 1 else "")
    if source == "knn":
        return f"often in the same visits as {x}"
    if source == "session":
        return "you viewed this recently"
    if source == "als":
        if kind in ("similar", "also_viewed"):
            return f"similar to {x}"
        if kind == "cart":
            return f"goes with {x} in your cart"
        if query_source == "session":
            return f"similar to {x} you viewed"
        return "picked for you from your shopping history"
    if source == "same_brand" and brand:
        return f"more from {brand}"
    if source == "same_category" and category:
        return f"popular in {category}"
    return f"trending in {category}" if category else "trending now"
