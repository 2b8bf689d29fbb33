"""The end-to-end demo on the embedded shop: services, topics, replay through Kafka, real-time
features in Redis, the Parquet archive, dead letters, then a training run registered in MLflow;
it prints what serving will read and the figures."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import time
from collections import Counter

import numpy as np
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from faust.contrib.asgi import faust_app_running

from agents import features
from batch.train import Source, TrainingFailed, train_once
from cli import services
from recstream.data import Dataset, ShopConfig, generate
from recstream.data.shop import Shop
from recstream.experiments.attribution import VariantTotals
from recstream.features import keys
from recstream.settings import Settings
from schemas import Event, Product, RecommendationReply
from streams import archive, deadletter, lag
from streams.app import create_app
from streams.producer import create_producer
from streams.replay import publish
from streams.store import Store
from streams.topics import ensure_topics

MALFORMED = [  # what a buggy producer might send: each must reach the dead-letter topic, named
    b"{not json",
    b'{"event_id":"bad-1","user_id":"u1","session_id":"s","product_id":"p1","event_type":"wishlist","timestamp":1.7e9}',
    b'{"event_id":"bad-2","user_id":"u1","session_id":"s","product_id":"p1","event_type":"purchase","timestamp":1.7e9,"quantity":-2}',
]


def _say(msg: str = "") -> None:
    print(msg, flush=True)


async def run(s: Settings, args: argparse.Namespace, report: dict | None = None) -> int:
    """The demo; `report` (bench/ab_shop.py) receives the A/B test's analysis under "ab"."""
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

    stats, expected = await _ingest(s, data, shop)
    if stats.seen < expected:   # training and serving on missing features would only fail later, less clearly
        _say(f"== stopped after {time.perf_counter() - t0:.1f} s: FAILED: the feature agents took {stats.seen} of "
             f"{expected} acknowledged events within 120 s (their log is above; an agent stuck restoring an "
             f"earlier run's table changelog is one cause: remove that run's topics and {s.home_dir})")
        return 1
    letters = await _read_dead_letters(s, since_s=started_at)
    _say(f"== 7. dead-letter topic {s.topic('deadletter')}: {len(letters)} new "
         "(each consumer group, the feature agents and the archive, reports the records it refuses)")
    for letter in letters[-len(MALFORMED):]:
        _say(f"   partition {letter.partition} offset {letter.offset}: {letter.reason}")
    trained = await _train(s)
    ab_size = (args.ab_shoppers, args.ab_visits)
    served, ab = await _serve(s, data, shop, ab_size, report) if trained else (False, False)
    checks = {"every acknowledged event reached the features": stats.seen >= expected,
              "the malformed records reached the dead-letter topic": len(letters) >= len(MALFORMED),
              "a model was trained and published": trained,
              "the agents answered every kind of request": served,
              "the attribution worker counted every exposure": ab}
    failed = [name for name, passed in checks.items() if not passed]
    _say(f"== done in {time.perf_counter() - t0:.1f} s: " + ("; ".join(checks) if not failed
                                                          else "FAILED: not " + "; not ".join(failed)))
    return 0 if not failed else 1


async def _ingest(s: Settings, data: Dataset, shop: Shop) -> tuple[features.FeatureStats, int]:
    """Steps 4-6: the feature agents and the archive in this process; the shop's catalogue and events,
    and a few malformed records, published and counted back. (stats, the events the agents must see)."""
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
    return stats, expected


async def _show_features(s: Settings, store: Store, shop, data: Dataset) -> None:
    titles = {p.product_id: f"{p.title} [{p.category}]" for p in data.products}
    last = data.events[-1]
    user = last.user_id
    _say(f"== 6. what serving reads from Redis (shopper {user}, last seen {time.time() - last.timestamp:.0f} s ago)")
    taste = sorted(shop.user_taste[user].items(), key=lambda x: -x[1])[:2]
    _say("   lasting taste (ground truth): " + ", ".join(f"{t} {w:.0%}" for t, w in taste))
    session = await store.user_session(user)
    _say(f"   {keys.user_session(user)} (this session, newest first):")
    for pid in session[:5]:
        _say(f"     {titles.get(pid, pid)}")
    f = await store.user_features(user) or {}
    _say(f"   {keys.user_features(user)}: session categories {f.get('session_categories')}, cart {f.get('cart_items')}")
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


async def _serve(s: Settings, data: Dataset, shop, ab_size: tuple[int, int],
                 report: dict | None) -> tuple[bool, bool]:
    """Start the retrieval and ranking agents and the API's recommender here; ask for each kind, then
    run the A/B test. (whether the agents answered each kind, whether the A/B test counted all)"""
    from agents.worker import run_serving
    from serving.params import parse
    from serving.recommend import Recommender

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
            for _attempt in range(3):   # a busy 2-core box can miss the 40 ms deadline: that is the fallback's job
                t = time.perf_counter()
                reply = await rec.recommend(await rec.check_products(parse(path, query)))
                ms = (time.perf_counter() - t) * 1000
                if not reply.fallback:
                    break
            what = ", ".join(f"{k}={titles.get(v, v)}" for k, v in query.items()) or "anonymous"
            _say(f"   {path} ({what}): {len(reply.items)} items in {ms:.1f} ms, model {reply.model_version}"
                 + (f", FALLBACK: {reply.error}" if reply.fallback else ""))
            for item in reply.items[:4]:
                _say(f"     {item.score:7.3f}  {titles.get(item.product_id, item.product_id)}  -- {item.reason}")
            served += bool(reply.items) and not reply.fallback
        return served == len(asks), await _ab_test(s, rec, data, shop, *ab_size, report)
    finally:
        await rec.stop()
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)


