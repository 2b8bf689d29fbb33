"""Ranking features (pure): one request's context and candidates -> the matrix the XGBoost ranker scores.

The batch trainer and the online ranking agent both call `matrix`, so what the ranker learned on is
what it is served (Metarank's rule: one read half, offline and online). Inputs are plain values in
the shapes the online store serves them: the session as `decode_features()` returns it (or the
`UserState` the batch replay holds), item fields as Redis `item_features` holds them. Missing
values are NaN, which XGBoost routes down each split's learned default branch.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recstream.features.session import UserState
from schemas import Product
from schemas.events import DEVICES
from schemas.recommendations import SOURCES

NAN = float("nan")
DAY_S = 86_400.0
WEEK_DAYS = 7
PAGES = ("home", "product", "category", "search", "cart", "checkout")   # anything else is "other"
_SOURCE_INDEX = {s: j for j, s in enumerate(SOURCES)}

FEATURE_NAMES: tuple[str, ...] = (
    # user x item, from the ALS embeddings
    "ui_dot", "ui_cosine", "ui_dot_gap_to_best", "ui_dot_rank_pct", "user_embedding_norm", "item_embedding_norm",
    # price
    "price", "log_price", "price_ratio", "log_price_ratio", "price_vs_candidates", "user_median_price",
    # category affinity (offline aggregate)
    "category_match", "is_top_affinity_category", "user_top_affinity", "user_affinity_categories",
    # popularity
    "log_popularity_7d", "log_purchases_7d", "purchase_rate_7d", "log_trending", "popularity_rank_pct",
    "log_popularity_window",
    # item
    "rating", "seller_rating", "in_stock", "item_age_days", "log_item_age_days",
    # real-time session
    "session_live", "session_category_views", "session_category_share", "is_session_main_category",
    "session_views", "session_categories", "session_recent_len", "in_recent", "recent_position",
    "is_last_viewed", "in_cart", "cart_size", "purchased_before", "purchases_count", "log_user_events",
    "log_since_last_event_s",
    # request time (UTC), cyclical
    "hour_sin", "hour_cos", "dow_sin", "dow_cos",
    # request device and page, one-hot
    *(f"device_{d}" for d in DEVICES), *(f"page_{p}" for p in (*PAGES, "other")),
    # retrieval sources
    *(f"source_{s}" for s in SOURCES), *(f"score_{s}" for s in SOURCES), "n_sources",
)


# -- inputs ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ItemFields:
    """The item_features:{id} fields the ranker reads (NaN where unknown)."""
    price: float = NAN
    category: str | None = None
    brand: str | None = None
    rating: float = NAN
    seller_rating: float = NAN
    in_stock: float = NAN
    created_at: float = NAN

    @classmethod
    def from_product(cls, p: Product) -> ItemFields:
        return cls(price=float(p.price), category=p.category, brand=p.brand,
                   rating=NAN if p.rating is None else float(p.rating),
                   seller_rating=NAN if p.seller_rating is None else float(p.seller_rating),
                   in_stock=1.0 if p.in_stock else 0.0, created_at=float(p.created_at))

    @classmethod
    def from_redis(cls, raw: Mapping[str, str] | Mapping[bytes, bytes]) -> ItemFields:
        """From the hash streams.online_store.item_fields writes (bytes or str, as the client returns)."""
        d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in raw.items()}

        def num(name: str) -> float:
            v = d.get(name, "")
            return float(v) if v != "" else NAN

        stock = d.get("in_stock", "")
        return cls(price=num("price"), category=d.get("category") or None, brand=d.get("brand") or None,
                   rating=num("rating"), seller_rating=num("seller_rating"),
                   in_stock=NAN if stock == "" else float(stock == "1"), created_at=num("created_at"))


@dataclass(frozen=True, slots=True)
class Candidate:
    """One candidate as the ranking agent assembles it from retrieval and Redis."""
    product_id: str
    embedding: np.ndarray | None = None      # ALS item vector
    item: ItemFields | None = None           # None: no item_features hash
    popularity_7d: float = NAN               # views + clicks over the popularity window (pop:view, pop:click)
    purchases_7d: float = NAN                # purchases over the same window (pop:purchase)
    trending: float = NAN                    # forward-decayed weight at request time (trend:*)
    sources: Mapping[str, float] = field(default_factory=dict)  # retrieval source -> its score; unknown names ignored
    popularity_window: float = NAN           # weighted events over the model's training window (the version's)


@dataclass(frozen=True, slots=True)
class Context:
    """Everything about the request that is not per candidate."""
    now_s: float                                          # request time, Unix s
    user_embedding: np.ndarray | None = None              # ALS user vector; None for unknown users
    session: UserState | Mapping[str, Any] | None = None  # UserState, or decode_features() of user_features:{id}
    recent: Sequence[str] | None = None                   # user_session:{id} (with the decoded hash); None: expired
    category_affinity: Mapping[str, float] = field(default_factory=dict)  # offline: category -> weight
    median_price: float | None = None                     # offline: median purchase unit price
    device: str = "unknown"
    page: str = "unknown"
    session_idle_timeout_s: float = 1800.0


@dataclass(frozen=True, slots=True)
class SessionView:
    """The session as both stores hold it; `recent` and `categories` are empty once the session idled out
    (Redis expires user_session after the idle timeout, so the batch replay must forget it too)."""
    live: bool = False
    recent: tuple[str, ...] = ()
    categories: Mapping[str, int] = field(default_factory=dict)
    cart: tuple[str, ...] = ()
    purchases: tuple[str, ...] = ()
    last_viewed: str | None = None
    last_event_s: float | None = None
    events: int = 0


def session_view(ctx: Context) -> SessionView:
    s = ctx.session
    if s is None:
        return SessionView()
    recent: Sequence[str]
    if isinstance(s, UserState):
        recent, cats, cart, bought = s.recent, s.categories, s.cart, s.purchases
        last_viewed, last_s, events = s.last_viewed, s.last_s, s.events
    else:
        recent = ctx.recent or ()
        cats, cart, bought = s.get("session_categories") or {}, s.get("cart_items") or (), s.get("purchases") or ()
        last_viewed, last_s = s.get("last_viewed"), float(s.get("last_event_s") or 0.0)
        events = int(s.get("events") or 0)
    last = last_s if events > 0 else None
    live = last is not None and ctx.now_s - last <= ctx.session_idle_timeout_s
    return SessionView(live, tuple(recent) if live else (), dict(cats) if live else {}, tuple(cart), tuple(bought),
                       last_viewed, last, events)


def main_category(categories: Mapping[str, int]) -> str | None:
    """The session's most viewed category; ties go to the first name in sorted order (deterministic)."""
    best, n = None, 0
    for c in sorted(categories):
        if categories[c] > n:
            best, n = c, categories[c]
    return best


