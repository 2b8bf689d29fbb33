"""The retrieval and ranking agents and the API's fallback and readiness over the memory store: their
logic on what the store holds, without Redis or Kafka (the same paths over Redis:
tests/integration/test_candidates.py, test_serving.py)."""
from __future__ import annotations

import time

import numpy as np
import pytest

import recstream.settings
from agents.models import ModelHolder, ServingModel
from agents.ranking import Ranking
from agents.retrieval import Retrieval
from batch.publish import publish
from models import index as faiss_index
from models.artifacts import BatchOutputs, Embeddings, Window
from recstream import candidates, ordering
from recstream.features import Incoming
from recstream.ranking import FEATURE_NAMES, matrix
from recstream.settings import Settings
from schemas import CandidateSet, RecommendationReply, RecommendationRequest
from serving import recommend
from streams.memory_store import MemoryStore
from tests.store_contract import NOW, ev, fold_all, product

ITEMS = [f"p{i}" for i in range(8)]


@pytest.fixture
def s() -> Settings:
    return recstream.settings.load({})


async def shop(s: Settings) -> MemoryStore:
    """Eight products (even ones Audio, odd ones Phones; p7 out of stock); u2 viewed p1 then p2, u1 p1
    then p3; version 7 published, each item's vector its own axis, u1's the axis of p4."""
    store = MemoryStore()
    await store.write_items([product(p, ("Audio", "Phones")[i % 2], in_stock=p != "p7") for i, p in enumerate(ITEMS)])
    await fold_all(store, s, [Incoming(ev(1, "u2", "view", "p1", "Phones", "s2"), 0, 0),
                              Incoming(ev(2, "u2", "view", "p2", "Audio", "s2"), 0, 1),
                              Incoming(ev(3, "u1", "view", "p1", "Phones"), 1, 0),
                              Incoming(ev(4, "u1", "view", "p3", "Phones"), 1, 1),
                              Incoming(ev(5, "u3", "view", "p7", "Phones", "s3"), 2, 0)], size=10)
    users = Embeddings(["u1"], np.eye(8, dtype=np.float32)[[4]])
    out = BatchOutputs(Window(0, 1, 10), users, Embeddings(ITEMS, np.eye(8, dtype=np.float32)), {}, {}, {}, {}, {})
    await publish(s, s.model_name, "7", out, progress=lambda _: None, announce=False, store=store)
    return store


def retrieval_agent(s: Settings, store: MemoryStore) -> Retrieval:
    holder = ModelHolder(s, "retrieval")
    holder.current = ServingModel("7", index=faiss_index.build(Embeddings(ITEMS, np.eye(8, dtype=np.float32)), "flat"),
                                  knn=candidates.ItemLists({"p3": [("p6", 0.9)]}))
    return Retrieval(s, store, holder)


async def test_retrieval_answers_from_the_store(s: Settings):
    store = await shop(s)
    retrieval = retrieval_agent(s, store)
    now = NOW
    retrieval.clock = lambda: now
    try:
        known = RecommendationRequest(request_id="r1", kind="homepage", created_at=now, user_id="u1")
        anonymous = RecommendationRequest(request_id="r2", kind="homepage", created_at=now)
        sent = await retrieval.handle([known, anonymous])
    finally:
        retrieval.close()
    mine, theirs = (CandidateSet.from_json(x.value, now=now) for x in sent)

    def proposed(cs: CandidateSet, source: str) -> dict[str, float]:
        return {p: x for p, x in zip(cs.product_ids, cs.scores.get(source, ()), strict=True) if not np.isnan(x)}

    def anchor(cs: CandidateSet, source: str, pid: str) -> str | None:
        return cs.anchors[source][cs.product_ids.index(pid)]

    assert mine.model_version == "7" and mine.query_source == "user" and mine.query == tuple(np.eye(8)[4])
    als = proposed(mine, "als")
    assert max(als, key=als.__getitem__) == "p4" and als["p4"] == pytest.approx(1.0)   # u1's vector: p4's axis
    assert list(proposed(mine, "session")) == ["p3", "p1"]                 # this session, newest first
    assert "p2" in proposed(mine, "covis") and anchor(mine, "covis", "p2") == "p1"   # u2 viewed p1 then p2
    assert proposed(mine, "knn") == {"p6": pytest.approx(0.9)} and anchor(mine, "knn", "p6") == "p3"
    assert set(proposed(mine, "popular")) == {"p1", "p3", "p7"} and anchor(mine, "popular", "p7") == "Phones"
    # no user, no session: no query vector, trending only
    assert theirs.query_source == "none" and "als" not in theirs.scores
    assert set(theirs.product_ids) == {"p1", "p2", "p3", "p7"} == set(proposed(theirs, "popular"))


