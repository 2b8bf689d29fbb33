"""Scatter-gather over index shards: the merge of shard answers (recstream.gather) and the ranking
agent's wait for them (agents/ranking.py), against real FAISS indexes."""
from __future__ import annotations

import asyncio
import dataclasses
import math
import time

import numpy as np
import pytest

from agents.ranking import Ranking
from models.artifacts import Embeddings
from models.index import build, split_by_shard
from recstream.gather import Gather, merge_parts
from recstream.rules import Proposals
from recstream.settings import Settings
from schemas import CandidateSet, RecommendationRequest
from tests import factories
from tests.factories import bind

request = bind(factories.request, "request_id", "deadline_ms", user_id="u1", deadline_ms=500)


def part(shard: int, shards: int, proposals: Proposals, version: str = "7", rid: str = "r1",
         timings: dict | None = None, deadline_ms: int = 500, req: RecommendationRequest | None = None) -> CandidateSet:
    """A shard's answer as ranking reads it off the topic (NaN where a source did not propose an item)."""
    ids, scores, anchors = proposals.columns()
    cs = CandidateSet(request=req or request(rid, deadline_ms), model_version=version, query_source="user", query=(1.0, 0.0),
                      product_ids=tuple(ids), scores={k: tuple(v) for k, v in scores.items()},
                      anchors={k: tuple(v) for k, v in anchors.items()}, timings_ms=timings, shard=shard, shards=shards)
    return CandidateSet.from_json(cs.to_json())


def ann(rows: list[tuple[str, float]], **others: list[tuple[str, float, str]]) -> Proposals:
    p = Proposals()
    for source, items in others.items():
        for pid, sc, anchor in items:
            p.add(pid, source, sc, anchor)
    p.add_all(rows, "als")
    return p


def ann_of(cs: CandidateSet) -> dict[str, float]:
    return {pid: sc for pid, sc in zip(cs.product_ids, cs.scores["als"]) if not math.isnan(sc)}


def test_the_merge_keeps_the_best_k_ann_candidates_of_all_shards_and_shard_0s_other_sources():
    lead = part(0, 2, ann([("a", 0.9), ("b", 0.5), ("c", 0.1)], covis=[("x", 3.0, "p0"), ("b", 1.0, "p0")]),
                timings={"retrieval_faiss": 1.0, "retrieval_redis": 4.0})
    other = part(1, 2, ann([("d", 0.8), ("e", 0.6), ("f", 0.2)]), timings={"retrieval_faiss": 2.5})
    merged = merge_parts([other, lead], 3)   # any arrival order
    assert (merged.shard, merged.shards) == (0, 1)
    assert ann_of(merged) == {"a": 0.9, "d": 0.8, "e": 0.6}
    covis = {pid: (sc, merged.anchors["covis"][i]) for i, (pid, sc) in enumerate(zip(merged.product_ids,
                                                                                       merged.scores["covis"]))
             if not math.isnan(sc)}
    assert covis == {"x": (3.0, "p0"), "b": (1.0, "p0")}   # "b" stays a candidate through co-view
    assert len(set(merged.product_ids)) == len(merged.product_ids) == 5
    assert merged.timings_ms == {"retrieval_faiss": 2.5, "retrieval_redis": 4.0}   # the slowest shard per stage
    assert merged.request == lead.request and merged.query == lead.query and merged.model_version == "7"
    assert CandidateSet.from_json(merged.to_json()).to_json() == merged.to_json()   # a message as the topic's


def test_ann_candidates_of_a_shard_on_another_model_version_are_dropped():
    lead = part(0, 2, ann([("a", 0.1)]), version="7")
    swapped = part(1, 2, ann([("d", 0.9)]), version="8")   # another embedding space: scores not comparable
    assert ann_of(merge_parts([lead, swapped], 5)) == {"a": 0.1}


def test_the_on_screen_product_takes_its_slot_in_the_top_k_then_is_dropped_as_with_one_index():
    r = RecommendationRequest(request_id="r9", kind="similar", created_at=time.time(), product_id="q")
    merged = merge_parts([part(0, 2, ann([("q", 1.0), ("a", 0.9)]), req=r), part(1, 2, ann([("d", 0.8)]), req=r)], 2)
    assert ann_of(merged) == {"a": 0.9}   # one index's top 2 is q, a; q is on screen


