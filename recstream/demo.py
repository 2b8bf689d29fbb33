"""The end-to-end demo on the embedded shop: services, topics, replay through Kafka, counted back."""
from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

from aiokafka import AIOKafkaConsumer
from faust.contrib.asgi import faust_app_running

from agents import clickstream
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


def _say(msg: str) -> None:
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
         f"{len(data.events)} events " + ", ".join(f"{k} {v}" for k, v in kinds.most_common()))

    app = create_app(s)
    tally = clickstream.register(app, s)
    topic = s.topic("clickstream")
    backlog = lag.total(await lag.group_lag(s, s.app_id, topic))
    async with faust_app_running(app):
        _say(f"== 4. Faust app {s.app_id!r} running in this process; backlog before replay: {backlog} records")
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
        _say(f"== 5. counting back: waiting for the agent to see {expected} records ...")
        t_wait = time.perf_counter()
        while tally.stats.seen < expected and time.perf_counter() - t_wait < 120:
            await asyncio.sleep(0.2)
        drained = time.perf_counter() - t_wait
        counted = sum(tally.stats.processed.values())
        totals: Counter = Counter()
        for _, row in tally.table.items():
            totals.update(row)
        users = len(tally.table)
    letters = await _read_dead_letters(s, since_s=started_at)

    _say(f"   published {result.acked} events + {len(MALFORMED)} malformed records"
         + (f" (+ {backlog} left from earlier runs)" if backlog else "")
         + f"; the agent validated {counted} and refused {tally.stats.dead_letters} "
         f"(drained {drained:.2f} s after the last ack)")
    _say("   by type, this run:    " + ", ".join(f"{k} {tally.stats.processed[k]}" for k, _ in kinds.most_common()))
    _say(f"   user-event-counts table (changelogged, all runs): {users} users, " +
         ", ".join(f"{k} {v}" for k, v in totals.most_common()))
    _say(f"== 6. dead-letter topic {s.topic('deadletter')}: {len(letters)} new")
    for letter in letters[-len(MALFORMED):]:
        _say(f"   partition {letter.partition} offset {letter.offset}: {letter.reason}")
    ok = tally.stats.seen == expected and len(letters) >= len(MALFORMED)
    _say(f"== done in {time.perf_counter() - t0:.1f} s: {'every acknowledged event was counted back' if ok else 'MISMATCH'}")
    return 0 if ok else 1


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
