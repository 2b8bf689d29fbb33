"""Retrieval agent: a request -> up to a few hundred candidates, each with the sources that proposed it.

Sources (recstream.ranking.SOURCES): on the homepage, the session's recent items themselves
("session": shoppers come back to what they looked at); FAISS over the model's item vectors
("als"), queried with the user's ALS vector, else the mean vector of the session's last 5 viewed
products (the design's cold-start proxy), else the product on screen or the cart's mean; co-view
("covis") and co-purchase ("cobuy") neighbours of the session's, product's or cart's items;
trending in the session's main category ("popular", as the ranker was trained; homepage and cart)
or in the product's category ("same_category"); the product's brand ("same_brand"). A product newer than the model gets its vector from the
content model.

Sharded by item (RECSTREAM_RETRIEVAL_SHARDS > 1): one consumer group per shard reads every request;
each process loads its shard's index and answers its top k by ANN; shard 0 also proposes every other
source (the others read Redis only for the query). Ranking merges the parts (recstream.gather).

FAISS searches run in one thread of their own, with dynamic batching: queries that arrive while a
search runs wait and go together into the next call. Idle, a query waits for nothing; under load
the searches never pile up on the cores, and a call's fixed cost (and, for IVF, the scan of lists
that several queries share) is paid once per batch.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
import orjson

from agents.models import ModelHolder, ServingModel
from agents.runner import Outgoing
from batch.publish import decode_embedding
from recstream.features import keys, popularity
from recstream.features.session import decode_features, features_key, session_key
from recstream.gather import ann_k
from recstream.ranking import main_category
from recstream.rules import Proposals
from recstream.settings import Settings
from schemas import CandidateSet, Product, RecommendationRequest, SchemaError
from streams.online_store import OnlineStore

SESSION_PROXY_ITEMS = 5     # the design: a user without an embedding is the mean of their last 5 viewed
ANCHORS = 5                 # session or cart items whose neighbours are proposed
SESSION_ITEMS = 20          # the session's recent items proposed again on the homepage (score 1 / position)
NEIGHBOURS = 10             # per anchor for homepage and cart (as the ranker was trained); more for a product page
POPULAR = 20                # trending items proposed
BRAND = 10


@dataclass
class Plan:
    """One request's retrieval: what Redis said, the FAISS query, the proposals so far."""
    request: RecommendationRequest
    proposals: Proposals
    query: np.ndarray | None = None          # FAISS query
    query_source: str = "none"
    anchor: str | None = None                # the item the FAISS query stands for (reasons)
    rank_query: np.ndarray | None = None     # the ranker's "user" vector
    rank_query_source: str = "none"


class SearchBatcher:
    """One FAISS search at a time, in its own thread; what queues meanwhile is searched together next."""

    def __init__(self, threads: int = 1) -> None:
        self._pending: list[tuple[ServingModel, np.ndarray, int, asyncio.Future]] = []
        self._wake = asyncio.Event()
        # OpenMP's thread count is per calling thread: set it in the search thread itself, or faiss
        # uses every core there (and its idle threads spin, stealing CPU from the rest of the box)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="faiss", initializer=faiss.omp_set_num_threads,
                                          initargs=(threads,))
        self._task: asyncio.Task | None = None

    async def search(self, model: ServingModel, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((model, query, k, fut))
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="faiss-batcher")
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, []
            groups: dict[tuple[int, int], list] = {}
            for item in pending:
                groups.setdefault((id(item[0]), item[2]), []).append(item)
            for (_, k), group in groups.items():
                index = group[0][0].index
                try:
                    ids, scores = await loop.run_in_executor(self._thread, index.search,
                                                             np.stack([q for _, q, _, _ in group]), k)
                except Exception as exc:
                    for *_, fut in group:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for i, (*_, fut) in enumerate(group):
                    if not fut.done():
                        fut.set_result((ids[i], scores[i]))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)


