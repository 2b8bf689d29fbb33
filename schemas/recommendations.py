"""Recommendation messages: request (API -> retrieval), candidate set (retrieval -> ranking) and
reply (ranking -> the asking API process's reply topic)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import NoneType
from typing import Any

from schemas.base import Choice, Flag, Id, Invalid, ListOf, Nested, Number, NumMap, Record, StrMap, Text, Timestamp, check

KINDS = ("homepage", "similar", "cart", "also_viewed")
MAX_COUNT = 100
MAX_CANDIDATES = 2000
QUERY_SOURCES = ("user", "session", "product", "cart", "none")
# retrieval sources, in the order of the ranker's source features
SOURCES = ("als", "covis", "cobuy", "same_category", "same_brand", "session", "popular", "knn")


@dataclass(frozen=True, slots=True, kw_only=True)
class Overrides(Record):
    """Serving configuration a request runs with, where it differs from the agents' settings: the
    experiments file's defaults merged with the changes of the variants the request was assigned."""
    SCHEMA = "serving overrides"

    sources: tuple[str, ...] | None = check(ListOf(Choice(SOURCES), max_items=len(SOURCES), min_items=1), default=None,
                                            doc="retrieval sources used (absent: all)")
    ranker: str | None = check(Text(max_len=64), default=None,
                               doc="MLflow version number or alias whose ranker scores (absent: the serving version's)")
    candidates: int | None = check(Number(lo=1, hi=MAX_CANDIDATES, integer=True), default=None,
                                   doc="ANN candidates retrieval proposes (absent: retrieval_candidates)")
    max_per_category: int | None = check(Number(lo=0, hi=1000, integer=True), default=None,
                                         doc="diversity cap per category, 0 = none (absent: max_per_category)")
    exclude_purchased: bool | None = check(Flag(), default=None,
                                           doc="drop what the user recently bought (absent: exclude_purchased)")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecommendationRequest(Record):
    SCHEMA = "recommendation request"

    request_id: str = check(Text(max_len=64), doc="unique id; the reply carries it and events cite it (impression id)")
    kind: str = check(Choice(KINDS), doc="homepage, similar, cart or also_viewed")
    created_at: float = check(Timestamp(), doc="when the caller sent it, Unix seconds")
    user_id: str | None = check(Id(), default=None, doc="shopper id; absent for anonymous homepage")
    session_id: str | None = check(Id(), default=None, doc="current session id")
    product_id: str | None = check(Id(), default=None, doc="the product on screen (similar, also_viewed)")
    cart_items: tuple[str, ...] = check(ListOf(Id(), max_items=100), default=(), doc="product ids in the cart (cart)")
    count: int = check(Number(lo=1, hi=MAX_COUNT, integer=True), default=8, doc=f"items wanted, 1-{MAX_COUNT}")
    context: dict[str, str] | None = check(StrMap(), default=None, doc="device, page, category and other request context")
    deadline_ms: int = check(Number(lo=1, hi=10_000, integer=True), default=50, doc="answer within this budget (milliseconds)")
    reply_to: str | None = check(Text(), default=None, doc="topic the ranking agent sends the reply to (one per API process)")
    experiments: dict[str, str] | None = check(StrMap(), default=None, doc="A/B: experiment id -> assigned variant")
    overrides: Overrides | None = check(Nested(Overrides), default=None,
                                        doc="serving configuration of the assigned variants and the experiments file's defaults")
    debug: bool = check(Flag(), default=False, doc="reply with per-stage timings and the session the ranker saw")

    def validate(self) -> None:
        if self.kind in ("similar", "also_viewed") and not self.product_id:
            raise Invalid(f"product_id: is required for kind {self.kind}")
        if self.kind == "cart" and not self.cart_items:
            raise Invalid("cart_items: needs at least 1 item for kind cart")

    @property
    def key(self) -> bytes:
        return (self.user_id or self.product_id or self.request_id).encode()

    @property
    def on_screen(self) -> frozenset[str]:
        """The products the request is about (the product page's, else the cart's): never candidates."""
        return frozenset([self.product_id] if self.product_id else self.cart_items)

    def ctx(self, name: str, default: str = "unknown") -> str:
        return (self.context or {}).get(name) or default

    def expired(self, now: float, reserve_ms: float = 0.0) -> bool:
        """Past its deadline, or with less than `reserve_ms` of it left."""
        return now > self.created_at + (self.deadline_ms - reserve_ms) / 1000


@dataclass(frozen=True, slots=True)
class FloatColumn:
    """A list of numbers or nulls, one per candidate, checked in one pass (a Number() per cell cost ms)."""
    max_items: int = MAX_CANDIDATES

    def __call__(self, v: Any, now: float) -> tuple[float, ...]:
        if not isinstance(v, list) or len(v) > self.max_items:
            raise Invalid(f"expected a list of at most {self.max_items} numbers")
        kinds = set(map(type, v))   # (types in C: a loop over ~230 cells in Python cost more than the parse)
        if not kinds <= _NUMBER_CELL:
            i = next(i for i, x in enumerate(v) if type(x) not in _NUMBER_CELL)
            raise Invalid(f"item {i}: expected a number or null, got {type(v[i]).__name__}")
        return tuple([math.nan if x is None else x for x in v]) if NoneType in kinds else tuple(v)


