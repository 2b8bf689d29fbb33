"""The end-to-end demo on the embedded shop: services, topics, replay through Kafka, real-time
features in Redis, dead letters; it prints what serving will read and the figures."""
from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from faust.contrib.asgi import faust_app_running

from agents import features
from recstream import services
from recstream.data import Dataset, ShopConfig, generate
from recstream.settings import Settings
from streams import deadletter, lag
from streams.app import create_app
from streams.producer import create_producer
from streams.replay import publish
from streams.topics import ensure_topics

MALFORMED = [  # what a buggy producer might send: each must reach the dead-letter topic, named
    b"{not json",
    b'{"event_id":"bad-1","user_id":"u1","session_id":"s","product_id":"p1","event_type":"wishlist","timestamp":1.7e9}',
    b'{"event_id":"bad-2","user_id":"u1","session_id":"s","product_id":"p1","event_type":"purchase","timestamp":1.7e9,"quantity":-2}',
]


def _say(msg: str = "") -> None:
    print(msg, flush=True)


async def run(s: Settings, args: argparse.Namespace) -> int:
    t0, started_at = time.perf_counter(), time.time()
    _say("== 1. services (Kafka KRaft, Redis, MLflow) on loopback")
    await asyncio.to_thread(services.install, s, _say)
    await asyncio.to_thread(services.up, s, _say)
    _say("== 2. topics")
    for name, state in (await ensure_topics(s)).items():
        _say(f"   {name:28} {state}")

    cfg = ShopConfig(users=args.users, products=args.products, seed=args.seed,
                     end_s=float(int(time.time()) // 60 * 60 - 60))
    shop = generate(cfg)
    data = Dataset("shop", shop.events, shop.products)
    kinds = Counter(e.event_type for e in data.events)
    _say(f"== 3. generated shop (seed {cfg.seed}): {len(data.products)} products, {cfg.users} shoppers, "
         f"{len(data.events)} events over {cfg.days} days: " + ", ".join(f"{k} {v}" for k, v in kinds.most_common()))

    client = aioredis.from_url(s.redis_url)
    app = create_app(s)
    agents = features.register(app, s, client)
    stats = agents.stats
    topic = s.topic("clickstream")
    backlog = lag.total(await lag.group_lag(s, s.app_id, topic))
    try:
        async with faust_app_running(app):
            _say(f"== 4. feature agents of {s.app_id!r} running in this process (backlog before replay: {backlog})")
            producer = create_producer(s)
            await producer.start()
            try:
                await publish(producer, s.topic("catalogue"), data.products)
                result = await publish(producer, topic, data.events)
                for raw in MALFORMED:
                    await producer.send_and_wait(topic, raw, key=b"u1")
            finally:
                await producer.stop()
            _say(f"   {result.summary()}")
            expected = backlog + result.acked + len(MALFORMED)
            t_wait = time.perf_counter()
            while (stats.seen < expected or stats.items < len(data.products)) and time.perf_counter() - t_wait < 120:
                await asyncio.sleep(0.1)
            drained = time.perf_counter() - t_wait
            _say(f"== 5. counted back: {sum(stats.processed.values())} events into features, {stats.duplicates} "
                 f"repeats dropped, {stats.dead_letters} refused, {stats.items} products into item_features "
                 f"(drained {drained:.2f} s after the last ack)")
            if stats.duplicates:
                _say("   (a re-run within the same minute publishes the same event ids: the agents drop the repeats)")
            ingest = stats.ingest_latency.percentiles_ms()
            _say(f"   Kafka append -> Redis written: p50 {ingest['p50']:.0f} ms, p99 {ingest['p99']:.0f} ms "
                 "(a replay as fast as possible: queueing included)")
            await _show_features(s, agents.store, shop, data)
    finally:
        await client.aclose()
    letters = await _read_dead_letters(s, since_s=started_at)
    _say(f"== 7. dead-letter topic {s.topic('deadletter')}: {len(letters)} new")
    for letter in letters[-len(MALFORMED):]:
        _say(f"   partition {letter.partition} offset {letter.offset}: {letter.reason}")
    ok = stats.seen >= expected and len(letters) >= len(MALFORMED)
    _say(f"== done in {time.perf_counter() - t0:.1f} s: "
         f"{'every acknowledged event reached the features' if ok else 'MISMATCH: some events were not counted back'}")
    return 0 if ok else 1


async def _show_features(s: Settings, store, shop, data: Dataset) -> None:
    titles = {p.product_id: f"{p.title} [{p.category}]" for p in data.products}
    last = data.events[-1]
    user = last.user_id
    _say(f"== 6. what serving reads from Redis (shopper {user}, last seen {time.time() - last.timestamp:.0f} s ago)")
    taste = sorted(shop.user_taste[user].items(), key=lambda x: -x[1])[:2]
    _say("   lasting taste (ground truth): " + ", ".join(f"{t} {w:.0%}" for t, w in taste))
    session = await store.user_session(user)
    _say(f"   user_session:{user} (this session, newest first):")
    for pid in session[:5]:
        _say(f"     {titles.get(pid, pid)}")
    f = await store.user_features(user) or {}
    _say(f"   user_features:{user}: session categories {f.get('session_categories')}, cart {f.get('cart_items')}")
    trending = await store.trending(time.time(), s.trending_half_life_s, n=5)
    _say("   trending now: " + "; ".join(f"{titles.get(p, p)}" for p, _ in trending))
    top = trending[0][0] if trending else last.product_id
    also = await store.neighbours("covis", top, 3)
    _say(f"   customers who viewed {titles.get(top, top)} also viewed: " + "; ".join(titles.get(p, p) for p, _ in also))
    bought = Counter(e.product_id for e in data.events if e.event_type == "purchase").most_common(20)
    for pid, _ in bought:
        together = await store.neighbours("cobuy", pid, 3)
        if together:
            _say(f"   frequently bought with {titles.get(pid, pid)}: " + "; ".join(titles.get(p, p) for p, _ in together))
            break


async def _read_dead_letters(s: Settings, since_s: float) -> list[deadletter.DeadLetter]:
    consumer = AIOKafkaConsumer(s.topic("deadletter"), bootstrap_servers=s.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        letters = []
        while batches := await consumer.getmany(timeout_ms=2000):
            letters += [deadletter.DeadLetter.from_headers(m.key, m.value, list(m.headers))
                        for msgs in batches.values() for m in msgs if m.timestamp / 1000 >= since_s]
        return letters
    finally:
        await consumer.stop()
