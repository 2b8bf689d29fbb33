"""The candidate stage (pure), written once: a request and what the stores hold -> the candidate set.

Sources (schemas.recommendations.SOURCES): on the homepage, the session's recent items themselves,
then the user's items of earlier sessions ("session": shoppers come back to what they looked at);
co-view ("covis") and co-purchase ("cobuy") neighbours of the session's, cart's and this session's
basket items, or of the product's or cart's items, as the feature agents count them live; item kNN ("knn":
the served version's item-to-item
cosine over training sessions, every event type, summed over the anchors as item kNN does: the
session's last items of any event type, weighted 1/position); trending in the session's main
category ("popular"; homepage and cart) or in the anchors' categories ("same_category"); the
product's brand ("same_brand", similar); and the nearest items of the model's vectors ("als", FAISS
at serving), queried with the user's ALS vector, else the mean vector of the session's last 5 items
(the design's cold-start proxy), else the product on screen or the cart's mean.

Two steps around one round trip to the store: `plan` says what to read (neighbour lists, trending
lists, a brand's list), `propose` turns the answers into the proposals. The retrieval agent answers
the reads from Redis (streams.online_store.RedisStore.candidate_reads), the "knn" reads from the
version it serves (`ItemLists`) and the ANN query with FAISS; the ranker's example builder answers
them from the history it replays and the lists of a batch run that never saw its targets
(batch.ranker.ReplayState). So the ranker trains on the candidates serving proposes: one function,
two stores.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from recstream.features.session import UserState
from recstream.ranking import main_category
from recstream.rules import Proposals

SESSION_PROXY_ITEMS = 5     # the design: a user without an embedding is the mean of their last 5 viewed
ANCHORS = 5                 # session, cart or basket items whose neighbours are proposed
SESSION_ITEMS = 20          # the session's recent items proposed again on the homepage (score 1 / position)
HISTORY_ITEMS = 30          # ... then the user's own items of earlier sessions (re-engagement)
NEIGHBOURS = 10             # per anchor on the homepage; per kind below for product pages and the cart
POPULAR = 20                # trending items proposed
BRAND = 10
MODEL_TABLES = ("knn",)     # lists the served version carries, not the online store
# (cobuy, covis) neighbours per anchor of the widgets about products
PRODUCT_NEIGHBOURS = {"cart": (50, 20), "also_viewed": (NEIGHBOURS, 100), "similar": (NEIGHBOURS, NEIGHBOURS)}


class Widget(Protocol):
    """What the candidate stage reads of a request (schemas.RecommendationRequest has it): read-only, as
    the frozen records that implement it are."""
    @property
    def kind(self) -> str: ...
    @property
    def product_id(self) -> str | None: ...
    @property
    def cart_items(self) -> tuple[str, ...]: ...
    @property
    def on_screen(self) -> frozenset[str]: ...


@dataclass(frozen=True, slots=True)
class Ask:
    """A request the trainer replays (a Widget): the homepage, or the cart widget over a basket."""
    kind: str
    product_id: str | None = None
    cart_items: tuple[str, ...] = ()

    @property
    def on_screen(self) -> frozenset[str]:
        return frozenset([self.product_id] if self.product_id else self.cart_items)


def is_live(last_s: float, events: int, now: float, idle_s: float) -> bool:
    """A session is live until it has been idle `idle_s` (Redis expires user_session then)."""
    return events > 0 and now - last_s <= idle_s


@dataclass(frozen=True, slots=True)
class Shopper:
    """What retrieval knows of the shopper at the request's moment: `recent` (viewed, newest first),
    `touched` (any event), the session's category counts and `basket` (bought this session) belong to
    a live session and are empty once it idled out; the cart and `history` (any event, any session)
    outlive sessions."""
    recent: tuple[str, ...] = ()
    categories: Mapping[str, int] = field(default_factory=dict)
    cart: tuple[str, ...] = ()
    basket: tuple[str, ...] = ()
    touched: tuple[str, ...] = ()      # the session's items of every event type, newest first
    history: tuple[str, ...] = ()      # the user's items of every event type across sessions, newest first

    @classmethod
    def from_state(cls, state: UserState, now: float, idle_s: float) -> Shopper:
        """From the session table's value (the batch replay)."""
        if not is_live(state.last_s, state.events, now, idle_s):
            return cls(cart=tuple(state.cart), history=tuple(state.history))
        return cls(tuple(state.recent), dict(state.categories), tuple(state.cart), tuple(state.session_purchases),
                   tuple(state.touched), tuple(state.history))

    @classmethod
    def from_redis(cls, recent: Sequence[str] | None, features: Mapping[str, Any] | None, now: float,
                   idle_s: float) -> Shopper:
        """From user_session and decode_features(user_features) (serving); None: the key is absent."""
        f = features or {}
        cart, history = tuple(f.get("cart_items") or ()), tuple(f.get("history") or ())
        if not is_live(float(f.get("last_event_s") or 0.0), int(f.get("events") or 0), now, idle_s):
            return cls(cart=cart, history=history)
        return cls(tuple(recent or ()), dict(f.get("session_categories") or {}), cart,
                   tuple(f.get("session_purchases") or ()), tuple(f.get("session_items") or ()), history)