async def test_ranking_orders_retrievals_candidates_by_the_rules_and_drops_what_is_out_of_stock(s: Settings):
    store = await shop(s)
    retrieval = retrieval_agent(s, store)
    holder = ModelHolder(s, "ranking")
    holder.current = ServingModel("7")   # no booster: the rules order
    ranking = Ranking(s, store, holder)
    now = NOW
    try:
        request = RecommendationRequest(request_id="r1", kind="homepage", created_at=now, user_id="u1", count=10)
        [sent] = await retrieval.handle([request])
        candidate_set = CandidateSet.from_json(sent.value, now=now)
        [replied] = await ranking.handle([candidate_set])
    finally:
        retrieval.close()
        ranking.close()
    reply = RecommendationReply.from_json(replied.value)
    assert replied.key == b"r1" and reply.request_id == "r1" and not reply.fallback
    got = [i.product_id for i in reply.items]
    assert set(got) == set(candidate_set.product_ids) - {"p7"}   # every candidate but the one out of stock
    assert all(i.reason and i.source in candidate_set.scores for i in reply.items)


async def test_ranking_builds_the_feature_matrix_only_for_the_sets_its_ranker_orders(s: Settings):
    """A task the version serves with a simpler ordering needs no matrix (the "als" ordering: its ui_dot
    column alone, the values the matrix would hold)."""
    store = await shop(s)
    retrieval = retrieval_agent(s, store)
    holder = ModelHolder(s, "ranking")
    vectors = np.eye(8, dtype=np.float32)
    ranking = Ranking(s, store, holder)
    try:
        [sent] = await retrieval.handle([RecommendationRequest(request_id="r1", kind="homepage", created_at=NOW,
                                                               user_id="u1")])
        cs = CandidateSet.from_json(sent.value, now=NOW)
        for chosen in ("rules", "popular", "als"):
            holder.current = ServingModel("7", item_vectors=vectors, item_row={f"p{i}": i for i in range(8)},
                                          orderings=dict.fromkeys(ordering.TASKS, chosen))
            w = await ranking._features(cs, NOW)
            assert w.ordering == chosen and w.X is None
            if chosen != "als":
                assert w.ui_dot is None and w.cols.embeddings is None
                continue
            full = matrix(w.ctx, w.cols)[:, FEATURE_NAMES.index("ui_dot")]
            assert w.ui_dot is not None and np.array_equal(w.ui_dot, full, equal_nan=True)
            assert w.ui_dot[list(cs.product_ids).index("p4")] == 1.0   # u1's vector is p4's axis
    finally:
        retrieval.close()
        ranking.close()


async def test_the_fallback_serves_trending_in_stock_items_by_category(s: Settings):
    store = await shop(s)
    fallback = recommend.Fallback(s, store)
    await fallback.refresh()
    assert {p for p, _, _ in fallback.overall} == {"p1", "p2", "p3"}        # p7 trends, but is out of stock
    assert dict((p, c) for p, _, c in fallback.overall) == {"p1": "Phones", "p2": "Audio", "p3": "Phones"}
    req = RecommendationRequest(request_id="r1", kind="homepage", created_at=NOW, count=2,
                                context={"category": "Phones"})
    first = fallback.reply(req, "no reply within 40 ms")   # Phones is not looked up yet: trending overall
    assert first.fallback and len(first.items) == 2 and first.error == "no reply within 40 ms"
    await fallback.refresh()                               # ... it is now
    again = fallback.reply(req, "no reply within 40 ms")
    assert {i.product_id for i in again.items} == {"p1", "p3"}
    assert {i.reason for i in again.items} == {"trending in Phones"} and {i.source for i in again.items} == {"popular"}


async def test_a_fallback_refresh_that_swallows_its_cancellation_still_ends_the_loop(s: Settings):
    """A cancelled Redis read can return normally (the API then took its full 5 s bound to stop)."""
    import asyncio
    import dataclasses

    store = await shop(s)
    reads = asyncio.Event()
    trending = store.trending

    async def swallowing(*args, **kwargs):
        reads.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass   # what the library did: the read returns as if nothing happened
        return await trending(*args, **kwargs)

    store.trending = swallowing   # type: ignore[method-assign]
    fallback = recommend.Fallback(dataclasses.replace(s, fallback_refresh_s=3600.0), store)
    task = asyncio.create_task(fallback.run())
    await reads.wait()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=60)   # a "never hangs" bound: the loop would sleep an hour
    assert done and task.cancelled()


async def test_readiness_reads_the_agents_reports_from_the_store(s: Settings):
    store = MemoryStore()
    rec = recommend.Recommender(s, store=store)
    try:
        now = time.time()   # the reports' time: check_path compares it with the clock
        assert not (await rec.check_path()).ready
        for role in [*s.retrieval_agents(), "ranking"]:
            await store.report_agent(f"{role}:host:1", now, None)
        assert await rec.check_path() == recommend.PathStatus(True, "", "none")   # nothing trained: rules
        await store.set_model_pointer({"name": s.model_name, "version": "7"})
        status = await rec.check_path()
        assert not status.ready and "have not loaded a model yet (version 7" in status.reason
        for role in [*s.retrieval_agents(), "ranking"]:
            await store.report_agent(f"{role}:host:1", now, "7")
        assert await rec.check_path() == recommend.PathStatus(True, "", "7")
        await store.forget_agent("ranking:host:1")           # a clean stop
        gone = f"no ranking agent has reported in the last {recommend.AGENT_FRESH_S:g} s"
        assert (await rec.check_path()).reason == gone
    finally:
        await rec.client.aclose()
