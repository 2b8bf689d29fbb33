"""Offline ranking metrics: per-query Recall, NDCG, HitRate and MRR at K, catalogue coverage, 95% CIs."""
from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from recstream.evaluation.core import Query


def _hits(ranked: Sequence[Sequence[str]], relevant: Sequence[frozenset[str]], depth: int) -> np.ndarray:
    """Queries x depth booleans: is the item at rank r (0-based) relevant? Short lists pad with misses."""
    hits = np.zeros((len(ranked), depth), dtype=bool)
    for row, (items, good) in enumerate(zip(ranked, relevant)):
        for col, item in enumerate(items[:depth]):
            hits[row, col] = item in good
    return hits


def _at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Recall, NDCG (binary gains, log2 discount), HitRate and MRR at k, one value per query."""
    h = hits[:, :k]
    found = h.sum(axis=1)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (h * discount).sum(axis=1)
    ideal = np.cumsum(discount)[np.clip(np.minimum(n_relevant, k), 1, None) - 1]   # IDCG: min(|targets|, k) hits on top
    first = np.where(h.any(axis=1), h.argmax(axis=1) + 1, 0)                      # rank of the first hit, 0: none
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"recall": found / n_relevant, "ndcg": dcg / ideal, "hitrate": (found > 0).astype(float),
                "mrr": np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)}


def per_query(queries: Sequence[Query], ranked: Sequence[Sequence[str]], ks: Sequence[int]) -> dict[str, np.ndarray]:
    """name@k -> one value per query, in query order (for paired comparisons between methods).

    recall_new@k / ndcg_new@k are NaN for queries without new_targets."""
    if len(queries) != len(ranked):
        raise ValueError(f"{len(queries)} queries but {len(ranked)} ranked lists")
    for q, items in zip(queries, ranked):
        if not q.targets:
            raise ValueError(f"query {q.qid} has no targets: its recall is undefined")
        if len(set(items)) != len(items):
            raise ValueError(f"query {q.qid}: the ranked list repeats an item (it would count twice)")
    depth = max(ks)
    n_targets = np.array([len(q.targets) for q in queries], dtype=np.int64)
    n_new = np.array([len(q.new_targets) for q in queries], dtype=np.int64)
    hits = _hits(ranked, [q.targets for q in queries], depth)
    hits_new = _hits(ranked, [q.new_targets for q in queries], depth)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        for name, values in _at_k(hits, n_targets, k).items():
            out[f"{name}@{k}"] = values
        new = _at_k(hits_new, n_new, k)
        for name in ("recall", "ndcg"):
            out[f"{name}_new@{k}"] = np.where(n_new > 0, new[name], np.nan)
    return out


def coverage(ranked: Sequence[Sequence[str]], universe: Collection[str], k: int) -> float:
    """Share of the universe's items that appear in at least one top-k list."""
    if not universe:
        return 0.0
    shown = set().union(*(items[:k] for items in ranked)) if ranked else set()
    return len(shown & set(universe)) / len(universe)


def evaluate(queries: Sequence[Query], ranked: Sequence[Sequence[str]], ks: Sequence[int],
             universe: Collection[str]) -> dict[str, float]:
    """Flat name -> mean over queries, name + "_ci95" -> 1.96 * std / sqrt(n) (normal approximation),
    "queries" (n), "queries_new" (queries with new targets), and "coverage@k" (a set size, no CI).

    The _new metrics average only over queries with new targets; they are left out when there are none."""
    out: dict[str, float] = {"queries": len(queries),
                             "queries_new": sum(1 for q in queries if q.new_targets)}
    if not queries:
        return out
    for name, values in per_query(queries, ranked, ks).items():
        values = values[~np.isnan(values)]
        if values.size == 0:
            continue
        out[name] = float(values.mean())
        # sample std (ddof=1); a single query has no spread to estimate
        out[name + "_ci95"] = float(1.96 * values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0
    for k in ks:
        out[f"coverage@{k}"] = coverage(ranked, universe, k)
    return out


def set_recall(queries: Sequence[Query], sets: Sequence[Collection[str]], family: str) -> float:
    """Mean over queries of what an unordered set holds of the targets: the share of targets in it
    ("recall", "ndcg") or whether it holds any ("hitrate", "mrr"). A candidate set's recall is the
    ceiling of every ordering of it: no ranker brings in an item retrieval did not propose."""
    if len(queries) != len(sets):
        raise ValueError(f"{len(queries)} queries but {len(sets)} sets")
    if not queries:
        return 0.0
    found = np.array([len(q.targets & set(s)) for q, s in zip(queries, sets)], np.float64)
    if family in ("hitrate", "mrr"):
        return float((found > 0).mean())
    return float((found / np.array([len(q.targets) for q in queries])).mean())