@dataclass(frozen=True, slots=True)
class Read:
    """One list the stage needs: `table` 'covis' or 'cobuy' (neighbours of the item `key`), 'trend'
    (trending in the category `key`, None: overall) or 'brand' (the brand `key`'s items); its best `n`
    entries as (product id, score), best first, become `source` proposals anchored at `key`; 'knn' (the
    version's item kNN lists, `ItemLists`): an item's score is the sum over the anchors of `weight` x
    its score in the anchor's list."""
    source: str
    table: str
    key: str | None
    n: int
    weight: float = 1.0


def anchors(w: Widget) -> list[str]:
    """The items a product page's or cart's lists are read for."""
    return [w.product_id] if w.product_id else list(w.cart_items[:ANCHORS])


def plan(w: Widget, shopper: Shopper, anchor_items: Sequence[Mapping[str, str]],
         sources: Collection[str], knn: int = 20) -> list[Read]:
    """What to read for a request: `anchor_items` are the anchors' item_features ({} where unknown),
    `sources` those this process proposes (an A/B variant's, or ANN only on shards but the first),
    `knn` the item-kNN neighbours per anchor (RECSTREAM_KNN_PER_ANCHOR)."""
    reads: list[Read] = []

    def read(source: str, table: str, key: str | None, n: int, weight: float = 1.0) -> None:
        if source in sources:
            reads.append(Read(source, table, key, n, weight))

    recent = shopper.recent[:ANCHORS]
    main = main_category(shopper.categories) if recent else None
    if w.kind == "homepage":
        # what the shopper did last, of any kind, in this session (anchoring an arriving shopper's at their
        # earlier sessions' items was tried: neutral on the homepage's validation split, 0.1091 both, and
        # 0.1151 -> 0.0880 on the regression gate's small models; bench/RESULTS.md)
        for i, a in enumerate(shopper.touched[:ANCHORS]):
            read("knn", "knn", a, knn, 1.0 / (i + 1))
        for a in recent:
            read("covis", "covis", a, NEIGHBOURS)
        for a in dict.fromkeys((*recent, *shopper.cart[:ANCHORS], *shopper.basket[:ANCHORS])):
            read("cobuy", "cobuy", a, NEIGHBOURS)
        read("popular", "trend", main, POPULAR)
        return reads
    cobuy, covis = PRODUCT_NEIGHBOURS[w.kind]
    for a in anchors(w):
        read("cobuy", "cobuy", a, cobuy)
        read("covis", "covis", a, covis)
        read("knn", "knn", a, knn)
    categories = [it["category"] for it in anchor_items if it.get("category")]
    for c in dict.fromkeys(categories[:2]):
        read("same_category", "trend", c, POPULAR // 2 if w.kind == "cart" else POPULAR)
    if w.kind == "cart":   # staples: what the ranker learned to weigh against the basket's neighbours
        read("popular", "trend", main, POPULAR)
    brand = next((it["brand"] for it in anchor_items if it.get("brand") not in (None, "", "unknown")), None)
    if brand and w.kind == "similar":
        read("same_brand", "brand", brand, BRAND)
    return reads


def propose(w: Widget, shopper: Shopper, reads: Sequence[Read], answers: Sequence[Sequence[tuple[str, float]]],
            sources: Collection[str]) -> Proposals:
    """The proposals of every source but ANN (`add_ann` adds those), the request's on-screen items excluded."""
    out = Proposals(exclude=set(w.on_screen))
    if w.kind == "homepage" and "session" in sources:   # this session's views first, then the user's history
        own = dict.fromkeys((*shopper.recent[:SESSION_ITEMS], *shopper.history[:HISTORY_ITEMS]))
        out.add_all([(pid, 1.0 / (i + 1)) for i, pid in enumerate(own)], "session")
    summed: dict[str, list[Any]] = {}   # item kNN: product -> [sum, best part, its anchor]
    for rd, rows in zip(reads, answers, strict=True):
        if rd.table != "knn":
            out.add_all(rows, rd.source, rd.key)
            continue
        for pid, score in rows:
            part = rd.weight * score
            acc = summed.setdefault(pid, [0.0, -np.inf, None])
            acc[0] += part
            if part > acc[1]:
                acc[1:] = part, rd.key
    for pid, (total, _, anchor) in summed.items():
        out.add(pid, "knn", total, anchor)
    return out


class ItemLists:
    """Per item its neighbours, best first, as a served version carries them (the batch job's item kNN):
    neighbour rows and scores back to back in two arrays, a span per item, so a catalogue's lists
    cost 12 bytes a neighbour rather than two Python objects."""

    def __init__(self, neighbours: Mapping[str, Sequence[tuple[str, float]]]):
        self._build([a for a, ns in neighbours.items() for _ in ns], [b for ns in neighbours.values() for b, _ in ns],
                    [float(sc) for ns in neighbours.values() for _, sc in ns])

    @classmethod
    def from_columns(cls, items: Sequence[str], neighbours: Sequence[str], scores: Sequence[float]) -> ItemLists:
        """From rows (item, neighbour, score) grouped by item, each item's best first (a saved table's
        columns), without a dict of lists in between."""
        out = cls.__new__(cls)
        out._build(items, neighbours, scores)
        return out

    def _build(self, items: Sequence[str], neighbours: Sequence[str], scores: Sequence[float]) -> None:
        self.ids = list(dict.fromkeys([*items, *neighbours]))
        row = {x: i for i, x in enumerate(self.ids)}
        self._rows = np.fromiter((row[b] for b in neighbours), np.int32, len(neighbours))
        self._scores = np.asarray(scores, np.float64)
        self._span: dict[str, tuple[int, int]] = {}
        for i, a in enumerate(items):   # rows of one item are contiguous
            lo = self._span[a][0] if a in self._span else i
            self._span[a] = (lo, i + 1)

    def __len__(self) -> int:
        return len(self._span)

    def get(self, item: str | None, n: int) -> list[tuple[str, float]]:
        """The item's best n neighbours as (product id, score); [] for an item without a list."""
        lo, hi = self._span.get(item, (0, 0)) if item is not None else (0, 0)
        hi = min(hi, lo + n)
        return [(self.ids[j], sc) for j, sc in zip(self._rows[lo:hi].tolist(), self._scores[lo:hi].tolist())]


def answer(reads: Sequence[Read], store_answers: Sequence[Sequence[tuple[str, float]]],
           lists: ItemLists | None) -> list[Sequence[tuple[str, float]]]:
    """Every read's answer: the store's (given for the reads not in MODEL_TABLES, in order) and the
    version's lists' (none without a version)."""
    got = iter(store_answers)
    out = [(lists.get(rd.key, rd.n) if lists is not None else []) if rd.table in MODEL_TABLES else next(got)
           for rd in reads]
    if next(got, None) is not None:
        raise ValueError("more store answers than store reads")
    return out


@dataclass(frozen=True, slots=True)
class Query:
    """The ANN query of a request and the vector the ranker scores "user x item" with."""
    vector: np.ndarray | None = None
    source: str = "none"                  # schemas QUERY_SOURCES: user, session, product, cart, none
    anchor: str | None = None             # the item the query stands for (reasons)
    rank_vector: np.ndarray | None = None
    rank_source: str = "none"


def query(w: Widget, shopper: Shopper, user: np.ndarray | None,
          item_vector: Callable[[str], np.ndarray | None]) -> Query:
    """`user`: the user's ALS vector (None: unknown); `item_vector(id)`: an item's vector or None."""
    vector, source, anchor = None, "none", None
    if w.kind == "homepage":
        if user is not None:
            vector, source = user, "user"
        else:
            recent = shopper.recent[:SESSION_PROXY_ITEMS]
            vecs = [v for v in (item_vector(x) for x in recent) if v is not None]
            if vecs:
                vector, source, anchor = np.mean(vecs, axis=0), "session", recent[0]
    else:
        ids = anchors(w)
        vecs = [v for v in (item_vector(x) for x in ids) if v is not None]
        if vecs:
            vector = vecs[0] if w.kind != "cart" else np.mean(vecs, axis=0)
            source, anchor = ("product" if w.kind != "cart" else "cart"), ids[0]
    if user is not None:
        return Query(vector, source, anchor, user, "user")
    return Query(vector, source, anchor, vector, source)


def add_ann(proposals: Proposals, found: Sequence[tuple[str, float]], anchor: str | None, keep_excluded: bool = False) -> None:
    """The ANN answer (best first) as "als" proposals; keep_excluded: a shard's answer (see Proposals.add)."""
    proposals.add_all(found, "als", anchor, keep_excluded=keep_excluded)
