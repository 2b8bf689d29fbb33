"""Retrieval agent: a request -> up to a few hundred candidates, each with the sources that proposed it.

What is proposed is decided by the candidate stage (recstream.candidates), which the ranker's example
builder calls too; this agent reads its inputs from Redis (two round trips: the shopper and the
anchors, then the lists the stage asks for) and answers its ANN query with FAISS over the model's
item vectors. A product newer than the model gets its vector from the content model.

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
from recstream import candidates
from recstream.gather import ann_k
from recstream.rules import Proposals
from recstream.settings import Settings
from recstream.stats import Stages
from schemas import CandidateSet, Product, RecommendationRequest, SchemaError
from schemas.recommendations import SOURCES
from streams.store import Store


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
    def __init__(self, s: Settings, store: Store, models: ModelHolder):
        self.s, self.store, self.models = s, store, models
        self.batcher = SearchBatcher(s.serving_threads)
        self.clock = time.time     # "now" for trending reads; offline evaluation sets the moment of its query
        self.shard, self.shards = s.retrieval_shard, s.retrieval_shards

    def close(self) -> None:
        self.batcher.close()

    async def handle(self, requests: list[RecommendationRequest]) -> list[Outgoing]:
        """One batch of requests: read (Redis), search (FAISS), send (candidate sets), each stage timed."""
        model, now, stage = self.models.current, self.clock(), Stages()
        with stage("retrieval_redis"):
            plans = await asyncio.gather(*(self._read(r, model, now) for r in requests))
        with stage("retrieval_faiss"):
            await self._search(plans, model)
        return [self._send(p, model, now, stage.ms) for p in plans]

    async def _search(self, plans: list[Plan], model: ServingModel | None) -> None:
        """The ANN candidates of every plan with a query, in the batcher's shared searches."""
        searched = [p for p in plans if p.query is not None]
        if not searched or model is None or model.index is None:
            return
        k = [min(ann_k(p.request, self.s.retrieval_candidates), len(model.index)) for p in searched]
        found = await asyncio.gather(*(self.batcher.search(model, p.query, n) for p, n in zip(searched, k)))
        sharded = self.shards > 1   # the on-screen items stay in a shard's top k: ranking's merge drops them
        for p, (row_ids, row_scores) in zip(searched, found):
            candidates.add_ann(p.proposals, zip(row_ids, row_scores), p.anchor, keep_excluded=sharded)

    def _send(self, p: Plan, model: ServingModel | None, now: float, stages_ms: dict[str, float]) -> Outgoing:
        ids, scores, anchors = p.proposals.columns()
        q, created = p.rank_query, p.request.created_at
        timings = {"retrieval_in": (now - created) * 1000, **stages_ms, "retrieval_out": (time.time() - created) * 1000}
        cs = CandidateSet(request=p.request, model_version=model.version if model else "none",
                          query_source=p.rank_query_source, query=tuple(q.tolist()) if q is not None else (),
                          product_ids=tuple(ids), scores=scores, anchors=anchors, timings_ms=timings,
                          shard=self.shard, shards=self.shards)
        return Outgoing(self.s.topic("rec.candidates"), p.request.key, cs.to_json())

    # -- Redis reads (two round trips per request) ---------------------------------------------------
    async def _read(self, r: RecommendationRequest, model: ServingModel | None, now: float) -> Plan:
        v = model.version if model else None
        ids = candidates.anchors(r)
        got = await self.store.retrieval_reads(r.user_id, ids, v)
        user_vec, anchor_vecs, anchor_items = got.user_vector, got.anchor_vectors, got.anchor_items
        if model is not None and model.content is not None:   # products newer than the model: content vectors
            for i, (vec, item) in enumerate(zip(anchor_vecs, anchor_items)):
                if vec is None and item:
                    anchor_vecs[i] = _content_vector(model, ids[i], item)

        shopper = candidates.Shopper.from_redis(got.session, got.features, now, self.s.session_idle_timeout_s)
        allowed = set(r.overrides.sources) if r.overrides and r.overrides.sources else set(SOURCES)   # A/B
        sources = {"als"} & allowed if self.shard else allowed   # shards but 0 propose only their ANN candidates
        reads = candidates.plan(r, shopper, anchor_items, sources, self.s.knn_per_anchor)
        stored = await self.store.candidate_reads([rd for rd in reads if rd.table not in candidates.MODEL_TABLES],
                                                  now, self.s.trending_half_life_s)
        answers = candidates.answer(reads, stored, model.knn if model is not None else None)
        plan = Plan(r, candidates.propose(r, shopper, reads, answers, sources))

        # the FAISS query, and the vector the ranker scores "user x item" with
        vectors = dict(zip(ids, anchor_vecs))
        if r.kind == "homepage" and user_vec is None and shopper.recent and v is not None:
            proxy = shopper.recent[:candidates.SESSION_PROXY_ITEMS]
            vectors = dict(zip(proxy, await self.store.embeddings("item", v, proxy)))
        q = candidates.query(r, shopper, user_vec, vectors.get)
        plan.query, plan.query_source, plan.anchor = q.vector, q.source, q.anchor
        plan.rank_query, plan.rank_query_source = q.rank_vector, q.rank_source
        if "als" not in sources:   # A/B: no ANN candidates; the ranker still scores with the vector
            plan.query = None
        return plan


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
