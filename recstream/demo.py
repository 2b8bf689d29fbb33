"""The end-to-end demo on the embedded shop: services, topics, replay through Kafka, real-time
features in Redis, the Parquet archive, dead letters, then a training run registered in MLflow;
it prints what serving will read and the figures."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from collections import Counter

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from faust.contrib.asgi import faust_app_running

from agents import features
from batch.train import Source, TrainingFailed, train_once
from recstream import services
from recstream.data import Dataset, ShopConfig, generate
from recstream.settings import Settings
from streams import archive, deadletter, lag
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
    archive_stop = asyncio.Event()
    archiver = asyncio.create_task(archive.run(s, archive_stop))
    try:
        async with faust_app_running(app):
            _say(f"== 4. feature agents of {s.app_id!r} and the archive running in this process "
                 f"(backlog before replay: {backlog})")
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
        await _drain_archive(s, archive_stop, archiver)
    finally:
        archive_stop.set()
        await client.aclose()
    letters = await _read_dead_letters(s, since_s=started_at)
    _say(f"== 7. dead-letter topic {s.topic('deadletter')}: {len(letters)} new "
         "(each consumer group, the feature agents and the archive, reports the records it refuses)")
    for letter in letters[-len(MALFORMED):]:
        _say(f"   partition {letter.partition} offset {letter.offset}: {letter.reason}")
    trained = await _train(s)
    served = await _serve(s, data, shop) if trained else False
    ok = stats.seen >= expected and len(letters) >= len(MALFORMED) and trained and served
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


async def _drain_archive(s: Settings, stop: asyncio.Event, archiver: asyncio.Task) -> None:
    """Wait until the archive group has committed everything, then stop it (it flushes first)."""
    topic = s.topic("clickstream")
    deadline = time.perf_counter() + 60
    while lag.total(await lag.group_lag(s, archive.group_id(s), topic)) > 0 and time.perf_counter() < deadline:
        await asyncio.sleep(0.5)
    stop.set()
    await archiver
    files = sum(1 for _ in archive.dataset_dir(s).rglob("part-*.parquet"))
    _say(f"   archive: the clickstream is in Parquet, {files} hourly files under {archive.dataset_dir(s)}")


async def _train(s: Settings) -> bool:
    _say("== 8. training on the archive: Spark ALS, co-occurrence, content model, FAISS, XGBoost ranker, MLflow")
    try:
        # the demo's archive grows with every run; a fifth of the interactions keeps its ranker quick
        demo = dataclasses.replace(s, ranker_target_sample=min(s.ranker_target_sample, 0.2))
        report = await asyncio.to_thread(train_once, demo, Source(), lambda line: _say("   " + line))
    except TrainingFailed as exc:
        _say(f"   {exc}")
        return False
    m = report.metrics
    _say(f"   registered {s.model_name} version {report.version} as {report.alias} ({report.promotion})")
    _say(f"   window: {report.window['events']} events, {report.window['users']} users, {report.window['items']} items; "
         f"{int(m.get('items_cold_start', 0))} catalogue items embedded by the content model")
    _say(f"   ranker NDCG@8 {m.get('ranker_ndcg_at_8', float('nan')):.3f} vs retrieval order "
         f"{m.get('baseline_ndcg_at_8', float('nan')):.3f}; on items new to the session "
         f"{m.get('ranker_novel_ndcg_at_8', float('nan')):.3f} vs {m.get('baseline_novel_ndcg_at_8', float('nan')):.3f}; "
         f"FAISS recall@200 {m.get('faiss_recall_at_200', float('nan')):.3f}")
    _say("   stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.stage_s.items())
         + f"; {report.published_keys} keys published to Redis")
    return True


async def _serve(s: Settings, data: Dataset, shop) -> bool:
    """Start the retrieval and ranking agents and the API's recommender here; ask for each kind."""
    from serving.recommend import Recommender
    from serving.params import parse
    from streams.worker import run_serving

    _say("== 9. serving: API -> Kafka -> retrieval agent (FAISS + rules) -> ranking agent (XGBoost + rules) -> API")
    stop = asyncio.Event()
    ready = [asyncio.Event(), asyncio.Event()]
    workers = [asyncio.create_task(run_serving(s, role, stop, r)) for role, r in zip(("retrieval", "ranking"), ready)]
    rec = Recommender(s)
    try:
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 60)
        await rec.start()
        titles = {p.product_id: f"{p.title} [{p.category}]" for p in data.products}
        last = data.events[-1]
        bought = Counter(e.product_id for e in data.events if e.event_type == "purchase").most_common(1)
        asks = [("homepage", {"user_id": last.user_id}), ("homepage", {}),
                ("similar", {"product_id": last.product_id}), ("also-viewed", {"product_id": last.product_id}),
                ("cart", {"cart_items": bought[0][0] if bought else last.product_id})]
        served = 0
        for path, query in asks:
            await rec.recommend(await rec.check_products(parse(path, query)))   # warm: first use of each path
            t = time.perf_counter()
            reply = await rec.recommend(await rec.check_products(parse(path, query)))
            ms = (time.perf_counter() - t) * 1000
            what = ", ".join(f"{k}={titles.get(v, v)}" for k, v in query.items()) or "anonymous"
            _say(f"   {path} ({what}): {len(reply.items)} items in {ms:.1f} ms, model {reply.model_version}"
                 + (f", FALLBACK: {reply.error}" if reply.fallback else ""))
            for item in reply.items[:4]:
                _say(f"     {item.score:7.3f}  {titles.get(item.product_id, item.product_id)}  -- {item.reason}")
            served += bool(reply.items) and not reply.fallback
        return served == len(asks)
    finally:
        await rec.stop()
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)


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
