"""The online store's contract: checks every implementation of streams.store.Store passes, through its
methods only. Run over the memory store by tests/unit/test_store_contract.py (no service) and over a single
Redis and a Redis Cluster by tests/integration/test_online_store_contract.py."""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from batch.publish import publish
from models.artifacts import BatchOutputs, Embeddings, Window
from recstream.candidates import Read
from recstream.features import Incoming
from recstream.features.config import feature_config, limits
from recstream.settings import Settings
from streams.store import Store
from tests import factories
from tests.factories import bind, event

T0 = time.time() - 600
NOW = T0 + 600   # "now" for reads and folds: ten minutes after the events, however late the test runs
FIELDS = ("category", "brand", "price")
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")


ev = bind(event, "i", "user", "kind", "pid", "category", "session", t0=T0, category="Audio")
product = bind(factories.product, "pid", "category", "in_stock", "brand", rating=4.0, created_at=T0 - 86400)


def events(n_users: int = 30, per_user: int = 6) -> list[Incoming]:
    """Users on four partitions viewing, carting and buying among 40 products, interleaved."""
    out = []
    offsets = [0, 0, 0, 0]
    for j in range(per_user):
        for u in range(n_users):
            kind = ("view", "view", "click", "add_to_cart", "purchase", "purchase")[j % 6]
            p = u % 4
            out.append(Incoming(ev(j * n_users + u, f"u{u}", kind, f"p{(u * 7 + j * 3) % 40}",
                                   category=("Audio", "Phones")[(u + j) % 2]), p, offsets[p]))
            offsets[p] += 1
    return out


async def fold_all(store: Store, s: Settings, batch: list[Incoming], size: int, states: dict | None = None,
                   applied: dict | None = None) -> dict:
    states = {} if states is None else states
    applied = {} if applied is None else applied
    for i in range(0, len(batch), size):
        result = await store.fold(batch[i:i + size], states, applied, feature_config(s), limits(s))
        states.update(result.states)
    return states


def _rounded(rows: list[tuple[str, float]] | dict[str, float]) -> dict[str, float]:
    """Scores rounded (sums of floats in another order), ties in any order."""
    return {k: round(v, 9) for k, v in (rows.items() if isinstance(rows, dict) else rows)}


async def readback(store: Store, s: Settings, batch: list[Incoming], now: float) -> dict[str, Any]:
    """What the store answers about a batch's users and products, through its reads."""
    users = sorted({i.event.user_id for i in batch})
    products = sorted({i.event.product_id for i in batch})
    half_life = s.trending_half_life_s
    return {
        "sessions": {u: await store.user_session(u) for u in users},
        "features": {u: await store.user_features(u) for u in users},
        "states": await store.user_states(users),
        "covis": {p: _rounded(await store.neighbours("covis", p, 400)) for p in products},
        "cobuy": {p: _rounded(await store.neighbours("cobuy", p, 400)) for p in products},
        "popularity": {k: _rounded(await store.popularity(k, now, 7, products)) for k in EVENT_TYPES},
        "trending": {c: _rounded(await store.trending(now, half_life, 100, category=c))
                     for c in (None, "Audio", "Phones")},
        "offsets": await store.applied_offsets({i.partition for i in batch}),
    }


# -- the checks ------------------------------------------------------------------------------------