_NUMBER_CELL = frozenset((float, int, NoneType))


@dataclass(frozen=True, slots=True)
class Columns:
    """{name: column}: per-candidate values of each retrieval source."""
    column: Any
    max_keys: int = 16

    def __call__(self, v: Any, now: float) -> dict[str, tuple[Any, ...]]:
        if not isinstance(v, dict) or len(v) > self.max_keys:
            raise Invalid(f"expected an object of at most {self.max_keys} columns")
        out = {}
        for k, col in v.items():
            try:
                out[Text()(k, now)] = self.column(col, now)
            except Invalid as exc:
                raise Invalid(f"{k}: {exc}") from None
        return out


@dataclass(frozen=True, slots=True)
class TextColumn:
    max_items: int = MAX_CANDIDATES
    nullable: bool = True          # False: every item a non-empty string (product ids)

    def __call__(self, v: Any, now: float) -> tuple[str | None, ...]:
        if not isinstance(v, list) or len(v) > self.max_items:
            raise Invalid(f"expected a list of at most {self.max_items} strings")
        allowed = _TEXT_CELL if self.nullable else _ID_CELL
        if not set(map(type, v)) <= allowed:
            i = next(i for i, x in enumerate(v) if type(x) not in allowed)
            what = "a string or null" if self.nullable else "a string"
            raise Invalid(f"item {i}: expected {what}, got {type(v[i]).__name__}")
        if not self.nullable and "" in v:
            raise Invalid(f"item {v.index('')}: must not be empty")
        return tuple(v)


_ID_CELL, _TEXT_CELL = frozenset((str,)), frozenset((str, NoneType))


@dataclass(frozen=True, slots=True, kw_only=True)
class CandidateSet(Record):
    """Retrieval's answer, column-wise: candidate i is product_ids[i]; scores[source][i] is that source's
    score for it (null: the source did not propose it) and anchors[source][i] the item or category it
    came through (the "X" of "bought together with X")."""
    SCHEMA = "candidate set"

    request: RecommendationRequest = check(Nested(RecommendationRequest), doc="the request being answered")
    model_version: str = check(Text(max_len=64), doc="model version whose embeddings retrieved them ('none': rules only)")
    query_source: str = check(Choice(QUERY_SOURCES), doc="what the ranker's query vector is: the user's ALS vector, "
                                                         "the session's mean, the product's, the cart's mean, or none")
    query: tuple[float, ...] = check(FloatColumn(max_items=4096), default=(), doc="the query vector (empty: none)")
    product_ids: tuple[str, ...] = check(TextColumn(nullable=False), doc="candidates, in retrieval order")
    scores: dict[str, tuple[float, ...]] = check(Columns(FloatColumn()), doc="source -> score per candidate (null: not proposed)")
    anchors: dict[str, tuple[str | None, ...]] = check(Columns(TextColumn()), doc="source -> anchor per candidate")
    timings_ms: dict[str, float] | None = check(NumMap(), default=None, doc="time per stage so far (milliseconds)")
    shard: int = check(Number(lo=0, hi=1023, integer=True), default=0,
                       doc="the index shard that answered (shard 0 also carries every source but ANN)")
    shards: int = check(Number(lo=1, hi=1024, integer=True), default=1,
                        doc="shards the request went to: ranking merges this many sets (1: a whole answer)")

    def validate(self) -> None:
        n = len(self.product_ids)
        if self.shard >= self.shards:
            raise Invalid(f"shard: {self.shard} of {self.shards} shards (0 to {self.shards - 1})")
        for name, cols in (("scores", self.scores), ("anchors", self.anchors)):
            for k, col in cols.items():
                if len(col) != n:
                    raise Invalid(f"{name}: column {k} has {len(col)} values for {n} candidates")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecommendedItem(Record):
    SCHEMA = "recommended item"

    product_id: str = check(Text(), doc="recommended product")
    score: float = check(Number(), doc="ranker score (higher is better)")
    reason: str = check(Text(max_len=200), doc="why, for a person: 'bought together with X in 12 orders'")
    source: str = check(Text(max_len=32), default="popular", doc="the retrieval source behind the reason")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecommendationReply(Record):
    SCHEMA = "recommendation reply"

    request_id: str = check(Text(max_len=64), doc="the request answered: the impression id events cite")
    kind: str = check(Choice(KINDS), doc="kind of the request")
    items: tuple[RecommendedItem, ...] = check(ListOf(Nested(RecommendedItem), max_items=MAX_COUNT), doc="best first")
    model_version: str = check(Text(max_len=64), default="none", doc="registered model version that ranked them")
    experiments: dict[str, str] | None = check(StrMap(), default=None, doc="A/B: experiment id -> variant served")
    fallback: bool = check(Flag(), default=False, doc="true when served by the popularity fallback")
    cached: bool = check(Flag(), default=False, doc="true when served from the homepage cache")
    timings_ms: dict[str, float] | None = check(NumMap(), default=None, doc="time per stage (milliseconds), with debug")
    session_recent: tuple[str, ...] | None = check(ListOf(Text(), max_items=100), default=None,
                                                   doc="the session's recent products the ranker saw, with debug")
    error: str | None = check(Text(max_len=512), default=None, doc="why the primary path failed, if it did")
