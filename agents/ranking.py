"""Ranking agent: candidates -> XGBoost scores -> business rules -> the reply, sent to the asking API process.

Features come from recstream.ranking.matrix, the function the ranker was trained with, over the
feature agents' Redis state (session, popularity, trending, stock) and the model's offline values
(ALS item vectors in memory, the user's category affinity and median price in Redis). Candidate
sets of one batch are scored in one `inplace_predict` call per model version.

Retrieval sharded by item sends one candidate set per shard: they are gathered (recstream.gather)
and ranked as one when all have come, or `retrieval_gather_ms` after the first (within the
request's deadline), with what came: a shard down costs its share of ANN candidates, not the answer.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from agents.models import ModelHolder, ServingModel
from agents.runner import Outgoing
from models import booster
from recstream import ordering
from recstream.gather import Gather
from recstream.ranking import FEATURE_NAMES, Columns, Context, ItemFields, matrix, session_view, ui_dot
from recstream.rules import Rules, best_source, primary, reason, select, source_matrix
from recstream.settings import Settings
from recstream.stats import Stages
from schemas import CandidateSet, Overrides, RecommendationReply, RecommendedItem
from streams.online_store import RankingReads
from streams.store import Store

ITEM_FIELDS = ("title", "category", "brand", "price", "rating", "seller_rating", "in_stock", "created_at")
UI_DOT = FEATURE_NAMES.index("ui_dot")


@dataclass(frozen=True, slots=True)
class Item:
    fields: ItemFields
    title: str | None
    brand: str | None


class TTLCache:
    """Values by product id, kept `ttl_s` in memory (cleared whole when it outgrows `max_items`)."""

    def __init__(self, ttl_s: float, max_items: int = 500_000):
        self.ttl_s, self.max_items = ttl_s, max_items
        self._values: dict[str, tuple[float, object]] = {}

    def lookup(self, ids: list[str]) -> tuple[list, list[str]]:
        """(value per id, None where missing or expired; the missing ids, once each)."""
        now, values = time.monotonic(), self._values
        out, missing = [], {}
        for x in ids:
            hit = values.get(x)
            if hit is None or hit[0] < now:
                out.append(None)
                missing[x] = None
            else:
                out.append(hit[1])
        return out, list(missing)

    def fill(self, ids: list[str], out: list, missing: list[str], values: list) -> list:
        """Store the values of `missing` and complete `out` (from lookup) with them."""
        if len(self._values) + len(missing) > self.max_items:
            self._values.clear()
        expires = time.monotonic() + self.ttl_s
        got = dict(zip(missing, values))
        for x, v in got.items():
            self._values[x] = (expires, v)
        return [got[x] if v is None else v for x, v in zip(ids, out)] if got else out


def _item(values: list[str | None]) -> Item:
    d = {k: v for k, v in zip(ITEM_FIELDS, values) if v is not None}
    return Item(ItemFields.from_redis(d), d.get("title"), d.get("brand"))


@dataclass
class Scored:
    cs: CandidateSet
    model: ServingModel | None       # the retrieving version: item vectors for the features
    ranker: ServingModel | None      # whose booster scores (the same, unless an A/B variant names another)
    ctx: Context
    cols: Columns
    items: list[Item]
    in_stock: list[bool]
    exclude: frozenset[str]
    recent: list[str]
    arrived: float
    stages: Stages                   # ranking_redis, ranking_features (per request)
    X: np.ndarray | None             # the feature matrix: built where the ranker orders the set
    ui_dot: np.ndarray | None        # the ALS dot products (as X holds them): where the "als" ordering needs them
    task: str = "home"               # recstream.ordering.task_of_request
    ordering: str = "rules"          # what orders this request: its task's choice in the ranker's version
    scores: np.ndarray | None = None


class Ranking:
    def __init__(self, s: Settings, store: Store, models: ModelHolder):
        self.s, self.store, self.models = s, store, models
        self.fusion_weights = s.fusion_weight_vector
        # Catalogue fields and popularity counts are read through short-lived caches: both change
        # slowly, and reading 7 days x 3 event types of counts for 200 candidates cost Redis ~3 ms a
        # request. Stock is never cached: the oos set is read for every request.
        self.items = TTLCache(s.item_cache_ttl_s)
        self.stats = TTLCache(s.item_stats_ttl_s)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="xgboost")   # one predict at a time
        self.clock = time.time     # "now" for popularity windows and recency; offline evaluation sets its query's
        self.gather = Gather(s.retrieval_candidates)
        # merged sets whose gather wait ended go back in through this (the agent's submit; set by the worker)
        self.submit: Callable[[list[CandidateSet]], None] | None = None
        # schedules the end of a gather wait (tests record the delay instead of waiting it out)
        self.later: Callable[..., object] = lambda delay, fn, *args: asyncio.get_running_loop().call_later(delay, fn, *args)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _gathered(self, sets: list[CandidateSet]) -> list[CandidateSet]:
        """Whole sets: unsharded ones, and the merge of a request whose last shard answer this is."""
        out = []
        for cs in sets:
            if cs.shards == 1:
                out.append(cs)
                continue
            merged, first = self.gather.offer(cs)
            if merged is not None:
                out.append(merged)
            elif first:
                r = cs.request
                left = r.created_at + (r.deadline_ms - self.s.serving_reserve_ms) / 1000 - self.clock()
                wait = max(0.0, min(self.s.retrieval_gather_ms / 1000, left))
                self.later(wait, self._gather_over, r.request_id)
        return out

    def _gather_over(self, request_id: str) -> None:
        merged = self.gather.expire(request_id)
        if merged is not None and self.submit is not None:
            self.submit([merged])

    async def handle(self, sets: list[CandidateSet]) -> list[Outgoing]:
        """Gather a sharded request's sets; then read and build each set's features (concurrently),
        score (one booster call per model for the batch), order and explain; each stage timed."""
        sets = self._gathered(sets)
        arrived, stage = self.clock(), Stages()
        work = await asyncio.gather(*(self._features(cs, arrived) for cs in sets))
        with stage("ranking_model"):
            await self._score(work)
        return [await self._reply(w, stage.ms["ranking_model"]) for w in work]

    async def _score(self, work: list[Scored]) -> None:
        """The ranker's scores of every set its task orders by the ranker: one predict per booster."""
        by_model: dict[int, list[Scored]] = {}
        for w in work:
            if w.ordering == "ranker" and w.X is not None and len(w.cs.product_ids):
                by_model.setdefault(id(w.ranker.booster_for(w.task)), []).append(w)
        for group in by_model.values():
            X = np.concatenate([w.X for w in group if w.X is not None])
            model = group[0].ranker.booster_for(group[0].task)
            y = await asyncio.get_running_loop().run_in_executor(self._thread, booster.score, model, X)
            at = 0
            for w in group:
                w.scores, at = y[at:at + len(w.cs.product_ids)], at + len(w.cs.product_ids)

    async def _read(self, ids: list[str], user_id: str | None, model: ServingModel | None,
                    arrived: float) -> tuple[list[Item], tuple[np.ndarray, np.ndarray, np.ndarray], RankingReads]:
        """Catalogue fields and popularity from the caches, the misses and the rest from the store:
        (items, the [popularity, purchases, trending] columns, the store's reads)."""
        (items, item_misses), (stats, stat_misses) = self.items.lookup(ids), self.stats.lookup(ids)
        got = await self.store.ranking_reads(ids, item_misses, ITEM_FIELDS, stat_misses, user_id,
                                             model.version if model else None, arrived, self.s.popularity_window_days,
                                             self.s.trending_half_life_s)
        items = self.items.fill(ids, items, item_misses, [_item(row) for row in got.item_rows])
        stats = self.stats.fill(ids, stats, stat_misses, list(zip(got.popularity_7d, got.purchases_7d, got.trending)))
        pop, bought, trend = np.array(stats, np.float64).reshape(len(ids), 3).T
        return items, (pop, bought, trend), got

    async def _features(self, cs: CandidateSet, arrived: float) -> Scored:
        r, stage = cs.request, Stages()
        # ranked on the version that retrieved them; a version this agent has not loaded yet ranks on
        # its current one without the query vector (a different embedding space)
        model = self.models.get(cs.model_version)
        query = np.asarray(cs.query, np.float32) if cs.query else None
        if model is None:
            model, query = self.models.current, None
        ids = list(cs.product_ids)
        with stage("ranking_redis"):
            items, stats, got = await self._read(ids, r.user_id, model, arrived)
        with stage("ranking_features"):
            return self._build(cs, model, query, items, stats, got, arrived, stage)

    def _build(self, cs: CandidateSet, model: ServingModel | None, query: np.ndarray | None, items: list[Item],
               stats: tuple[np.ndarray, np.ndarray, np.ndarray], got: RankingReads, arrived: float,
               stage: Stages) -> Scored:
        """The feature matrix (recstream.ranking.matrix, as trained), what is excluded, and the ordering
        the request's task takes in the scoring version."""
        r, s = cs.request, self.s
        ids, (pop, bought, trend) = list(cs.product_ids), stats
        in_stock, feats, recent, affinity, median = got.in_stock, got.features, got.recent, got.affinity, got.median_price
        ctx = Context(now_s=arrived, user_embedding=query, session=feats, recent=recent, category_affinity=affinity,
                      median_price=median, device=r.ctx("device"), page=r.ctx("page"),
                      session_idle_timeout_s=s.session_idle_timeout_s)
        ov = r.overrides or Overrides()
        # an A/B variant may name another ranker: its booster scores features built on the retrieving
        # version's vectors (until it is loaded, the retrieving version's own ranker scores)
        scorer = (self.models.ranker(ov.ranker) if ov.ranker else None) or model
        task = ordering.task_of_request(r.kind, session_view(ctx).live)
        chosen = ordering.resolve(scorer.orderings, task, scorer.booster is not None) if scorer else "rules"
        f = [it.fields for it in items]
        cols = Columns(ids=ids, categories=[x.category for x in f],   # item vectors: for the orderings that read them
                       embeddings=model.item_embeddings(ids) if model is not None and chosen in ("ranker", "als") else None,
                       price=np.array([x.price for x in f]), rating=np.array([x.rating for x in f]),
                       seller_rating=np.array([x.seller_rating for x in f]),
                       in_stock=np.array([x.in_stock for x in f]), created_at=np.array([x.created_at for x in f]),
                       popularity_7d=pop, purchases_7d=bought, trending=trend,
                       sources=source_matrix(len(ids), cs.scores),
                       popularity_window=model.window_popularity(ids) if model is not None else None)
        exclude = {*r.cart_items, *([r.product_id] if r.product_id else [])}
        if (s.exclude_purchased if ov.exclude_purchased is None else ov.exclude_purchased) and feats:
            exclude |= set(feats.get("purchases") or ())
        # the whole feature matrix only where the ranker scores it: a task the version serves with a simpler
        # ordering (most homepage and cart requests) needs at most its "ui_dot" column
        X = matrix(ctx, cols) if chosen == "ranker" else None
        dot = X[:, UI_DOT] if X is not None else ui_dot(ctx, cols) if chosen == "als" else None
        return Scored(cs, model, scorer, ctx, cols, items, in_stock, frozenset(exclude), recent, arrived,
                      stage, X, dot, task, chosen)

    async def _reply(self, w: Scored, model_ms: float) -> Outgoing:
        """Order by the task's ordering, apply the rules (stock, exclusions, per-category caps), explain."""
        t0 = time.perf_counter()
        cs, r = w.cs, w.cs.request
        engaged = np.nan_to_num(w.cols.popularity_7d) + np.nan_to_num(w.cols.purchases_7d)
        scores = ordering.scores(w.ordering, w.cols.sources, engaged, w.cols.trending, w.ui_dot, w.scores,
                                 w.cols.popularity_window, self.fusion_weights)
        per_category = r.overrides.max_per_category if r.overrides and r.overrides.max_per_category is not None \
            else self.s.max_per_category
        tier = primary(r.kind, cs.scores, w.cols.categories, r.ctx("category", "")) if self.s.widget_tiers else None
        rows = select(w.cols.ids, scores, w.cols.categories, w.in_stock, Rules(r.count, per_category, w.exclude), tier)
        items = await self._explain(w, rows, scores)
        timings = None
        if r.debug:
            timings = {**(cs.timings_ms or {}), "ranking_in": (w.arrived - r.created_at) * 1000,
                       **w.stages.ms, "ranking_model": model_ms,
                       "rules": (time.perf_counter() - t0) * 1000, "ranking_out": (time.time() - r.created_at) * 1000}
        reply = RecommendationReply(
            request_id=r.request_id, kind=r.kind, items=tuple(items),
            model_version=w.ranker.version if w.ranker is not None and (w.scores is not None or w.ranker.orderings)
            else "none",
            experiments=r.experiments, timings_ms=timings, session_recent=tuple(w.recent[:100]) if r.debug else None)
        return Outgoing(r.reply_to or self.s.topic("rec.replies"), r.request_id.encode(), reply.to_json())

    async def _explain(self, w: Scored, rows: list[int], scores: np.ndarray) -> list[RecommendedItem]:
        """The chosen rows as items, each with the source that proposed it and a reason naming it (the
        anchor product's title for the lists built from one)."""
        cs, r = w.cs, w.cs.request
        sources = [best_source(i, cs.scores, r.kind) for i in rows]
        anchor_ids = [cs.anchors.get(src, ())[i] if src in ("cobuy", "covis", "als", "session") and src in cs.anchors
                      else None for i, src in zip(rows, sources)]
        wanted = list(dict.fromkeys(a for a in anchor_ids if a))
        anchors, missing = self.items.lookup(wanted)
        if missing:
            fetched = await self.store.item_rows(missing, ITEM_FIELDS)
            anchors = self.items.fill(wanted, anchors, missing, [_item(row) for row in fetched])
        titles = {a: it.title for a, it in zip(wanted, anchors)}
        items = []
        for i, src, anchor in zip(rows, sources, anchor_ids):
            it = w.items[i]
            cat = cs.anchors.get(src, ())[i] if src in ("popular", "same_category") and src in cs.anchors else None
            text = reason(src, kind=r.kind, anchor_title=titles.get(anchor) if anchor else None,
                          score=cs.scores[src][i] if src else float("nan"), category=cat or it.fields.category,
                          brand=it.brand, query_source=cs.query_source)
            items.append(RecommendedItem(product_id=w.cols.ids[i], score=float(scores[i]), reason=text,
                                         source=src or "popular"))
        return items
