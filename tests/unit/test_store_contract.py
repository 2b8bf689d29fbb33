"""The store contract (tests/store_contract.py) over the memory store, no service; the same checks run over
a single Redis and a Redis Cluster in tests/integration/test_online_store_contract.py. Then what only the
memory store has to show: expiry by its clock."""
from __future__ import annotations

import pytest

import recstream.settings
from recstream.features import Incoming, keys
from recstream.features.config import feature_config, limits
from recstream.features.plan import RedisOps
from recstream.settings import Settings
from streams.memory_store import MemoryStore
from streams.store import OffsetConflict
from tests import store_contract as contract

CHECKS = [contract.folded_batches_read_back, contract.ranking_reads_embeddings_and_the_homepage_cache,
          contract.replays_count_once, contract.a_zombie_does_not_regress_the_state, contract.the_serving_path,
          contract.erasing_a_user_removes_their_keys_and_only_theirs]


@pytest.fixture
def s() -> Settings:
    return recstream.settings.load({})


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
async def test_the_memory_store_keeps_the_contract(check, s: Settings):
    await check(MemoryStore(), s)


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_keys_expire_by_the_stores_clock(s: Settings):
    clock = Clock(contract.T0 + 10)
    store = MemoryStore(clock)
    batch = [Incoming(contract.ev(1, "u1", "view", "p1"), 0, 0)]
    result = await store.fold(batch, {}, {}, feature_config(s), limits(s))
    assert await store.user_session("u1") == ["p1"]
    session_ttl = result.ops.set[keys.user_session("u1")][1]
    clock.now += session_ttl - 1
    assert await store.user_session("u1") == ["p1"] and await store.user_features("u1") is not None
    clock.now += 1
    assert await store.user_session("u1") == []          # the session is over ...
    assert await store.user_features("u1") is not None   # ... the features last 30 days
    key = store.homepage_key("u1", "-", 10, "web", "home")
    _, tag = await store.homepage_cached(key, "u1")
    await store.cache_homepage(key, tag, b"reply", 60)
    clock.now += 60
    assert await store.homepage_cached(key, "u1") == (None, tag)


async def test_a_batch_at_or_below_an_applied_offset_is_refused_whole():
    store = MemoryStore()
    ops = RedisOps(offsets={0: (0, 4), 1: (0, 2)})
    ops.incr[("pop:{g}:view:1", "p1")] += 1.0
    await store.apply(ops)
    again = RedisOps(offsets={0: (5, 6), 1: (2, 3)})   # partition 1 overlaps what is applied
    again.incr[("pop:{g}:view:1", "p1")] += 1.0
    with pytest.raises(OffsetConflict):
        await store.apply(again)
    assert store.zsets["pop:{g}:view:1"] == {"p1": 1.0} and await store.applied_offsets([0, 1]) == {0: 4, 1: 2}


async def test_a_trim_keeps_the_best_n_once_past_twice_n():
    store = MemoryStore()
    ops = RedisOps()
    for i in range(5):
        ops.incr[(keys.neighbours("covis", "p0"), f"p{i + 1}")] += float(i % 3)   # scores 0 1 2 0 1
    ops.trim[keys.neighbours("covis", "p0")] = 2
    await store.apply(ops)
    # 5 > 2 * 2: the best 2 stay; ties go by member, descending, as ZREVRANGE orders them
    assert await store.neighbours("covis", "p0") == [("p3", 2.0), ("p5", 1.0)]