def test_merging_shard_answers_of_flat_indexes_gives_the_exact_top_k_of_the_whole_catalogue():
    rng = np.random.default_rng(3)
    emb = Embeddings([f"p{i}" for i in range(3000)], rng.normal(size=(3000, 16)).astype(np.float32))
    queries, k = rng.normal(size=(20, 16)).astype(np.float32), 50
    whole = build(emb, "flat", use_gpu=False)
    shards = [build(e, "flat", use_gpu=False) for e in split_by_shard(emb, 3)]
    assert sum(len(s) for s in shards) == 3000 and min(len(s) for s in shards) > 800
    exact_ids, exact_scores = whole.search(queries, k)
    for q in range(len(queries)):
        parts = []
        for i, shard in enumerate(shards):
            ids, scores = shard.search(queries[q:q + 1], k)
            parts.append(part(i, 3, ann(list(zip(ids[0], scores[0].tolist())))))
        got = ann_of(merge_parts(parts, k))
        assert set(got) == set(exact_ids[q])
        np.testing.assert_allclose(sorted(got.values()), sorted(exact_scores[q]), rtol=1e-5)


def test_gather_completes_a_request_with_its_last_shard_and_drops_what_comes_after():
    g = Gather(candidates=0, remember=2)   # k = 1: one ANN candidate a request
    p0, p1 = part(0, 2, ann([("a", 0.5)])), part(1, 2, ann([("d", 0.7)]))
    assert g.offer(p0) == (None, True)
    assert g.offer(dataclasses.replace(p0)) == (None, False)   # a repeat of a part waits on
    merged, first = g.offer(p1)
    assert not first and ann_of(merged) == {"d": 0.7}
    assert g.offer(p1) == (None, False) and g.late == 1 and len(g) == 0
    assert g.expire("r1") is None
    # a request whose wait ends with one shard missing is merged from what came
    g.offer(part(0, 3, ann([("a", 0.5)]), rid="r2"))
    g.offer(part(2, 3, ann([("z", 0.6)]), rid="r2"))
    assert ann_of(g.expire("r2")) == {"z": 0.6} and (g.complete, g.partial) == (1, 1)
    # the memory of merged requests is bounded: the oldest is forgotten
    g.offer(part(0, 1, ann([]), rid="r3"))
    assert g.offer(part(1, 2, ann([]), rid="r1")) == (None, True)


@pytest.fixture
def ranking() -> Ranking:
    r = Ranking(Settings(retrieval_gather_ms=30.0), store=None, models=None)
    yield r
    r.close()


def test_ranking_ranks_a_sharded_request_after_the_gather_wait_with_the_shards_that_answered(ranking):
    """The wait is scheduled, not slept: the test records the delay and ends the wait itself (an injected
    clock and timer: no wall-clock bound a busy machine could break)."""
    submitted: list[list[CandidateSet]] = []
    timers: list[tuple[float, object, tuple]] = []
    ranking.submit = submitted.append
    ranking.later = lambda delay, fn, *args: timers.append((delay, fn, args))
    first = part(0, 2, ann([("a", 0.5)]))
    ranking.clock = lambda: first.request.created_at
    assert ranking._gathered([first]) == [] and not submitted
    [(delay, fn, args)] = timers
    assert delay == pytest.approx(0.030)   # retrieval_gather_ms, well inside the deadline
    fn(*args)                              # the wait ends with one shard's answer
    [(merged,)] = submitted
    assert merged.shards == 1 and ann_of(merged) == {"a": 0.5} and ranking.gather.partial == 1
    # both parts in: ranked at once; the wait the first part started then finds nothing left to submit
    whole = ranking._gathered([part(1, 2, ann([("d", 0.7)]), rid="r2"), part(0, 2, ann([("a", 0.5)]), rid="r2")])
    assert len(whole) == 1 and ann_of(whole[0]) == {"d": 0.7, "a": 0.5}
    _, fn, args = timers[-1]
    fn(*args)
    assert len(submitted) == 1 and ranking.gather.partial == 1


def test_the_gather_wait_never_runs_past_the_requests_deadline(ranking):
    timers: list[float] = []
    ranking.later = lambda delay, fn, *args: timers.append(delay)
    tight = part(0, 2, ann([("a", 0.5)]), deadline_ms=10)   # 10 ms - 5 ms reserve left
    ranking.clock = lambda: tight.request.created_at
    ranking._gathered([tight])
    ranking.clock = lambda: tight.request.created_at + 1.0   # a second late: no wait at all
    ranking._gathered([part(0, 2, ann([("a", 0.5)]), rid="r9", req=dataclasses.replace(tight.request, request_id="r9"))])
    assert timers == [pytest.approx(0.005, abs=1e-5), 0.0]


async def test_the_scheduled_wait_fires_on_the_event_loop(ranking):
    """The real timer: the merge is submitted after the wait (a "never hangs" bound, not a latency bound)."""
    submitted: list[list[CandidateSet]] = []
    ranking.submit = submitted.append
    ranking._gathered([part(0, 2, ann([("a", 0.5)]))])
    for _ in range(500):
        if submitted:
            break
        await asyncio.sleep(0.01)
    assert submitted and ann_of(submitted[0][0]) == {"a": 0.5}
