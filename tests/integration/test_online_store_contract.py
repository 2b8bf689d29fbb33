"""The store's contract (tests/store_contract.py) on a single Redis and on a three-master Redis Cluster,
with what only Redis shows: the keys themselves, and the cluster's slots and half-applied batches.

The cluster (free ports, a tmp home: this session's own) is started by the project's own script
(cli.redis_cluster.cluster_up) like every other service, never skipped, and stopped after. Each test
writes under a namespace of its own."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from cli import redis_cluster
from recstream.features import Incoming, keys, plan
from recstream.features.config import feature_config, limits
from recstream.features.plan import split_by_tag
from recstream.settings import Settings
from streams.online_store import RedisStore, open_store, unlink_matching
from streams.producer import create_producer
from streams.redisconn import connect
from streams.replay import publish as publish_records
from streams.topics import ensure_topics
from tests import store_contract as contract
from tests.store_contract import events, fold_all, product

pytestmark = pytest.mark.integration


def _cluster_ports(n: int = 3) -> str:
    """n loopback ports that are free, each with its cluster-bus port (+10000)."""
    def free(port: int) -> bool:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True
    ports: list[int] = []
    while len(ports) < n:
        p = random.randrange(20_000, 30_000)
        if p not in ports and free(p) and free(p + redis_cluster.BUS_OFFSET):
            ports.append(p)
    return ",".join(map(str, ports))


@pytest.fixture(scope="session")
def cluster(stack: Settings, tmp_path_factory):
    """The stack's settings pointed at a Redis Cluster of this session's own (free ports, a tmp home),
    started by the project's script and stopped after the tests: a cluster the user started on the
    configured ports, or another test run's, is neither used nor stopped (a test run leaves the
    machine's services as it found them)."""
    s = dataclasses.replace(stack, home_dir=tmp_path_factory.mktemp("redis-cluster"), redis_cluster_ports=_cluster_ports())
    redis_cluster.cluster_up(s, say=lambda _: None)
    try:
        yield dataclasses.replace(s, redis_url=redis_cluster.url(s), redis_cluster=True)
    finally:
        redis_cluster.cluster_down(s, say=lambda _: None)


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
    assert [k async for k in client.scan_iter(match=backend.redis_namespace + "*", count=1000)] == []   # every master's
    await client.aclose()


async def dump(store: RedisStore) -> dict[str, Any]:
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


# -- the contract (tests/store_contract.py, also run over the memory store) -------------------------

CHECKS = [contract.folded_batches_read_back, contract.ranking_reads_embeddings_and_the_homepage_cache,
          contract.a_zombie_does_not_regress_the_state, contract.the_serving_path,
          contract.erasing_a_user_removes_their_keys_and_only_theirs]


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
async def test_the_store_keeps_the_contract(check, store: RedisStore, backend: Settings):
    await check(store, backend)


async def test_a_batch_applied_twice_or_replayed_with_other_boundaries_counts_once(store: RedisStore,
                                                                                   backend: Settings):
    """Through the reads, and key by key."""
    await contract.replays_count_once(store, backend, raw=lambda: dump(store))


# -- exactly once on the cluster ------------------------------------------------------------------

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
    env = {**os.environ, "RECSTREAM_HOME_DIR": str(cluster.home_dir),
           "RECSTREAM_REDIS_CLUSTER_PORTS": cluster.redis_cluster_ports}
    out = subprocess.run([*cli, "cluster-up"], capture_output=True, text=True, check=True, env=env).stdout
    assert "redis cluster: ok" in out and "creating" not in out and "node started" not in out, out
    assert {svc.name: svc.own_pid() for svc in redis_cluster.nodes(cluster)} == before
    status = subprocess.run([*cli, "cluster-status"], capture_output=True, text=True, check=True, env=env).stdout
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
