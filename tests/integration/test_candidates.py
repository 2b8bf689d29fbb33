"""One candidate stage, two stores: the trainer's replay and serving's Redis propose the same candidates.

The generated shop's first 70 % of events are folded both ways: into a Redis namespace by the feature
agents' own `plan` (what serving reads), and through `apply` into the trainer's replay
(batch.ranker.ReplayState). At that moment the retrieval agent answers homepage and cart requests
through Redis and FAISS, and the trainer's path (recstream.candidates over the replay) answers the
same requests: the candidate sets, each source's scores and anchors must be identical.
"""
import dataclasses

import numpy as np
import pytest

from agents.models import ModelHolder, ServingModel
from agents.retrieval import Retrieval
from batch.publish import publish
from batch.ranker import ItemTable, Popularity, ReplayState
from models import index as faiss_index
from models.artifacts import BatchOutputs, Embeddings, Window
from recstream import candidates
from recstream.data import ShopConfig, shop_dataset
from recstream.features.config import feature_config, limits
from recstream.features.plan import Incoming, plan
from recstream.features.session import UserState, apply
from recstream.gather import ann_k
from schemas import CandidateSet, RecommendationRequest
from schemas.recommendations import SOURCES
from streams.online_store import open_store, unlink_matching
from streams.redisconn import connect

RANK = 16


@pytest.fixture
def shop_state(fresh):
    # sessions idle out after a day here, so that at the moment of the requests some are live and some not
    s = fresh(cooccurrence_max_per_item=100_000, retrieval_candidates=40, retrieval_shards=1, retrieval_shard=0,
              session_idle_timeout_s=86_400.0)
    data = shop_dataset(ShopConfig(users=80, products=250, seed=11, end_s=1_764_000_000.0))
    events = data.events[: int(len(data.events) * 0.7)]
    rng = np.random.default_rng(11)
    users = sorted({e.user_id for e in events})
    items = [p.product_id for p in data.products]
    knn = {}   # item kNN lists for most items, best first (what the batch job would hand the version)
    for a in items[:200]:
        scores = np.sort(rng.random(30))[::-1]
        knn[a] = [(b, float(x)) for b, x in zip(rng.choice(items, 30, replace=False), scores) if b != a]
    out = BatchOutputs(Window(events[0].timestamp, events[-1].timestamp),
                       Embeddings(users[::2], rng.normal(size=(len(users[::2]), RANK))),   # half the users are unknown
                       Embeddings(items, rng.normal(size=(len(items), RANK))), knn, {}, {}, {}, {})
    return s, data, events, out


async def test_the_replay_and_redis_propose_identical_candidates(shop_state):
    s, data, events, out = shop_state
    cfg, lim = feature_config(s), dataclasses.replace(limits(s), session_ttl_s=30 * 86_400)
    client = connect(s)
    store = open_store(s, client, group=f"{s.app_id}-features")
    try:
        # serving's state: the feature agents' writes (expiry dropped: the shop's clock is in the past)
        await store.write_items(data.products)
        states: dict[str, UserState] = {}
        for start in range(0, len(events), 500):
            result = plan([Incoming(e, 0, start + i) for i, e in enumerate(events[start:start + 500])], states, {}, {},
                          cfg, lim)
            result.ops.expire_at.clear()
            await store.apply(result.ops)
            states.update(result.states)
        await publish(s, s.model_name, "7", out, progress=lambda m: None, announce=False)
        holder = ModelHolder(s, "retrieval")
        holder.current = ServingModel("7", index=faiss_index.build(out.item_embeddings, "flat"),
                                      knn=candidates.ItemLists(out.knn))
        retrieval = Retrieval(s, store, holder)
        now = events[-1].timestamp + 60
        retrieval.clock = lambda: now

        # the trainer's state: the same events through apply and the replay's counters
        table = ItemTable(data.products, out)
        replay = ReplayState(table, Popularity(len(table.ids), s.popularity_window_days, s.trending_half_life_s,
                                               cfg.weights), s.trending_half_life_s, candidates.ItemLists(out.knn))
        mine: dict[str, UserState] = {}
        for e in events:
            update = apply(mine.get(e.user_id, UserState()), e, cfg, e.category)
            if not update.duplicate:
                mine[e.user_id] = update.state
                replay.fold(update.covisits, update.copurchases, table.index.get(e.product_id), e)
        assert mine == {u: dataclasses.replace(st, partition=-1, offset=-1) for u, st in states.items()}

        requests = []
        for n, user in enumerate(sorted(mine)[:30]):
            requests.append(RecommendationRequest(request_id=f"h{n}", kind="homepage", created_at=now, user_id=user))
            basket = tuple(dict.fromkeys((*mine[user].cart, *mine[user].recent)))[:3]
            if basket:
                requests.append(RecommendationRequest(request_id=f"c{n}", kind="cart", created_at=now, user_id=user,
                                                      cart_items=basket))
        assert sum(r.kind == "cart" for r in requests) >= 10
        live = knn = 0
        users = out.user_embeddings.index()
        for r in requests:
            [sent] = await retrieval.handle([r])
            served = CandidateSet.from_json(sent.value, now=now)

            shopper = candidates.Shopper.from_state(mine[r.user_id], now, s.session_idle_timeout_s)
            live += bool(shopper.recent)
            u = users.get(r.user_id)
            q = candidates.query(r, shopper, out.user_embeddings.vectors[u] if u is not None else None, replay.vector)
            reads = candidates.plan(r, shopper, replay.anchor_items(candidates.anchors(r)), SOURCES)
            replayed = candidates.propose(r, shopper, reads, replay.answer(reads, now), SOURCES)
            if q.vector is not None:
                candidates.add_ann(replayed, replay.nearest(q.vector, ann_k(r, s.retrieval_candidates)), q.anchor)
            ids, scores, anchors = replayed.columns()

            assert list(served.product_ids) == ids, r
            assert set(served.scores) == set(scores) and set(served.anchors) == set(anchors), r
            for source, col in scores.items():
                want = np.array([np.nan if x is None else x for x in col])
                assert np.allclose(served.scores[source], want, rtol=1e-5, equal_nan=True), (r, source)
                assert list(served.anchors.get(source, [None] * len(ids))) == list(anchors.get(source, [None] * len(ids)))
            assert served.query_source == q.rank_source
            knn += "knn" in served.scores
        assert 5 <= live <= len(requests) - 5   # live sessions and idle ones: session, co-view and trending-in-category reads too
        assert knn >= 10                        # item kNN, from the version's lists
        retrieval.close()
    finally:
        await unlink_matching(client, s.redis_namespace + "*")
        await client.aclose()