# -- columns: candidates as arrays -------------------------------------------------------------

@dataclass(slots=True)
class Columns:
    """Candidates column-wise. The online agent builds it with `columns()`, the batch trainer by
    indexing its item table; `matrix()` takes either."""
    ids: Sequence[str]
    categories: Sequence[str | None]
    embeddings: np.ndarray | None   # (n, rank) float32, NaN rows where unknown; None: none known
    price: np.ndarray
    rating: np.ndarray
    seller_rating: np.ndarray
    in_stock: np.ndarray
    created_at: np.ndarray
    popularity_7d: np.ndarray
    purchases_7d: np.ndarray
    trending: np.ndarray
    sources: np.ndarray             # (n, len(SOURCES)), NaN where a source did not propose it
    popularity_window: np.ndarray | None = None   # weighted events over the training window; None: unknown


def columns(candidates: Sequence[Candidate]) -> Columns:
    n = len(candidates)
    items = [c.item or ItemFields() for c in candidates]

    def col(values: Iterable[float]) -> np.ndarray:
        return np.fromiter(values, np.float64, n)

    emb = None
    rank = next((len(c.embedding) for c in candidates if c.embedding is not None), 0)
    if rank:
        emb = np.full((n, rank), np.nan, np.float32)
        for i, c in enumerate(candidates):
            if c.embedding is not None:
                emb[i] = c.embedding
    src = np.full((n, len(SOURCES)), np.nan)
    for i, c in enumerate(candidates):
        for name, score in c.sources.items():
            j = _SOURCE_INDEX.get(name)
            if j is not None:
                src[i, j] = score
    return Columns(
        ids=[c.product_id for c in candidates], categories=[it.category for it in items], embeddings=emb,
        price=col(it.price for it in items), rating=col(it.rating for it in items),
        seller_rating=col(it.seller_rating for it in items), in_stock=col(it.in_stock for it in items),
        created_at=col(it.created_at for it in items), popularity_7d=col(c.popularity_7d for c in candidates),
        purchases_7d=col(c.purchases_7d for c in candidates), trending=col(c.trending for c in candidates),
        sources=src, popularity_window=col(c.popularity_window for c in candidates))