class Retrieval:
    def __init__(self, s: Settings, store: OnlineStore, models: ModelHolder):
        self.s, self.store, self.models = s, store, models
        self.ns = s.redis_namespace
        self.batcher = SearchBatcher(s.serving_threads)
        self.clock = time.time     # "now" for trending reads; offline evaluation sets the moment of its query
        self.shard, self.shards = s.retrieval_shard, s.retrieval_shards

    def close(self) -> None:
        self.batcher.close()

    async def handle(self, requests: list[RecommendationRequest]) -> list[Outgoing]:
        t0 = time.perf_counter()
        model = self.models.current
        now = self.clock()
        plans = await asyncio.gather(*(self._read(r, model, now) for r in requests))
        t1 = time.perf_counter()
        searched = [p for p in plans if p.query is not None]
        if searched and model is not None and model.index is not None:
            k = [min(ann_k(p.request, self.s.retrieval_candidates), len(model.index)) for p in searched]
            found = await asyncio.gather(*(self.batcher.search(model, p.query, n) for p, n in zip(searched, k)))
            sharded = self.shards > 1   # the on-screen items stay in a shard's top k: ranking's merge drops them
            for p, (row_ids, row_scores) in zip(searched, found):
                for pid, sc in zip(row_ids, row_scores):
                    p.proposals.add(pid, "als", float(sc), p.anchor, keep_excluded=sharded)
        t2 = time.perf_counter()
        out = []
        version = model.version if model else "none"
        for p in plans:
            ids, scores, anchors = p.proposals.columns()
            q = p.rank_query
            created = p.request.created_at
            timings = {"retrieval_in": (now - created) * 1000, "retrieval_redis": (t1 - t0) * 1000,
                       "retrieval_faiss": (t2 - t1) * 1000, "retrieval_out": (time.time() - created) * 1000}
            cs = CandidateSet(request=p.request, model_version=version, query_source=p.rank_query_source,
                              query=tuple(q.tolist()) if q is not None else (), product_ids=tuple(ids),
                              scores=scores, anchors=anchors, timings_ms=timings, shard=self.shard, shards=self.shards)
            out.append(Outgoing(self.s.topic("rec.candidates"), p.request.key, cs.to_json()))
        return out

    # -- Redis reads (two round trips per request) ---------------------------------------------------
    async def _read(self, r: RecommendationRequest, model: ServingModel | None, now: float) -> Plan:
        ns, v = self.ns, model.version if model else None
        plan = Plan(r, Proposals(exclude=set(r.on_screen)))
        anchors = [r.product_id] if r.product_id else list(r.cart_items[:ANCHORS])
        pipe = self.store.redis.pipeline(transaction=False)
        if r.user_id:
            pipe.get(ns + keys.embedding("user", str(v), r.user_id))
            pipe.get(ns + session_key(r.user_id))
            pipe.hgetall(ns + features_key(r.user_id))
        for a in anchors:
            pipe.get(ns + keys.embedding("item", str(v), a))
            pipe.hgetall(ns + keys.item_features(a))
        res = await pipe.execute()
        user_vec = session = feats = None
        if r.user_id:
            raw_user, raw_session, raw_feats = res[:3]
            res = res[3:]
            user_vec = decode_embedding(raw_user)
            session = _json_list(raw_session)
            feats = decode_features(raw_feats) if raw_feats else None
        anchor_vecs = [decode_embedding(x) for x in res[0::2]]
        anchor_items = [{k.decode(): val.decode() for k, val in h.items()} for h in res[1::2]]
        if model is not None and model.content is not None:   # products newer than the model: content vectors
            for i, (vec, item) in enumerate(zip(anchor_vecs, anchor_items)):
                if vec is None and item:
                    anchor_vecs[i] = _content_vector(model, anchors[i], item)

        pipe = self.store.redis.pipeline(transaction=False)
        reads: list[tuple] = []   # (callback, ...) per queued command, in order
        allowed = set(r.overrides.sources) if r.overrides and r.overrides.sources else None   # A/B: some sources only

        def on(source: str) -> bool:
            if self.shard and source != "als":   # shards but 0 propose only their ANN candidates
                return False
            return allowed is None or source in allowed

        def zrev(key: str, n: int, source: str, anchor: str | None, weight: float = 1.0) -> None:
            if not on(source):
                return
            pipe.zrevrange(ns + key, 0, n - 1, withscores=True)
            reads.append((source, anchor, weight))

        def trending(category: str | None, n: int, source: str) -> None:
            for lm, w in popularity.trend_read_weights(now, self.s.trending_half_life_s).items():
                zrev(popularity.trend_key(lm, category), 2 * n, source, category, w)

        recent = (session or [])[:ANCHORS]
        if r.kind == "homepage":   # the session's own items: shoppers come back to what they looked at
            if on("session"):
                plan.proposals.add_all([(pid, 1.0 / (i + 1)) for i, pid in enumerate((session or [])[:SESSION_ITEMS])],
                                       "session")
            cart = list((feats or {}).get("cart_items") or [])[:ANCHORS]
            for a in recent:
                zrev(keys.neighbours("covis", a), NEIGHBOURS, "covis", a)
            for a in (*recent, *cart):
                zrev(keys.neighbours("cobuy", a), NEIGHBOURS, "cobuy", a)
            main = main_category((feats or {}).get("session_categories") or {}) if recent else None
            trending(main, POPULAR, "popular")
        else:
            cobuy, covis = {"cart": (50, 20), "also_viewed": (NEIGHBOURS, 100), "similar": (NEIGHBOURS, NEIGHBOURS)}[r.kind]
            for a in anchors:
                zrev(keys.neighbours("cobuy", a), cobuy, "cobuy", a)
                zrev(keys.neighbours("covis", a), covis, "covis", a)
            categories = [it["category"] for it in anchor_items if it.get("category")]
            for c in dict.fromkeys(categories[:2]):
                trending(c, POPULAR // 2 if r.kind == "cart" else POPULAR, "same_category")
            if r.kind == "cart":   # staples: what the ranker learned to weigh against the basket's neighbours
                main = main_category((feats or {}).get("session_categories") or {}) if recent else None
                trending(main, POPULAR, "popular")
            brand = next((it["brand"] for it in anchor_items if it.get("brand") not in (None, "", "unknown")), None)
            if brand and r.kind == "similar":
                zrev(keys.brand(brand), BRAND, "same_brand", brand)
        merged: dict[tuple[str, str | None], dict[str, float]] = {}
        for (source, anchor, weight), rows in zip(reads, await pipe.execute() if reads else []):
            if source in ("popular", "same_category"):   # trending: two landmarks' scores add up
                acc = merged.setdefault((source, anchor), {})
                for m, sc in rows:
                    acc[m.decode()] = acc.get(m.decode(), 0.0) + sc * weight
            else:
                plan.proposals.add_all([(m.decode(), sc) for m, sc in rows], source, anchor)
        for (source, anchor), acc in merged.items():
            best = sorted(acc.items(), key=lambda x: -x[1])[: POPULAR]
            plan.proposals.add_all(best, source, anchor)

        # the FAISS query, and the vector the ranker scores "user x item" with
        if r.kind == "homepage":
            if user_vec is not None:
                plan.query, plan.query_source = user_vec, "user"
            elif recent and v is not None:
                vecs = [x for x in await self.store.embeddings("item", v, recent[:SESSION_PROXY_ITEMS]) if x is not None]
                if vecs:
                    plan.query, plan.query_source, plan.anchor = np.mean(vecs, axis=0), "session", recent[0]
        else:
            vecs = [x for x in anchor_vecs if x is not None]
            if vecs:
                plan.query = vecs[0] if r.kind != "cart" else np.mean(vecs, axis=0)
                plan.query_source = "product" if r.kind != "cart" else "cart"
                plan.anchor = anchors[0]
        if user_vec is not None:
            plan.rank_query, plan.rank_query_source = user_vec, "user"
        else:
            plan.rank_query, plan.rank_query_source = plan.query, plan.query_source
        if not on("als"):   # A/B: no ANN candidates; the ranker still scores with the vector
            plan.query = None
        return plan


def _json_list(raw: bytes | None) -> list[str]:
    return orjson.loads(raw) if raw else []


def _content_vector(model: ServingModel, product_id: str, item: dict[str, str]) -> np.ndarray | None:
    """The content model's vector of a product from its item_features hash (None if the hash is unusable)."""
    try:
        p = Product.from_dict({"product_id": product_id, "title": item.get("title") or product_id,
                               "category_path": orjson.loads(item.get("category_path") or "[]") or [item["category"]],
                               "brand": item.get("brand") or "unknown", "price": float(item.get("price") or 0),
                               "created_at": float(item.get("created_at") or time.time())})
    except (SchemaError, KeyError, ValueError):
        return None
    return model.content.predict([p]).vectors[0].astype(np.float32)
