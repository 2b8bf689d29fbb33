import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict

import orjson
import redis.asyncio as aioredis

from agents.worker import STALLED
from recstream.data import ShopConfig, shop_dataset
from recstream.features import Incoming, UserState, keys, plan
from recstream.features.config import feature_config, limits
from recstream.features.session import features_value
from streams import lag
from streams.producer import create_producer
from streams.replay import publish
from streams.topics import ensure_topics
from tests.integration.conftest import read_changelog


def start_worker(s, log_path):
    env = {**os.environ, "RECSTREAM_TOPIC_PREFIX": s.topic_prefix, "RECSTREAM_APP_ID": s.app_id,
           "RECSTREAM_HOME_DIR": str(s.home_dir), "RECSTREAM_REDIS_NAMESPACE": s.redis_namespace,
           "RECSTREAM_CLICKSTREAM_PARTITIONS": str(s.clickstream_partitions),
           "RECSTREAM_FEATURE_BATCH_MAX": str(s.feature_batch_max),
           "RECSTREAM_COOCCURRENCE_MAX_PER_ITEM": str(s.cooccurrence_max_per_item),
           "RECSTREAM_WORKER_STALL_TIMEOUT_S": "20"}
    return subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "features"], env=env,
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


async def applied_total(client, s, partitions):
    prefix = s.redis_namespace + keys.applied_prefix(s.app_id, s.topic("clickstream"))
    values = await client.mget([prefix + str(p) for p in range(partitions)])
    return sum(int(v) + 1 for v in values if v is not None)


def expected_state(s, events):
    """The same events folded by the pure core in one batch: what Redis and the table must hold."""
    batch = [Incoming(e, 0, i) for i, e in enumerate(events)]
    return plan(batch, {}, {}, {}, feature_config(s), limits(s))


async def test_worker_killed_mid_stream_recovers_to_the_replayed_state(fresh, tmp_path):
    s = fresh(home_dir=tmp_path, feature_batch_max=100, cooccurrence_max_per_item=100_000)
    await ensure_topics(s)
    data = shop_dataset(ShopConfig(users=120, products=400, seed=21, end_s=float(int(time.time()) - 60)))
    events = data.events
    client = aioredis.from_url(s.redis_url)
    log_path = tmp_path / "worker.log"
    producer = create_producer(s)
    await producer.start()
    worker = start_worker(s, log_path)
    try:
        await publish(producer, s.topic("catalogue"), data.products, progress=False)
        sender = asyncio.create_task(publish(producer, s.topic("clickstream"), events, rate_per_s=3000, progress=False))
        deadline = time.monotonic() + 60
        while await applied_total(client, s, 4) < len(events) // 4:
            assert time.monotonic() < deadline and worker.poll() is None, log_path.read_text()[-3000:]
            await asyncio.sleep(0.05)
        worker.send_signal(signal.SIGKILL)   # mid-stream, no goodbye: offsets uncommitted, changelog unflushed
        worker.wait()
        killed_at = await applied_total(client, s, 4)
        assert killed_at < len(events), "the kill came too late to test anything"
        await sender
        worker = start_worker(s, log_path)
        deadline = time.monotonic() + 240
        restarts = 0
        while lag.total(await lag.group_lag(s, s.app_id, s.topic("clickstream"))) > 0:
            if worker.poll() == STALLED and restarts < 3:  # what a supervisor does (compose: restart policy)
                restarts += 1
                worker = start_worker(s, log_path)
            assert time.monotonic() < deadline and worker.poll() is None, log_path.read_text()[-3000:]
            await asyncio.sleep(0.2)
        # on-call's view: the running worker's snapshot (the killed one's lingers until its TTL) shows it caught up
        key = f"{s.redis_namespace}metrics:features:{socket.gethostname()}:{worker.pid}"
        deadline = time.monotonic() + 10
        while True:
            raw = await client.get(key)
            snap = orjson.loads(raw) if raw else {}
            worked = bool(snap) and sum(snap["processed"].values()) + snap["duplicates"] > 0
            if snap.get("lag_total") == 0 and worked or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert snap.get("lag_total") == 0 and set(snap["lag"]) <= {"0", "1", "2", "3"}, snap
        # every event it applied has its latency; a worker restarted after a stall may find only events
        # its predecessor had applied (duplicates: no latency to report)
        applied = sum(snap["processed"].values())
        assert sum(snap["event_latency_counts"]) == applied and applied + snap["duplicates"] > 0, snap
        assert applied == 0 or snap["event_latency_ms"]["p99"] > 0, snap
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log_path.read_text()[-3000:]

        want = expected_state(s, events)
        ns = s.redis_namespace
        # user features: exactly the replayed state
        for user, state in want.states.items():
            assert orjson.loads(await client.get(ns + keys.user_session(user))) == list(state.recent), user
            got = {k.decode(): v.decode() for k, v in (await client.hgetall(ns + keys.user_features(user))).items()}
            assert got == features_value(state), user
        # counters: every event counted exactly once, none twice
        by_key = defaultdict(dict)
        for (key, member), delta in want.ops.incr.items():
            by_key[key][member] = delta
        for key, members in by_key.items():
            got = {m.decode(): v for m, v in await client.zrange(ns + key, 0, -1, withscores=True)}
            assert got.keys() == members.keys(), key
            for member, value in members.items():
                assert abs(got[member] - value) <= 1e-9 * max(1.0, abs(value)), (key, member, got[member], value)
        # the session table (its changelog) agrees with the replay too
        rows = await read_changelog(s)
        unplaced = {"partition": -1, "offset": -1}  # the reference replay has its own offsets
        assert {u: dataclasses.replace(UserState.from_dict(r), **unplaced) for u, r in rows.items()} == \
            {u: dataclasses.replace(st, **unplaced) for u, st in want.states.items()}
    finally:
        if worker.poll() is None:
            worker.kill()
        await producer.stop()
        await client.aclose()