def features(ctx: Context, candidates: Sequence[Candidate]) -> np.ndarray:
    """The online entry point: (len(candidates), len(FEATURE_NAMES)) float32."""
    return matrix(ctx, columns(candidates))


# -- the read half -----------------------------------------------------------------------------

def _rank_pct(x: np.ndarray) -> np.ndarray:
    """0 for the largest value, 1 for the smallest; NaN stays NaN; ties by position (stable)."""
    out = np.full(len(x), np.nan)
    ok = ~np.isnan(x)
    m = int(ok.sum())
    if m:
        ranks = np.empty(m)
        ranks[np.argsort(-x[ok], kind="stable")] = np.arange(m)
        out[ok] = ranks / max(m - 1, 1)
    return out


def _safe_log(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.log(np.maximum(x, 1e-6))
    return out


def _user_item(ctx: Context, cols: Columns) -> tuple[np.ndarray, np.ndarray, float]:
    """(user . item, |item|, |user|) per candidate, NaN where a vector is missing: float64 sums so both
    paths round the same way whatever the array layout."""
    n, u = len(cols.ids), ctx.user_embedding
    if u is None or cols.embeddings is None or n == 0:
        return np.full(n, np.nan), np.full(n, np.nan), NAN
    e = cols.embeddings.astype(np.float64)
    u64 = np.asarray(u, np.float64)
    return (e * u64).sum(axis=1), np.sqrt((e * e).sum(axis=1)), float(np.sqrt((u64 * u64).sum()))


def ui_dot(ctx: Context, cols: Columns) -> np.ndarray:
    """The matrix's "ui_dot" column alone (float32, as the matrix holds it), for orderings without the ranker."""
    return _user_item(ctx, cols)[0].astype(np.float32)


def matrix(ctx: Context, cols: Columns) -> np.ndarray:
    """(n, len(FEATURE_NAMES)) float32 for one request; column j is FEATURE_NAMES[j].

    Why this long: every feature is computed here, a line or two each, in the order the ranker was
    trained with; serving and training call this one function, so one place shows all the features."""
    n = len(cols.ids)
    f: dict[str, Any] = {}
    nan = np.full(n, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        dot, inorm, unorm = _user_item(ctx, cols)
        any_dot = not np.isnan(dot).all()
        f["ui_dot"] = dot
        f["ui_cosine"] = dot / (inorm * unorm)
        f["ui_dot_gap_to_best"] = dot - np.nanmax(dot) if any_dot else nan
        f["ui_dot_rank_pct"] = _rank_pct(dot)
        f["user_embedding_norm"] = unorm
        f["item_embedding_norm"] = inorm
        # price
        price = cols.price
        median = ctx.median_price if ctx.median_price and ctx.median_price > 0 else NAN
        ratio = price / median
        f["price"], f["log_price"] = price, np.log1p(price)
        f["price_ratio"], f["log_price_ratio"] = ratio, _safe_log(ratio)
        cand_median = float(np.nanmedian(price)) if not np.isnan(price).all() else NAN
        f["price_vs_candidates"] = price / cand_median if cand_median > 0 else nan
        f["user_median_price"] = median
        # category: cosine of the affinity vector with the item's one-hot category
        aff = ctx.category_affinity
        norm = math.sqrt(sum(w * w for w in aff.values()))
        top = max(sorted(aff), key=lambda c: aff[c]) if aff else None
        cats = cols.categories
        if norm > 0:
            f["category_match"] = np.fromiter((aff.get(c, 0.0) / norm if c is not None else NAN for c in cats),
                                              np.float64, n)
        else:
            f["category_match"] = nan
        f["is_top_affinity_category"] = np.fromiter((float(c == top) if top else NAN for c in cats), np.float64, n)
        f["user_top_affinity"] = aff[top] / norm if top is not None and norm > 0 else NAN
        f["user_affinity_categories"] = float(sum(1 for w in aff.values() if w > 0))
        # popularity
        pop, bought = cols.popularity_7d, cols.purchases_7d
        f["log_popularity_7d"], f["log_purchases_7d"] = np.log1p(pop), np.log1p(bought)
        f["purchase_rate_7d"] = bought / (pop + 1.0)
        f["log_trending"] = np.log1p(cols.trending)
        f["popularity_rank_pct"] = _rank_pct(pop)
        f["log_popularity_window"] = nan if cols.popularity_window is None else np.log1p(cols.popularity_window)
        # item
        age = (ctx.now_s - cols.created_at) / DAY_S
        f["rating"], f["seller_rating"], f["in_stock"] = cols.rating, cols.seller_rating, cols.in_stock
        f["item_age_days"], f["log_item_age_days"] = age, np.log1p(np.maximum(age, 0.0))
    _session_features(f, session_view(ctx), cols, n, ctx.now_s)
    _request_features(f, ctx)
    src = cols.sources
    flags = ~np.isnan(src)
    for j, s in enumerate(SOURCES):
        f[f"source_{s}"] = flags[:, j]
        f[f"score_{s}"] = src[:, j]
    f["n_sources"] = flags.sum(axis=1)
    if len(f) != len(FEATURE_NAMES):
        raise RuntimeError(f"features built {sorted(set(f) ^ set(FEATURE_NAMES))} out of step with FEATURE_NAMES")
    out = np.empty((n, len(FEATURE_NAMES)), np.float32)
    for j, name in enumerate(FEATURE_NAMES):
        out[:, j] = f[name]
    return out


def _session_features(f: dict[str, Any], s: SessionView, cols: Columns, n: int, now_s: float) -> None:
    cats = s.categories
    views = sum(cats.values())
    main = main_category(cats)
    cat_views = np.fromiter((cats.get(c, 0) if c is not None else NAN for c in cols.categories), np.float64, n)
    position = {pid: i for i, pid in enumerate(s.recent)}
    pos = np.fromiter((position.get(pid, NAN) for pid in cols.ids), np.float64, n)
    cart, bought = set(s.cart), set(s.purchases)
    f["session_live"] = float(s.live)
    f["session_category_views"] = cat_views
    f["session_category_share"] = cat_views / views if views else np.full(n, np.nan)
    f["is_session_main_category"] = np.fromiter((float(c is not None and c == main) for c in cols.categories),
                                                np.float64, n)
    f["session_views"], f["session_categories"] = float(views), float(len(cats))
    f["session_recent_len"] = float(len(s.recent))
    f["in_recent"], f["recent_position"] = (~np.isnan(pos)).astype(np.float64), pos
    f["is_last_viewed"] = np.fromiter((float(pid == s.last_viewed) for pid in cols.ids), np.float64, n)
    f["in_cart"] = np.fromiter((float(pid in cart) for pid in cols.ids), np.float64, n)
    f["cart_size"] = float(len(s.cart))
    f["purchased_before"] = np.fromiter((float(pid in bought) for pid in cols.ids), np.float64, n)
    f["purchases_count"] = float(len(s.purchases))
    f["log_user_events"] = math.log1p(s.events)
    f["log_since_last_event_s"] = math.log1p(max(0.0, now_s - s.last_event_s)) if s.last_event_s is not None else NAN


def _request_features(f: dict[str, Any], ctx: Context) -> None:
    hour = (ctx.now_s % DAY_S) / 3600.0
    dow = (math.floor(ctx.now_s / DAY_S) + 3) % WEEK_DAYS   # 1970-01-01 was a Thursday; Monday = 0
    f["hour_sin"], f["hour_cos"] = math.sin(2 * math.pi * hour / 24), math.cos(2 * math.pi * hour / 24)
    f["dow_sin"], f["dow_cos"] = math.sin(2 * math.pi * dow / WEEK_DAYS), math.cos(2 * math.pi * dow / WEEK_DAYS)
    device = ctx.device if ctx.device in DEVICES else "unknown"
    for d in DEVICES:
        f[f"device_{d}"] = float(d == device)
    page = ctx.page if ctx.page in PAGES else "other"
    for p in (*PAGES, "other"):
        f[f"page_{p}"] = float(p == page)