async def _ab_test(s: Settings, rec, data: Dataset, shop, shoppers: int, visits: int, report: dict | None) -> bool:
    """An A/B test in miniature: the full pipeline against trending only, on the homepage. Shoppers of
    the generated shop visit, are assigned, served and logged; they click with a position-biased
    click model driven by their tastes (the shop's ground truth), then cart and buy; the attribution
    worker turns exposures and events into per-variant totals and the report's analysis reads them."""
    from recstream.experiments import analysis
    from recstream.experiments.definition import Changes, Experiment, Variant
    from recstream.experiments.store import ExperimentStore
    from serving.experiments import Experiments, exposure
    from serving.params import parse
    from serving.recommend import status
    from streams.attribution import run_attribution

    now, t0 = time.time(), time.perf_counter()
    eid = time.strftime("demo-%Y%m%d-%H%M%S", time.gmtime(now))
    _say(f"== 10. A/B test {eid!r} on the homepage: the full pipeline (control) vs trending only, "
         f"{shoppers} shoppers x {visits} visits, clicks from a position-biased model of their tastes")
    store = ExperimentStore(s.home_dir / "demo" / "experiments.toml")   # the demo's own file, not the shop's
    e = Experiment(eid, "demo: personalised vs trending", "demo", now - 60, now + 14 * 86400, 1.0,
                   (Variant("control", 0.5), Variant("trending", 0.5, Changes(sources=("popular",)))), "control",
                   ("homepage",))
    store.update(lambda es: dataclasses.replace(es, experiments=(e,)))
    ab = Experiments(dataclasses.replace(s, experiments_file=store.path), store)
    products = {p.product_id: p for p in data.products}
    rng = np.random.default_rng(11)
    producer = create_producer(s)
    await producer.start()
    stop, ready = asyncio.Event(), asyncio.Event()
    worker = asyncio.create_task(run_attribution(s, stop, ready))
    exposures = 0
    try:
        users = sorted(shop.user_taste)[:shoppers]
        for visit in range(visits):
            events = []
            for u in users:
                req = ab.assign(parse("homepage", {"user_id": u, "page": "home"}))
                reply = await rec.recommend(req)
                ex = exposure(req, reply, status(reply), time.time())
                await producer.send(s.topic("exposures"), ex.to_json(), key=ex.key)
                exposures += 1
                events += _shopper_acts(eid, visit, u, shop.user_taste[u], reply, products, rng)
            await publish(producer, s.topic("clickstream"), events, progress=False)
            _say(f"   visit {visit + 1} of {visits}: {len(users)} shoppers served, {len(events)} click, cart and "
                 f"purchase events sent [{time.perf_counter() - t0:.1f} s]")
        await producer.flush()
        await asyncio.wait_for(ready.wait(), 60)
        totals = await _counted(s, eid, exposures)
    finally:
        stop.set()
        await asyncio.gather(worker, return_exceptions=True)
        await producer.stop()
    an = analysis.analyse(e, totals, time.time())
    if report is not None:
        report["ab"] = an
    for line in analysis.table(an).splitlines():
        _say("   " + line)
    decision = analysis.decide(an, "trending")
    _say(f"   promote trending? {'yes' if decision.allowed else 'no'}: {decision.reason}")
    counted = sum(x.impressions for x in totals.values())
    _say(f"   {exposures} exposures logged, {counted} counted by the attribution worker "
         f"({time.perf_counter() - t0:.1f} s; `recstream experiments report` prints this, with a plot, for a live test)")
    return counted == exposures


def _shopper_acts(eid: str, visit: int, user: str, taste: dict[str, float], reply: RecommendationReply,
                  products: dict[str, Product], rng: np.random.Generator) -> list[Event]:
    """The demo's click model: the item at position k is clicked with probability 0.4 x the shopper's
    taste for its top category / log2(k + 1); a click is carted 30 % of the time, a cart bought half."""
    events = []
    for k, item in enumerate(reply.items, start=1):
        p = products.get(item.product_id)   # (trending may hold products of earlier runs' shops)
        if p is None or rng.random() >= 0.4 * taste.get(p.category_path[0], 0.0) / math.log2(k + 1):
            continue
        steps = ["click"] + (["add_to_cart"] if rng.random() < 0.3 else [])
        steps += ["purchase"] if len(steps) == 2 and rng.random() < 0.5 else []
        events += [Event(event_id=f"{eid}-{visit}-{user}-{k}-{kind}", user_id=user, session_id=f"{eid}-{user}",
                         product_id=p.product_id, event_type=kind, timestamp=time.time(), page="home",
                         price=p.price, rec_request_id=reply.request_id) for kind in steps]
    return events


async def _counted(s: Settings, eid: str, exposures: int, timeout_s: float = 60) -> dict[str, VariantTotals]:
    """The experiment's per-variant totals, once the attribution worker has counted every exposure
    (or after `timeout_s`, as they are)."""
    from streams.attribution_store import read_totals

    client = aioredis.from_url(s.redis_url)
    try:
        t_wait = time.perf_counter()
        while True:
            totals = await read_totals(client, s.redis_namespace, eid)
            if sum(x.impressions for x in totals.values()) >= exposures or time.perf_counter() - t_wait > timeout_s:
                return totals
            await asyncio.sleep(0.3)
    finally:
        await client.aclose()


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
