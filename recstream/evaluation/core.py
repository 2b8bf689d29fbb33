"""Offline evaluation's shared vocabulary: a protocol's split, its queries, and what a method answers.

A `Split` is what a protocol makes of a dataset: the events a method may learn from (`train`, all
strictly before the queries they serve), the catalogue, and the queries to answer. Every method,
ours and the baselines, answers the same queries over the same item universe with the same filter
(`Query.exclude`), so their figures compare.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from schemas import Event, Product


@dataclass(frozen=True, slots=True)
class Query:
    """One recommendation to make, and the items that count as right answers."""
    qid: int
    kind: str                        # a RecommendationRequest kind: "homepage" or "cart"
    user_id: str                     # a training user, or a session standing in for one (YooChoose)
    now_s: float                     # the moment of the request: every event a method may use is before it
    history: tuple[str, ...]         # the session's items so far, oldest first (session protocol: the prefix)
    targets: frozenset[str]          # right answers
    cart: tuple[str, ...] = ()       # the basket shown ("cart" kind: frequently bought together)
    new_targets: frozenset[str] = frozenset()   # targets the user never touched in training
    exclude: frozenset[str] = frozenset()       # never recommended, by any method (the filter all share)
    apply: tuple[Event, ...] = ()    # events the online state takes in just before this query (session prefixes)
    universe: frozenset[str] | None = None      # rank only these items (new-item protocol); None: all training items


@dataclass
class Split:
    protocol: str                    # homepage | session | fbt | movielens | new_items
    dataset: str                     # what was read, for the report
    train: list[Event]               # time-ordered
    products: list[Product]          # the catalogue (may be empty: then derived from events)
    queries: list[Query]             # time-ordered
    ks: tuple[int, ...]              # cut-offs reported
    primary: str                     # the metric the bar is about, e.g. "recall@20"
    seed: int
    notes: list[str] = field(default_factory=list)   # how the split was made, in words, for the report
    held_out_items: frozenset[str] = frozenset()     # items removed from training entirely (new_items)

    @property
    def max_k(self) -> int:
        return max(self.ks)


class Method(Protocol):
    """A recommender under evaluation. `fit` sees only split.train (and the catalogue);
    `recommend` returns up to k product ids, best first, none in q.exclude, only from the training
    items (or from q.universe when it is set)."""
    name: str

    def fit(self, split: Split) -> None: ...

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]: ...
