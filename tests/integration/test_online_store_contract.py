"""One contract for the feature store, run on a single Redis and on a three-master Redis Cluster.

The cluster is started by the project's own script (cli.redis_cluster.cluster_up, idempotent),
like every other service: never skipped. Each test writes under a namespace of its own."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from batch.artifacts import BatchOutputs, Embeddings, Window
from batch.publish import publish
from cli import redis_cluster
from recstream.features import Incoming, keys, plan
from recstream.features.config import feature_config, limits
from recstream.features.plan import split_by_tag
from streams.redisconn import connect
from recstream.settings import Settings
from schemas import Event, Product
from streams.online_store import RedisStore, open_store, unlink_matching
from streams.producer import create_producer
from streams.replay import publish as publish_records
from streams.topics import ensure_topics

pytestmark = pytest.mark.integration

T0 = time.time() - 600
FIELDS = ("category", "brand", "price")


@pytest.fixture(scope="session")
def cluster(stack: Settings):
    """The stack's settings pointed at the local Redis Cluster, started if it is not up, and stopped
    after the tests if they started it (a test run leaves the machine's services as it found them)."""
    was_up = redis_cluster.formed(stack)
    redis_cluster.cluster_up(stack, say=lambda _: None)
    yield dataclasses.replace(stack, redis_url=redis_cluster.url(stack), redis_cluster=True)
    if not was_up:
        redis_cluster.cluster_down(stack, say=lambda _: None)


@pytest.fixture(params=["single", "cluster"])
def backend(request, fresh, cluster: Settings):
    """Settings with a fresh namespace on either backend."""
    s = fresh()
    if request.param == "cluster":
        s = dataclasses.replace(s, redis_url=cluster.redis_url, redis_cluster=True)
    return s


@pytest.fixture
async def store(backend: Settings):
    client = connect(backend)
    yield open_store(backend, client)
    assert await unlink_matching(client, backend.redis_namespace + "*") > 0
    assert [k async for k in client.scan_iter(match=backend.redis_namespace + "*")] == []   # every master's
    await client.aclose()


def ev(i: int, user: str, kind: str, pid: str, category: str | None = "Audio", session: str = "s1") -> Event:
    return Event(event_id=f"e{i}", user_id=user, session_id=session, product_id=pid, event_type=kind,
                 timestamp=T0 + i, category=category)


def product(pid: str, category: str, in_stock: bool = True, brand: str = "Nova") -> Product:
    return Product(product_id=pid, title=f"Item {pid}", category_path=("Shop", category), brand=brand,
                   price=10.0, in_stock=in_stock, rating=4.0, created_at=T0 - 86400)


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


async def fold_all(store: RedisStore, s: Settings, batch: list[Incoming], size: int, states: dict | None = None,
                   applied: dict | None = None) -> dict:
    states = {} if states is None else states
    applied = {} if applied is None else applied
    for i in range(0, len(batch), size):
        result = await store.fold(batch[i:i + size], states, applied, feature_config(s), limits(s))
        states.update(result.states)
    return states


async def dump(store: RedisStore) -> dict:
    """Every key of the namespace and its value (scores rounded: sums of floats in another order)."""
    out = {}
    r = store.redis
    async for raw in r.scan_iter(match=store.ns + "*", count=1000):
        key = raw.decode()
        kind = (await r.type(key)).decode()
        if kind == "zset":
            value = {m.decode(): round(v, 9) for m, v in await r.zrange(key, 0, -1, withscores=True)}
        elif kind == "hash":
            value = {k.decode(): v.decode() for k, v in (await r.hgetall(key)).items()}
        elif kind == "set":
            value = sorted(m.decode() for m in await r.smembers(key))
        else:
            value = (await r.get(key)).decode()
        out[key[len(store.ns):]] = value
    return out


# -- reads after writes ---------------------------------------------------------------------------

async def test_folded_batches_read_back(store: RedisStore, backend: Settings):
    s = backend
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
    now = time.time()
    assert await store.user_session("u1") == ["p3", "p2", "p1"]
    f = await store.user_features("u1")
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


async def test_ranking_reads_embeddings_and_the_homepage_cache(store: RedisStore, backend: Settings):
    s = backend
    await store.write_items([product("p1", "Audio"), product("p2", "Phones", in_stock=False)])
    await fold_all(store, s, [Incoming(ev(1, "u1", "view", "p1"), 0, 0), Incoming(ev(2, "u1", "purchase", "p1"), 0, 1)], 10)
    users = Embeddings(["u1"], np.arange(4, dtype=np.float32).reshape(1, 4))
    items = Embeddings(["p1", "p2"], np.ones((2, 4), dtype=np.float32))
    out = BatchOutputs(Window(0, 1, 10), users, items, {}, {}, {"u1": {"Audio": 1.0}}, {"p1": 3.0},
                       {"u1": 19.5}, {"p1": "Audio"})
    await publish(s, "m", "7", out, progress=lambda _: None, announce=False)
    assert (await store.model_pointer())["version"] == "7"
    vecs = await store.embeddings("item", "7", ["p1", "p9", "p2"])
    assert vecs[0].tolist() == [1.0] * 4 and vecs[1] is None and vecs[2].tolist() == [1.0] * 4
    assert (await store.embeddings("user", "7", ["u1"]))[0].tolist() == [0.0, 1.0, 2.0, 3.0]

    now = time.time()
    reads = await store.ranking_reads(["p1", "p2", "p9"], ["p1", "p9"], FIELDS, ["p1", "p2"], "u1", "7", now,
                                      s.popularity_window_days, s.trending_half_life_s)
    assert reads.in_stock == [True, False, True]
    assert reads.item_rows == [["Audio", "Nova", "10.0"], [None, None, None]]
    assert reads.popularity_7d.tolist() == [1.0, 0.0] and reads.purchases_7d.tolist() == [1.0, 0.0]
    assert reads.trending[0] > 0 and reads.trending[1] == 0
    assert reads.features["purchases"] == ["p1"] and reads.recent == ["p1"]
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


# -- exactly once ---------------------------------------------------------------------------------

async def test_a_batch_applied_twice_or_replayed_with_other_boundaries_counts_once(store: RedisStore,
                                                                                   backend: Settings):
    batch = events()
    await fold_all(store, backend, batch, size=len(batch))
    once = await dump(store)
    await fold_all(store, backend, batch, size=len(batch))          # the same batch again (a fresh worker)
    assert await dump(store) == once
    await fold_all(store, backend, batch, size=37)                  # again, in other batches
    assert await dump(store) == once
    await fold_all(store, backend, batch[:50], size=50)             # a worker died after 50 ...
    await fold_all(store, backend, batch, size=64)                  # ... and its successor starts over
    assert await dump(store) == once


async def test_a_zombie_writing_between_our_read_and_our_write_does_not_regress_the_state(store: RedisStore,
                                                                                          backend: Settings):
    """A rebalance: the old owner of a partition, still folding (a zombie), applies offsets 0-5 after the
    new owner read its states and before it writes; the new owner's consumer skipped offset 3 (faust's
    seek), so its batch alone would fold a state without that event. Its write meets the moved guard, and
    it replans from the applied offsets *and* the states the zombie wrote: every event is in the state."""
    s = backend
    cfg, lim = feature_config(s), limits(s)
    batch = [Incoming(ev(i, "u1", ("view", "add_to_cart")[i == 3], f"p{i}"), 0, i) for i in range(6)]
    zombie = await store.fold(batch, {}, {}, cfg, lim)     # the old owner: every event
    mine = await store.fold([b for b in batch if b.offset != 3], {}, {0: -1}, cfg, lim)   # read before its write
    assert mine.states["u1"] == zombie.states["u1"] and mine.states["u1"].cart == ("p3",)
    assert (await store.user_states(["u1"]))["u1"] == zombie.states["u1"]
    assert (await store.user_features("u1"))["cart_items"] == ["p3"]



@pytest.mark.parametrize("applied_share", [0.0, 0.3, 1.0])
async def test_a_half_applied_batch_on_the_cluster_completes_exactly_once(cluster, fresh, applied_share):
    """A worker died between a batch's groups: the guards of the applied ones make its replay skip
    exactly those. (A single Redis applies a batch in one script: there is no half to test.)"""
    s = dataclasses.replace(fresh(), redis_url=cluster.redis_url, redis_cluster=True)
    client = connect(s)
    once_store = open_store(s, client, namespace=s.redis_namespace + "once:")
    half_store = open_store(s, client, namespace=s.redis_namespace + "half:")
    try:
        batch = events()
        await fold_all(once_store, s, batch, size=len(batch))
        groups = split_by_tag(plan(batch, {}, {}, {}, feature_config(s), limits(s)).ops)
        some = dict(list(groups.items())[: int(len(groups) * applied_share)])
        assert await half_store.apply_groups(some) == {}
        assert await half_store.applied_offsets(range(4)) == {p: -1 for p in range(4)}   # not advanced yet
        await fold_all(half_store, s, batch, size=len(batch))
        assert await dump(half_store) == await dump(once_store)
        assert await half_store.applied_offsets(range(4)) == await once_store.applied_offsets(range(4))
    finally:
        await unlink_matching(client, s.redis_namespace + "*")
        await client.aclose()


# -- the layout on the cluster --------------------------------------------------------------------

async def test_one_users_keys_share_a_slot_and_the_keys_spread_over_the_masters(cluster, fresh):
    s = dataclasses.replace(fresh(), redis_url=cluster.redis_url, redis_cluster=True)
    client = connect(s)
    store = open_store(s, client)
    try:
        await store.write_items([product(f"p{i}", "Audio") for i in range(40)])
        await fold_all(store, s, events(), size=100)
        ns = s.redis_namespace
        user_keys = [ns + keys.user_session("u3"), ns + keys.user_features("u3"), ns + keys.guard("u3"),
                     ns + keys.homecache("u3", "-", 10, "web", "home")]
        assert len({await client.cluster_keyslot(k) for k in user_keys}) == 1
        assert await client.exists(*user_keys[:3]) == 3
        item_keys = [ns + keys.item_features("p3"), ns + keys.neighbours("covis", "p3"), ns + keys.embedding("item", "1", "p3")]
        assert len({await client.cluster_keyslot(k) for k in item_keys}) == 1
        nodes = {}
        async for raw in client.scan_iter(match=ns + "*", count=1000):
            nodes.setdefault(client.get_node_from_key(raw.decode()).name, 0)
            nodes[client.get_node_from_key(raw.decode()).name] += 1
        assert len(nodes) == 3 and min(nodes.values()) > 10, nodes
    finally:
        await unlink_matching(client, s.redis_namespace + "*")
        await client.aclose()


def test_cluster_up_is_idempotent_and_status_reports(cluster):
    before = {svc.name: svc.own_pid() for svc in redis_cluster.nodes(cluster)}
    cli = [sys.executable, "-m", "cli.main", "services"]
    out = subprocess.run([*cli, "cluster-up"], capture_output=True, text=True, check=True).stdout
    assert "redis cluster: ok" in out and "creating" not in out and "node started" not in out, out
    assert {svc.name: svc.own_pid() for svc in redis_cluster.nodes(cluster)} == before
    status = subprocess.run([*cli, "cluster-status"], capture_output=True, text=True, check=True).stdout
    assert "redis-cluster        ok" in status and "stopped" not in status, status


# -- end to end: the real feature worker on the cluster -------------------------------------------

async def test_the_feature_worker_on_the_cluster(cluster, fresh, tmp_path):
    s = dataclasses.replace(fresh(home_dir=tmp_path), redis_url=cluster.redis_url, redis_cluster=True)
    await ensure_topics(s)
    env = {**os.environ, "RECSTREAM_TOPIC_PREFIX": s.topic_prefix, "RECSTREAM_APP_ID": s.app_id,
           "RECSTREAM_HOME_DIR": str(s.home_dir), "RECSTREAM_REDIS_NAMESPACE": s.redis_namespace,
           "RECSTREAM_CLICKSTREAM_PARTITIONS": str(s.clickstream_partitions),
           "RECSTREAM_REDIS_URL": s.redis_url, "RECSTREAM_REDIS_CLUSTER": "1"}
    log_path = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "features"], env=env,
                              stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    client = connect(s)
    store = open_store(s, client)
    producer = create_producer(s)
    await producer.start()
    try:
        catalogue = [product(f"p{i}", ("Audio", "Phones")[i % 2]) for i in range(40)]
        batch = events()
        await publish_records(producer, s.topic("catalogue"), catalogue, progress=False)
        await publish_records(producer, s.topic("clickstream"), [i.event for i in batch], progress=False)
        want = plan([Incoming(i.event, 0, n) for n, i in enumerate(batch)], {}, {}, {}, feature_config(s), limits(s))
        deadline = time.monotonic() + 90
        while sum(v + 1 for v in (await store.applied_offsets(range(4))).values() if v >= 0) < len(batch):
            assert time.monotonic() < deadline and worker.poll() is None, log_path.read_text()[-3000:]
            await asyncio.sleep(0.2)
        for user, state in want.states.items():
            assert await store.user_session(user) == list(state.recent), user
            assert (await store.user_features(user))["purchases"] == list(state.purchases), user
        by_key: dict[str, dict[str, float]] = {}
        for (key, member), delta in want.ops.incr.items():
            by_key.setdefault(key, {})[member] = delta
        for key, members in by_key.items():
            got = {m.decode(): v for m, v in await client.zrange(s.redis_namespace + key, 0, -1, withscores=True)}
            assert got == pytest.approx(members, rel=1e-9), key
        assert (await store.item_features("p5"))["category"] == "Phones"
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        await producer.stop()
        await unlink_matching(client, s.redis_namespace + "*")
        await client.aclose()