async def folded_batches_read_back(store: Store, s: Settings) -> None:
    await store.write_items([product("p1", "Audio"), product("p2", "Audio", brand="Vox"),
                             product("p3", "Phones", in_stock=False), product("p4", "Cables")])
    batch = [Incoming(e, p, o) for o, (p, e) in enumerate([
        (0, ev(1, "u1", "view", "p1", category=None)),   # category filled in from item_features
        (0, ev(2, "u1", "view", "p2")),
        (1, ev(3, "u2", "view", "p2")),
        (1, ev(4, "u2", "view", "p1")),
        (0, ev(5, "u1", "click", "p3", "Phones")),
        (0, ev(6, "u1", "purchase", "p2")),
        (0, ev(7, "u1", "purchase", "p4", "Cables")),
    ])]
    await fold_all(store, s, batch, size=3)
    now = NOW
    assert await store.user_session("u1") == ["p3", "p2", "p1"]
    f = await store.user_features("u1")
    assert f is not None
    assert f["purchases"] == ["p4", "p2"] and f["session_categories"] == {"Audio": 2, "Phones": 1}
    assert await store.user_features("nobody") is None
    assert (await store.item_features("p3"))["category"] == "Phones"
    assert dict(await store.neighbours("covis", "p2")) == {"p1": 2.0, "p3": 1.0}
    assert dict(await store.neighbours("cobuy", "p4")) == {"p2": 1.0}
    assert await store.popularity("view", now, 7, ["p1", "p2", "p3"]) == {"p1": 2.0, "p2": 2.0, "p3": 0.0}
    assert [p for p, _ in await store.trending(now, s.trending_half_life_s, n=2)][0] == "p2"
    assert {p for p, _ in await store.trending(now, s.trending_half_life_s, category="Audio")} == {"p1", "p2"}
    assert await store.in_stock(["p1", "p3", "p9"]) == [True, False, True]
    assert await store.item_rows(["p2", "p9"], FIELDS) == [["Audio", "Vox", "10.0"], [None, None, None]]
    assert await store.categories(["p1", "p3", "p9"]) == {"p1": "Audio", "p3": "Phones"}
    assert await store.existing_items(["p1", "p9", "p4"]) == {"p1", "p4"}
    assert await store.applied_offsets([0, 1, 2]) == {0: 6, 1: 3, 2: -1}
    # the candidate stage's lists: neighbours, the brand's items by rating, trending decayed to now
    covis, brand, trend, none = await store.candidate_reads(
        [Read("also", "covis", "p2", 5), Read("brand", "brand", "Vox", 5), Read("pop", "trend", "Audio", 1),
         Read("bought", "cobuy", "p9", 5)],
        now, s.trending_half_life_s)
    assert covis == [("p1", 2.0), ("p3", 1.0)] and brand == [("p2", 4.0)] and none == []
    assert [p for p, _ in trend] == [p for p, _ in await store.trending(now, s.trending_half_life_s, 1, "Audio")]


async def ranking_reads_embeddings_and_the_homepage_cache(store: Store, s: Settings) -> None:
    await store.write_items([product("p1", "Audio"), product("p2", "Phones", in_stock=False)])
    await fold_all(store, s, [Incoming(ev(1, "u1", "view", "p1"), 0, 0), Incoming(ev(2, "u1", "purchase", "p1"), 0, 1)],
                   10)
    users = Embeddings(["u1"], np.arange(4, dtype=np.float32).reshape(1, 4))
    items = Embeddings(["p1", "p2"], np.ones((2, 4), dtype=np.float32))
    out = BatchOutputs(Window(0, 1, 10), users, items, {}, {}, {"u1": {"Audio": 1.0}}, {"p1": 3.0},
                       {"u1": 19.5}, {"p1": "Audio"})
    await publish(s, "m", "7", out, progress=lambda _: None, announce=False, store=store)
    pointer = await store.model_pointer()
    assert pointer is not None and pointer["version"] == "7"
    vecs = await store.embeddings("item", "7", ["p1", "p9", "p2"])
    assert vecs[0] is not None and vecs[0].tolist() == [1.0] * 4 and vecs[1] is None
    assert vecs[2] is not None and vecs[2].tolist() == [1.0] * 4
    assert [v.tolist() for v in await store.embeddings("user", "7", ["u1"]) if v is not None] == [[0.0, 1.0, 2.0, 3.0]]
    got = await store.retrieval_reads("u1", ["p1", "p9"], "7")
    assert got.user_vector is not None and got.user_vector.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert got.session == ["p1"] and got.features is not None and got.features["purchases"] == ["p1"]
    assert [v is not None for v in got.anchor_vectors] == [True, False]
    assert got.anchor_items[0]["category"] == "Audio" and got.anchor_items[1] == {}

    now = NOW
    reads = await store.ranking_reads(["p1", "p2", "p9"], ["p1", "p9"], FIELDS, ["p1", "p2"], "u1", "7", now,
                                      s.popularity_window_days, s.trending_half_life_s)
    assert reads.in_stock == [True, False, True]
    assert reads.item_rows == [["Audio", "Nova", "10.0"], [None, None, None]]
    assert reads.popularity_7d.tolist() == [1.0, 0.0] and reads.purchases_7d.tolist() == [1.0, 0.0]
    assert reads.trending[0] > 0 and reads.trending[1] == 0
    assert reads.features is not None and reads.features["purchases"] == ["p1"] and reads.recent == ["p1"]
    assert reads.affinity == {"Audio": 1.0} and reads.median_price == 19.5
    empty = await store.ranking_reads([], [], FIELDS, [], None, None, now, 7, 3600.0)
    assert empty.in_stock == [] and empty.item_rows == [] and empty.features is None

    key = store.homepage_key("u1", "-", 10, "web", "home")
    assert (await store.homepage_cached(key, "u1"))[0] is None
    _, tag = await store.homepage_cached(key, "u1")
    await store.cache_homepage(key, tag, b"reply", 60)
    assert await store.homepage_cached(key, "u1") == (b"reply", tag)
    await fold_all(store, s, [Incoming(ev(3, "u1", "view", "p2"), 0, 2)], 10, applied={0: 1})
    assert (await store.homepage_cached(key, "u1"))[0] is None   # a new event invalidates it
    _, tag = await store.homepage_cached(key, "u1")
    await store.cache_homepage(key, tag, b"reply", 60)
    await publish(s, "m", "8", out, progress=lambda _: None, announce=False, store=store)
    assert (await store.homepage_cached(key, "u1"))[0] is None   # so does a new model
    # a third version: the one before the current stays for requests in flight, older ones go
    published = await publish(s, "m", "9", out, progress=lambda _: None, announce=False, store=store)
    assert published.removed_versions == ["7"] and (await store.embeddings("item", "7", ["p1"])) == [None]
    assert (await store.embeddings("item", "8", ["p1"]))[0] is not None


async def replays_count_once(store: Store, s: Settings,
                             raw: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> None:
    """`raw`: a dump of the store's keys, compared too where there is one (Redis)."""
    batch = events()
    now = NOW

    async def readback_and_raw() -> tuple[dict[str, Any], dict[str, Any] | None]:
        return await readback(store, s, batch, now), await raw() if raw else None

    await fold_all(store, s, batch, size=len(batch))
    once = await readback_and_raw()
    assert once[0]["offsets"] == {p: max(i.offset for i in batch if i.partition == p) for p in range(4)}
    assert all(once[0]["sessions"].values()) and sum(map(len, once[0]["covis"].values())) > 0
    await fold_all(store, s, batch, size=len(batch))          # the same batch again (a fresh worker)
    assert await readback_and_raw() == once
    await fold_all(store, s, batch, size=37)                  # again, in other batches
    assert await readback_and_raw() == once
    await fold_all(store, s, batch[:50], size=50)             # a worker died after 50 ...
    await fold_all(store, s, batch, size=64)                  # ... and its successor starts over
    assert await readback_and_raw() == once


async def a_zombie_does_not_regress_the_state(store: Store, s: Settings) -> None:
    """A rebalance: the old owner of a partition, still folding (a zombie), applies offsets 0-5 after the
    new owner read its states and before it writes; the new owner's consumer skipped offset 3 (faust's
    seek), so its batch alone would fold a state without that event. Its write meets the moved guard, and
    it replans from the applied offsets *and* the states the zombie wrote: every event is in the state."""
    cfg, lim = feature_config(s), limits(s)
    batch = [Incoming(ev(i, "u1", ("view", "add_to_cart")[i == 3], f"p{i}"), 0, i) for i in range(6)]
    zombie = await store.fold(batch, {}, {}, cfg, lim)     # the old owner: every event
    mine = await store.fold([b for b in batch if b.offset != 3], {}, {0: -1}, cfg, lim)   # read before its write
    assert mine.states["u1"] == zombie.states["u1"] and mine.states["u1"].cart == ("p3",)
    assert (await store.user_states(["u1"]))["u1"] == zombie.states["u1"]
    features = await store.user_features("u1")
    assert features is not None and features["cart_items"] == ["p3"]


async def the_serving_path(store: Store, s: Settings) -> None:
    """Agents report; the API reads the reports and the pointer, and forgets agents gone long enough."""
    now = NOW
    assert await store.serving_path(60.0, now) == ({}, None)
    await store.report_agent("retrieval:h:1", now - 100, "7")
    await store.report_agent("ranking:h:2", now - 1, None)
    await store.set_model_pointer({"name": "m", "version": "7"})
    reports, pointer = await store.serving_path(60.0, now)
    assert reports == {"retrieval:h:1": {"ts": now - 100, "model_version": "7"},
                       "ranking:h:2": {"ts": now - 1, "model_version": None}}
    assert pointer == {"name": "m", "version": "7"}
    assert (await store.serving_path(60.0, now))[0] == {"ranking:h:2": {"ts": now - 1, "model_version": None}}
    await store.forget_agent("ranking:h:2")
    assert (await store.serving_path(60.0, now))[0] == {}


async def erasing_a_user_removes_their_keys_and_only_theirs(store: Store, s: Settings) -> None:
    """An erasure: the erased set answers, and every per-user key of the user goes (session, features,
    state, the homepage cache, the vectors and offline features of every published version); another
    user's keys and the global counts stay. A second erasure deletes nothing."""
    await store.write_items([product("p1", "Audio"), product("p2", "Audio")])
    await fold_all(store, s, [Incoming(ev(1, "u1", "view", "p1"), 0, 0), Incoming(ev(2, "u2", "view", "p2"), 0, 1),
                              Incoming(ev(3, "u1", "purchase", "p2"), 0, 2)], 10)
    users = Embeddings(["u1", "u2"], np.ones((2, 4), dtype=np.float32))
    items = Embeddings(["p1", "p2"], np.ones((2, 4), dtype=np.float32))
    out = BatchOutputs(Window(0, 1, 10), users, items, {}, {}, {"u1": {"Audio": 1.0}, "u2": {"Audio": 1.0}},
                       {"p1": 3.0}, {"u1": 19.5, "u2": 5.0}, {"p1": "Audio"})
    for version in ("7", "8"):   # two published versions: the one serving and the one before it
        await publish(s, "m", version, out, progress=lambda _: None, announce=False, store=store)
    for user in ("u1", "u2"):
        key = store.homepage_key(user, "-", 10, "web", "home")
        _, tag = await store.homepage_cached(key, user)
        await store.cache_homepage(key, tag, b"reply", 60)

    assert await store.erased(["u1", "u2"]) == set()
    assert await store.mark_erased(["u1"]) == 1 and await store.mark_erased(["u1"]) == 0
    assert await store.erased(["u1", "u2", "u3"]) == {"u1"} and await store.erased([]) == set()
    # session, features, state, 1 homepage cache, 2 versions x (vector + offline features)
    assert await store.erase_users(["u1"]) == 3 + 1 + 2 * 2
    assert await store.erase_users(["u1"]) == 0                        # a second erasure: nothing left
    assert await store.user_session("u1") == [] and await store.user_features("u1") is None
    assert await store.user_states(["u1"]) == {}
    assert await store.embeddings("user", "7", ["u1"]) == [None] and await store.embeddings("user", "8", ["u1"]) == [None]
    assert (await store.homepage_cached(store.homepage_key("u1", "-", 10, "web", "home"), "u1"))[0] is None
    reads = await store.ranking_reads([], [], FIELDS, [], "u1", "8", NOW, 7, 3600.0)
    assert reads.features is None and reads.recent == [] and reads.affinity == {} and reads.median_price is None
    # the other shopper, the items and the counts are untouched
    assert await store.user_session("u2") == ["p2"]
    assert (await store.embeddings("user", "8", ["u2"]))[0] is not None
    assert (await store.homepage_cached(store.homepage_key("u2", "-", 10, "web", "home"), "u2"))[0] == b"reply"
    assert (await store.embeddings("item", "8", ["p1"]))[0] is not None
    assert await store.popularity("view", NOW, 7, ["p1", "p2"]) == {"p1": 1.0, "p2": 1.0}
    assert await store.erased_users() == {"u1"}
    # what a feature worker deletes on reading an erasure record: the keys it writes, no pass over the keyspace
    assert await store.forget_users(["u2"]) == 3 and await store.forget_users(["u2"]) == 0
    assert await store.user_session("u2") == [] and await store.user_states(["u2"]) == {}
    assert (await store.embeddings("user", "8", ["u2"]))[0] is not None   # left to the erasure's passes
