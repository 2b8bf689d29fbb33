"""Online serving end to end on the real stack: the HTTP API, the retrieval and ranking agents and the
feature worker each run as a `recstream` subprocess, over Kafka and Redis, with a model trained on
the generated shop and registered in MLflow. One module-scoped setup; the tests that kill workers
or swap the model go last (their effects are restored: workers restarted, the version followed)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from batch.publish import current
from batch.publish import publish as publish_model
from batch.train import PROMOTION_METRIC, Source, train_once
from models.artifacts import BatchOutputs
from models.registry import CHAMPION, Registry
from recstream.data import Dataset, ShopConfig, shop_dataset
from recstream.features import keys
from recstream.settings import Settings
from schemas import Product, RecommendationRequest
from streams.deadletter import DeadLetter
from streams.producer import create_producer
from streams.replay import publish, publish_dataset
from streams.topics import ensure_topics
from tests.integration import namespaces
from tests.integration.conftest import read_topic
from tests.integration.serving_stack import Processes, get_json, small_deployment, wait_for

pytestmark = pytest.mark.integration

API = "/api/v1/recommendations"
# The default deadline is 40 ms and requests take 15 ms at the median here, but on a 2-core box
# running Kafka, Redis, MLflow, four recstream processes and the test, about 2% of them take over
# 40 ms (measured: 6 of 300, each stage small, the time lost waiting for a core), and these tests
# allow no fallback. The deadline logic is the same at any value.
DEADLINE_MS = 200
MARGIN_S = 2.0           # "never hangs": a fallback never waits on a dead agent (latency: bench/faults.py)
SERVING = ("retrieval", "ranking", "api")


@dataclass
class Served:
    s: Settings
    data: Dataset
    procs: Processes
    http: httpx.AsyncClient
    redis: aioredis.Redis
    version: str          # the version serving is expected to report (test_hot_swap moves it)
    user: str             # a shopper with a live session and an ALS vector
    product: str          # a product with co-views, co-purchases and a vector
    cart: list[str]       # two products with co-purchases

    @property
    def products(self) -> dict[str, Product]:
        return {p.product_id: p for p in self.data.products}

    def cases(self) -> list[tuple[str, dict, set[str]]]:
        """(path, params, products that must not be recommended) for each endpoint."""
        return [("homepage", {"user_id": self.user}, set()), ("homepage", {}, set()),
                ("similar", {"product_id": self.product}, {self.product}),
                ("also-viewed", {"product_id": self.product}, {self.product}),
                ("cart", {"cart_items": ",".join(self.cart)}, set(self.cart))]

    async def ask(self, path: str, **params) -> tuple[httpx.Response, dict, float]:
        return await get_json(self.http, f"{API}/{path}", **params)


async def _applied_events(client: aioredis.Redis, s: Settings) -> int:
    prefix = s.redis_namespace + keys.applied_prefix(s.app_id, s.topic("clickstream"))
    values = await client.mget([prefix + str(p) for p in range(s.clickstream_partitions)])
    return sum(int(v) + 1 for v in values if v is not None)


def _pick_anchors(data: Dataset) -> tuple[str, str, list[str]]:
    """The last shopper (live session), the most co-viewed product, the two most bought products."""
    views = Counter(e.product_id for e in data.events if e.event_type == "view")
    bought = Counter(e.product_id for e in data.events if e.event_type == "purchase")
    return data.events[-1].user_id, views.most_common(1)[0][0], [p for p, _ in bought.most_common(2)]


@pytest.fixture(scope="module")
async def served(stack: Settings, tmp_path_factory):
    home = tmp_path_factory.mktemp("serving")
    s = small_deployment(stack, home, "serving", DEADLINE_MS, admin_token=ADMIN_TOKEN, experiments_reload_s=0.5)
    await ensure_topics(s)
    cfg = ShopConfig(users=80, products=200, seed=4, end_s=float(int(time.time()) - 60))
    data = shop_dataset(cfg)
    procs = Processes(s, home)
    client = aioredis.from_url(s.redis_url)
    training = None
    try:
        procs.start("features")
        # training reads the same generated shop; it runs while the feature worker takes in the stream
        training = asyncio.ensure_future(asyncio.to_thread(train_once, s, Source(dataset="shop", shop=cfg),
                                                           lambda _: None))
        await publish_dataset(s, data, progress=False)
        item_keys = [s.redis_namespace + keys.item_features(p.product_id) for p in data.products]

        async def features_in():
            return (await _applied_events(client, s) == len(data.events)
                    and await client.exists(*item_keys) == len(data.products))
        await wait_for(features_in, 120, "the shop's events and catalogue in Redis",
                       check=lambda: procs.check_alive("features"))
        report = await training
        assert (await current(s))["version"] == report.version
        for name in SERVING:
            procs.start(name)
        user, product, cart = _pick_anchors(data)
        assert await client.exists(s.redis_namespace + keys.embedding("user", report.version, user))
        assert await client.exists(s.redis_namespace + keys.user_session(user))
        async with httpx.AsyncClient(base_url=procs.base_url, timeout=10) as http:
            async def healthy():
                try:
                    return (await http.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False
            await wait_for(healthy, 60, "the API's /healthz", interval_s=0.3, check=lambda: procs.check_alive(*SERVING))

            async def ready():   # readiness: every group has a live agent with the published version loaded
                r = await http.get("/readyz")
                assert r.status_code in (200, 503), r.text
                return r.status_code == 200 and r.json()["model_version"] == report.version
            await wait_for(ready, 90, "the API's /readyz", interval_s=0.3, check=lambda: procs.check_alive(*SERVING))
            srv = Served(s, data, procs, http, client, report.version, user, product, cart)
            for path, params, _ in srv.cases():   # agents joined, model loaded, each path warmed up
                await wait_for(lambda: _answered(srv, path, params), 90, f"{path} answered by the agents",
                               interval_s=0.2, check=lambda: procs.check_alive(*SERVING))
            yield srv
    finally:
        procs.stop_all()
        if training is not None and not training.done():
            await asyncio.wait([training])
        await client.aclose()
        await namespaces.remove(s)


async def _answered(srv: Served, path: str, params: dict) -> bool:
    r, body, _ = await srv.ask(path, **params)
    return r.status_code == 200 and not body["fallback"] and body.get("model_version") == srv.version


async def _check_reply(srv: Served, r: httpx.Response, body: dict, kind: str, count: int, exclude: set[str]) -> list[str]:
    """A full, valid answer from the agents: deduplicated, in-stock, known products with reasons."""
    assert r.status_code == 200, r.text
    assert body["fallback"] is False and "error" not in body, body
    assert body["kind"] == kind and body["model_version"] == srv.version, body
    assert len(body["request_id"]) == 32, body
    ids = [it["product_id"] for it in body["items"]]
    assert len(ids) == count, body
    assert len(set(ids)) == len(ids), f"repeated items: {ids}"
    assert set(ids) <= srv.products.keys(), ids
    assert not set(ids) & exclude, f"{set(ids) & exclude} recommended although on screen / in the cart"
    assert all(isinstance(it["reason"], str) and it["reason"].strip() for it in body["items"]), body
    ns = srv.s.redis_namespace
    assert not any(await srv.redis.smismember(ns + keys.OOS, ids)), ids
    pipe = srv.redis.pipeline(transaction=False)
    for x in ids:
        pipe.hget(ns + keys.item_features(x), "in_stock")
    assert await pipe.execute() == [b"1"] * len(ids)
    return ids


async def _set_stock(srv: Served, product_id: str, in_stock: bool) -> None:
    producer = create_producer(srv.s)
    await producer.start()
    try:
        await publish(producer, srv.s.topic("catalogue"),
                      [dataclasses.replace(srv.products[product_id], in_stock=in_stock)], progress=False)
    finally:
        await producer.stop()


# -- 1. every endpoint, and a product that sells out ---------------------------------------------------------

async def test_each_endpoint_answers_valid_in_stock_items_and_a_sold_out_one_leaves(served: Served):
    srv = served
    KIND = {"homepage": "homepage", "similar": "similar", "also-viewed": "also_viewed", "cart": "cart"}
    COUNT = {"homepage": 8, "similar": 8, "also-viewed": 8, "cart": 4}
    answers: dict[str, list[str]] = {}
    request_ids = set()
    for path, params, exclude in srv.cases():
        r, body, _ = await srv.ask(path, **params)
        answers[path + ("?user" if params.get("user_id") else "")] = \
            await _check_reply(srv, r, body, KIND[path], COUNT[path], exclude)
        request_ids.add(body["request_id"])
    assert len(request_ids) == len(srv.cases())   # one impression id per request
    r, body, _ = await srv.ask("similar", product_id=srv.product, count=20)
    await _check_reply(srv, r, body, "similar", 20, {srv.product})

    # the known shopper's homepage is cached now: a sold-out product must leave it as well
    r, body, _ = await srv.ask("homepage", user_id=srv.user)
    assert body["cached"] is True, body
    everywhere = Counter(x for ids in answers.values() for x in ids)
    gone = max(answers["homepage?user"], key=lambda x: everywhere[x])
    await _set_stock(srv, gone, False)
    try:
        still: list[tuple] = []

        async def left_everywhere():
            still[:] = []
            for path, params, _exclude in srv.cases():
                r, body, _ = await srv.ask(path, **params)
                if gone in [it["product_id"] for it in body["items"]]:
                    still.append((path, params, "cached" if body["cached"] else "computed"))
            return not still
        # behaviour, not speed (bench/ has that): the stock change invalidates the caches, so the bound stays
        # under the homepage cache's and the agents' item cache's TTLs (300 s, 60 s), not at a latency
        try:
            await wait_for(left_everywhere, 30, f"sold-out {gone} to leave every reply", interval_s=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; still in {still}") from None
        for path, params, exclude in srv.cases():   # still full answers without it
            r, body, _ = await srv.ask(path, **params)
            await _check_reply(srv, r, body, KIND[path], COUNT[path], exclude | {gone})
    finally:
        await _set_stock(srv, gone, True)
    await wait_for(lambda: _not_oos(srv, gone), 30, f"{gone} back in stock")


async def _not_oos(srv: Served, product_id: str) -> bool:
    return not await srv.redis.sismember(srv.s.redis_namespace + keys.OOS, product_id)


# -- 4. bad parameters ---------------------------------------------------------------------------------------

P = "PRODUCT"   # stands for srv.product
BAD = [
    ("similar", {}, 400, "product_id", "is required for similar"),
    ("also-viewed", {}, 400, "product_id", "is required for also-viewed"),
    ("cart", {}, 400, "cart_items", "is required for cart"),
    ("homepage", {"user_id": ""}, 400, "user_id", "must not be empty"),
    ("similar", {"product_id": " "}, 400, "product_id", "must not be empty"),
    ("similar", {"product_id": P, "count": "0"}, 400, "count", "1"),
    ("similar", {"product_id": P, "count": "10000"}, 400, "count", "100"),
    ("homepage", {"count": "eight"}, 400, "count", "expected an integer"),
    ("similar", {"product_id": "no-such-product"}, 404, "product_id", "'no-such-product'"),
    ("also-viewed", {"product_id": "no-such-product"}, 404, "product_id", "unknown product"),
    ("cart", {"cart_items": "nope-1,nope-2"}, 404, "cart_items", "unknown product"),
    ("cart", {"cart_items": "a,,b"}, 400, "cart_items", "without empty ones"),
    ("cart", {"cart_items": ""}, 400, "cart_items", "comma-separated"),
    ("cart", {"cart_items": ","}, 400, "cart_items", "comma-separated"),
    ("cart", {"cart_items": ",".join(f"x{i}" for i in range(101))}, 400, "cart_items", "more than 100"),
    ("similar", {"product_id": P, "colour": "red"}, 400, "colour", "unknown parameter"),
    ("homepage", {"device": "toaster"}, 400, "device", "'toaster' is not one of"),
    ("homepage", {"debug": "maybe"}, 400, "debug", "expected 0, 1"),
    ("bestsellers", {}, 404, "kind", "'bestsellers' is not one of"),
]


@pytest.mark.parametrize("path, params, status, field, reason", BAD, ids=[f"{b[0]}-{b[3]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
async def test_bad_parameters_are_4xx_naming_the_field(served: Served, path, params, status, field, reason):
    params = {k: served.product if v == P else v for k, v in params.items()}
    r, body, _ = await served.ask(path, **params)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert body["error"] and [f["field"] for f in body["fields"]] == [field], body
    assert reason in body["fields"][0]["reason"], body


async def test_several_bad_parameters_are_named_together(served: Served):
    r, body, _ = await served.ask("similar", count="x", colour="red", device="toaster")
    assert r.status_code == 400
    assert {f["field"] for f in body["fields"]} == {"count", "colour", "device", "product_id"}, body


async def test_openapi_lists_every_endpoint(served: Served):
    r = await served.http.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert {f"{API}/{p}" for p in ("homepage", "similar", "cart", "also-viewed")} <= paths.keys()


# -- 5. the homepage cache -----------------------------------------------------------------------------------

async def test_homepage_cache_holds_until_the_shopper_acts(served: Served):
    srv = served
    first = (await srv.ask("homepage", user_id=srv.user, count=6))[1]
    assert first["fallback"] is False, first

    async def cached():
        r, body, _ = await srv.ask("homepage", user_id=srv.user, count=6)
        return body if body["cached"] else None
    again = await wait_for(cached, 2, "a cached homepage reply", interval_s=0.05)
    assert again["items"] == first["items"] and again["request_id"] != first["request_id"]
    assert again["model_version"] == srv.version and again["fallback"] is False

    ns = srv.s.redis_namespace
    session = orjson.loads(await srv.redis.get(ns + keys.user_session(srv.user)))
    session_id = (await srv.redis.hget(ns + keys.user_features(srv.user), "session_id")).decode()
    viewed = next(p.product_id for p in srv.data.products if p.product_id not in session and p.in_stock)
    event = {"event_id": uuid.uuid4().hex, "user_id": srv.user, "session_id": session_id, "product_id": viewed,
             "event_type": "view", "timestamp": time.time()}
    r = await srv.http.post("/api/v1/events", json=event)
    assert r.status_code == 202 and r.json() == {"accepted": 1}

    async def recomputed():
        r, body, _ = await srv.ask("homepage", user_id=srv.user, count=6, debug=1)
        return body if not body["cached"] else None
    fresh = await wait_for(recomputed, 2, "the homepage recomputed after the shopper's view", interval_s=0.05)
    assert fresh["fallback"] is False and fresh["model_version"] == srv.version, fresh
    assert fresh["session_recent"][0] == viewed, fresh["session_recent"]
    assert "total" in fresh["timings_ms"] and "ranking_out" in fresh["timings_ms"], fresh["timings_ms"]
    # and cached again until the next event
    await wait_for(cached, 2, "the recomputed reply cached", interval_s=0.05)


# -- 6. dead letters from the request path -------------------------------------------------------------------

async def test_malformed_requests_go_to_the_dead_letter_topic_and_serving_goes_on(served: Served):
    srv, s = served, served.s
    tag = uuid.uuid4().hex[:8]
    bad_request = orjson.dumps({"request_id": f"dl-{tag}", "kind": "bestsellers", "created_at": time.time()})
    not_json = f"{{not json {tag}".encode()
    good = RecommendationRequest(request_id=f"ok-{tag}", kind="similar", created_at=time.time(), product_id=srv.product)
    bad_candidates = orjson.dumps({"request": orjson.loads(good.to_json()), "model_version": "1",
                                   "query_source": "nowhere", "product_ids": [], "scores": {}, "anchors": {}})
    sent = {(s.topic("rec.requests"), not_json), (s.topic("rec.requests"), bad_request),
            (s.topic("rec.candidates"), bad_candidates)}
    producer = create_producer(s)
    await producer.start()
    try:
        for topic, value in sent:
            await producer.send_and_wait(topic, value, key=tag.encode())
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(s.topic("deadletter"), bootstrap_servers=s.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    letters: dict[tuple[str, bytes], DeadLetter] = {}
    try:
        deadline = time.monotonic() + 15
        while not sent <= letters.keys() and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                for m in msgs:
                    letter = DeadLetter.from_headers(m.key, m.value, list(m.headers))
                    letters[(letter.source_topic, m.value)] = letter
    finally:
        await consumer.stop()
    assert sent <= letters.keys(), f"missing dead letters: {sent - letters.keys()}"
    assert letters[(s.topic("rec.requests"), bad_request)].field == "kind"
    assert "bestsellers" in letters[(s.topic("rec.requests"), bad_request)].reason
    assert letters[(s.topic("rec.candidates"), bad_candidates)].field == "query_source"
    assert all(letters[k].key == tag.encode() for k in sent)
    srv.procs.check_alive(*SERVING)
    for path, params, _exclude in srv.cases():
        r, body, _ = await srv.ask(path, **params)
        assert r.status_code == 200 and body["fallback"] is False, body


# -- A/B: variants change serving; exposures logged, attributed, reported; promotion -----------------------

ADMIN = "/api/v1/admin"
ADMIN_TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _experiment(eid: str, layer: str, **changes_by_variant) -> dict:
    """A running experiment over the whole layer, control + the named variants, equal weights."""
    names = ["control", *changes_by_variant]
    variants = [{"name": n, "weight": 1 / len(names), **({"changes": changes_by_variant[n]} if n != "control" else {})}
                for n in names]
    now = time.time()
    return {"id": eid, "description": f"test {eid}", "layer": layer, "start": now - 60, "end": now + 30 * 86400,
            "traffic": 1.0, "variants": variants}


async def _admin(srv: Served, method: str, path: str, body=None, **params) -> httpx.Response:
    return await srv.http.request(method, ADMIN + path, json=body, params=params, headers=AUTH)


async def _homepages(srv: Served, users: list[str], **params) -> dict[str, dict]:
    out = {}
    for u in users:
        r, body, _ = await srv.ask("homepage", user_id=u, **params)
        assert r.status_code == 200 and body["fallback"] is False, body
        out[u] = body
    return out


async def test_ab_variants_change_serving_and_are_logged_attributed_reported_and_promoted(served: Served, tmp_path):
    from cli import experiments as commands
    from streams.attribution_store import read_totals

    srv, s = served, served.s
    # the admin API: token required, bad input named, nothing applied
    assert (await srv.http.get(ADMIN + "/experiments")).status_code == 401
    bad = _experiment("ab-bad", "retrieval", trending={"sources": ["popular"]})
    bad["variants"][0]["weight"] = 0.7
    r = await _admin(srv, "PUT", "/experiments/ab-bad", bad)
    assert r.status_code == 400 and any("weights must sum to 1" in f["reason"] for f in r.json()["fields"]), r.text
    r = await _admin(srv, "PUT", "/experiments/ab-sources",
                     _experiment("ab-sources", "retrieval", trending={"sources": ["popular"]}))
    assert r.status_code == 201, r.text
    r = await _admin(srv, "PUT", "/experiments/ab-diversity",
                     _experiment("ab-diversity", "rules", strict={"max_per_category": 1}))
    assert r.status_code == 201, r.text
    clash = _experiment("ab-clash", "retrieval", other={"candidates": 50})   # layer "retrieval" is full
    r = await _admin(srv, "PUT", "/experiments/ab-clash", clash)
    assert r.status_code == 409 and "cannot fit" in r.text, r.text
    assert [e["id"] for e in (await _admin(srv, "GET", "/experiments")).json()["experiments"]] == \
        ["ab-sources", "ab-diversity"]

    users = sorted({e.user_id for e in srv.data.events})[:40]

    async def assigned():   # the API processes re-read the file
        r, body, _ = await srv.ask("homepage", user_id=users[0], count=5)
        return set(body.get("experiments") or {}) == {"ab-sources", "ab-diversity"}
    await wait_for(assigned, 20, "the API to read the experiments file")

    first = await _homepages(srv, users)
    again = await _homepages(srv, users[:10])
    variants = {u: (b["experiments"]["ab-sources"], b["experiments"]["ab-diversity"]) for u, b in first.items()}
    assert all((b["experiments"]["ab-sources"], b["experiments"]["ab-diversity"]) == variants[u]
               for u, b in again.items()), "assignment changed between requests"
    assert {v[0] for v in variants.values()} == {"control", "trending"}
    assert {v[1] for v in variants.values()} == {"control", "strict"}
    for u, body in first.items():
        sources = {it["source"] for it in body["items"]}
        categories = [srv.products[it["product_id"]].category for it in body["items"]]
        if variants[u][0] == "trending":
            assert sources == {"popular"}, body
        if variants[u] == ("control", "strict"):   # (trending alone offers one category: the cap gives way)
            assert len(set(categories)) == len(categories), body
    assert any(len({it["source"] for it in b["items"]} - {"popular"}) for u, b in first.items()
               if variants[u][0] == "control"), "control should use the other sources too"

    # every served list is on the exposures topic
    served_ids = {b["request_id"]: b for b in [*first.values(), *again.values()]}
    deadline = time.monotonic() + 30
    while True:   # the API logs after it answers, and one fetch may not reach every partition: read until all are in
        logged, impressions = {}, Counter()
        for m in await read_topic(s, s.topic("exposures"), timeout_ms=3000):
            e = orjson.loads(m.value)
            impressions[(e.get("experiments") or {}).get("ab-sources")] += 1   # (the waits above asked too)
            if e["request_id"] in served_ids:
                logged[e["request_id"]] = e
        if logged.keys() == served_ids.keys() or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert logged.keys() == served_ids.keys()
    for rid, e in logged.items():
        body = served_ids[rid]
        assert e["experiments"] == body["experiments"] and e["status"] == ("cached" if body["cached"] else "ok")
        assert e["items"] == [it["product_id"] for it in body["items"]]
        assert e["positions"] == list(range(1, len(e["items"]) + 1)) and e["unit"] == "u:" + e["user_id"]

    # shoppers act: trending users click their first item (cited by request id), two control users buy
    now = time.time()
    events = []
    for i, (u, body) in enumerate(first.items()):
        item = body["items"][0]["product_id"]
        base = {"user_id": u, "session_id": f"ab-{u}", "product_id": item, "timestamp": now,
                "rec_request_id": body["request_id"]}
        if variants[u][0] == "trending":
            events.append({**base, "event_id": f"ab-click-{i}", "event_type": "click"})
    control = [u for u in first if variants[u][0] == "control"][:2]
    for i, u in enumerate(control):
        base = {"user_id": u, "session_id": f"ab-{u}", "product_id": first[u]["items"][1]["product_id"],
                "timestamp": now, "rec_request_id": first[u]["request_id"], "price": 10.0, "quantity": 2}
        events += [{**base, "event_id": f"ab-cart-{i}", "event_type": "add_to_cart"},
                   {**base, "event_id": f"ab-buy-{i}", "event_type": "purchase"}]
    r = await srv.http.post("/api/v1/events", json=events)
    assert r.status_code == 202, r.text

    srv.procs.start("attribution")
    trending_users = sum(1 for v in variants.values() if v[0] == "trending")

    want = {"control": (impressions["control"], 0, 2), "trending": (impressions["trending"], trending_users, 0)}
    got = {}

    async def attributed():
        totals = await read_totals(srv.redis, s.redis_namespace, "ab-sources")
        got.update({v: (t.impressions, t.clicked, t.bought) for v, t in totals.items()})
        return got == want or None
    try:
        await wait_for(attributed, 60, "the attribution worker's totals", interval_s=0.5,
                       check=lambda: srv.procs.check_alive("attribution"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}: (impressions, clicked, bought) {got} != {want}\n"
                             f"{srv.procs.tail('attribution')}") from None
    totals = await read_totals(srv.redis, s.redis_namespace, "ab-sources")
    assert totals["control"].revenue == 40.0 and totals["control"].units_bought == 2
    assert totals["trending"].units == trending_users and totals["trending"].units_clicked == trending_users

    # the report, and a promotion refused (a young test), then forced
    text, js, png = await asyncio.to_thread(commands.report, s, "ab-sources", "ctr", tmp_path)
    record = orjson.loads(js.read_bytes())
    assert record["units"] == {"control": len(users) - trending_users, "trending": trending_users}
    assert png.stat().st_size > 10_000 and "chi2 on users" in text and "SRM" in text
    with pytest.raises(commands.PromotionRefused, match="too young"):
        await asyncio.to_thread(commands.promote, s, "ab-sources", "trending", "ctr", False, None, lambda _: None)
    with pytest.raises(commands.ExperimentError, match="unknown variant"):
        await asyncio.to_thread(commands.promote, s, "ab-sources", "nope", "ctr", True, None, lambda _: None)
    done = await asyncio.to_thread(commands.promote, s, "ab-sources", "trending", "ctr", True, None, lambda _: None)
    assert done.decision.reason.startswith("forced despite") and done.defaults.sources == ("popular",)
    with pytest.raises(commands.ExperimentError, match="has ended"):
        await asyncio.to_thread(commands.promote, s, "ab-sources", "trending", "ctr", True, None, lambda _: None)

    async def promoted():   # every shopper now gets the promoted configuration, outside the ended experiment
        r, body, _ = await srv.ask("homepage", user_id=users[1], count=6)
        return ("ab-sources" not in (body.get("experiments") or {})
                and {it["source"] for it in body["items"]} == {"popular"})
    await wait_for(promoted, 20, "the promoted defaults")

    # back to production as it was, for the tests after this one
    assert (await _admin(srv, "PUT", "/defaults", {})).status_code == 200
    for eid in ("ab-sources", "ab-diversity"):
        assert (await _admin(srv, "DELETE", f"/experiments/{eid}", force=1)).status_code == 200

    async def cleared():
        r, body, _ = await srv.ask("homepage", user_id=users[1], count=6)
        return not body.get("experiments") and len({it["source"] for it in body["items"]}) > 1
    await wait_for(cleared, 20, "experiments cleared")


async def test_ab_ranker_variant_ranks_with_the_named_version_and_promotion_makes_it_champion(served: Served, tmp_path):
    from cli import experiments as commands

    srv, s = served, served.s
    old = srv.version
    registry = Registry(s.mlflow_tracking_uri, s.model_name)

    def register_challenger() -> str:
        bundle = registry.download(CHAMPION, tmp_path / "champion")
        reg = registry.register(bundle, registry.champion_metrics(), {"source": "test_serving: a challenger"},
                                PROMOTION_METRIC, s.promotion_margin)
        registry.make_champion(old, "test: the champion stays")
        registry.client.set_registered_model_alias(s.model_name, "challenger", reg.version)
        return reg.version
    new = await asyncio.to_thread(register_challenger)
    assert new != old and await asyncio.to_thread(registry.champion_version) == old

    r = await _admin(srv, "PUT", "/experiments/ab-ranker", _experiment("ab-ranker", "ranking",
                                                                       challenger={"ranker": "challenger"}))
    assert r.status_code == 201, r.text
    users = sorted({e.user_id for e in srv.data.events})[:24]

    polls = iter(range(10**6))   # a new `page` per poll: the homepage cache would answer the first ranking again

    async def both_versions():   # the ranking agent loads the challenger in the background
        bodies = await _homepages(srv, users, count=5, page=f"poll{next(polls)}")
        seen = {(b["experiments"]["ab-ranker"], b["model_version"]) for b in bodies.values() if b.get("experiments")}
        return seen == {("control", old), ("challenger", new)} or None
    await wait_for(both_versions, 60, "control ranked by the champion, challenger by the challenger",
                   interval_s=0.5, check=lambda: srv.procs.check_alive(*SERVING))

    done = await asyncio.to_thread(commands.promote, s, "ab-ranker", "challenger", "ctr", True, None, lambda _: None)
    assert (done.champion_before, done.champion_after) == (old, new)
    assert await asyncio.to_thread(registry.champion_version) == new and (await current(s))["version"] == new

    async def everyone_on_new():
        bodies = await _homepages(srv, users[:8], count=4, page=f"poll{next(polls)}")
        return all(b["model_version"] == new and not b.get("experiments") for b in bodies.values())
    await wait_for(everyone_on_new, 60, f"every reply from version {new}", interval_s=0.5,
                   check=lambda: srv.procs.check_alive(*SERVING))
    srv.version = new
    assert (await _admin(srv, "DELETE", "/experiments/ab-ranker", force=1)).status_code == 200


# -- 2. a serving agent dies: fallback within the deadline, then recovery ------------------------------------

@pytest.mark.parametrize("role", ["retrieval", "ranking"])
async def test_a_killed_agent_means_fallback_within_the_deadline_then_recovery(served: Served, role):
    srv = served
    deadline_s = srv.s.serving_deadline_ms / 1000
    # the known shopper's homepage, at a count never cached (a cached reply is served without the agents)
    cases = [c if not c[1].get("user_id") else (c[0], {**c[1], "count": 7}, c[2]) for c in srv.cases()]
    # the API learns who serves which version from the agents' reports (PATH_CHECK_S): after an earlier
    # test's swap, the kill waits until it has learnt the served version
    await wait_for(lambda: _ready(srv), 30, f"/readyz naming version {srv.version}", interval_s=0.2)
    srv.procs.kill(role)
    try:
        for path, params, exclude in cases * 2:
            r, body, took = await srv.ask(path, **params)
            assert r.status_code == 200, r.text
            assert body["fallback"] is True, body
            assert took < deadline_s + MARGIN_S, f"{path}: {took * 1000:.0f} ms"
            assert f"no reply within {srv.s.serving_deadline_ms} ms" in body["error"], body
            ids = [it["product_id"] for it in body["items"]]
            assert ids and len(set(ids)) == len(ids) and not set(ids) & exclude, body
            # the fallback names the version the agents serve, not "none"
            assert all(it["reason"] for it in body["items"]) and body["model_version"] == srv.version, body
        # once the dead agent's report is stale, readiness says so and the fallback names the real reason
        gone = f"no {role} agent has reported in the last"

        async def not_ready() -> bool:
            r = await srv.http.get("/readyz")
            return r.status_code == 503 and r.json()["status"].startswith(gone)
        await wait_for(not_ready, 30, f"/readyz saying no {role} agent", interval_s=0.3)
        path, params, _ = cases[0]
        r, body, _ = await srv.ask(path, **params)
        assert body["fallback"] and body["error"].startswith(gone) and body["model_version"] == srv.version, body
    finally:
        srv.procs.start(role)

    await wait_for(lambda: _ready(srv), 60, f"/readyz after {role} restarted", interval_s=0.3,
                   check=lambda: srv.procs.check_alive(*SERVING))
    for path, params, _ in srv.cases():
        await wait_for(lambda: _answered(srv, path, params), 60, f"{path} answered after {role} restarted",
                       interval_s=0.2, check=lambda: srv.procs.check_alive(*SERVING))


async def _ready(srv: Served) -> bool:
    r = await srv.http.get("/readyz")
    return r.status_code == 200 and r.json() == {"status": "ready", "model_version": srv.version}


async def _exposures(s: Settings) -> tuple[Counter, dict[TopicPartition, int]]:
    """The records per request id on the exposures topic, read to its end, and those end offsets."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(s.topic("exposures"), p) for p in range(s.clickstream_partitions)]   # streams/topics.py
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        ids: Counter = Counter()
        async def behind() -> bool:
            return any([await consumer.position(tp) < end[tp] for tp in parts])
        while await behind():
            for tp, msgs in (await consumer.getmany(timeout_ms=500)).items():
                ids.update(orjson.loads(m.value)["request_id"] for m in msgs if m.offset < end[tp])
        return ids, end
    finally:
        await consumer.stop()


async def test_an_api_process_killed_under_load_loses_no_exposure(served: Served):
    """Exposures are at least once (serving/journal.py) and counted once: every list a client received
    (a 200) is on the exposures topic although the API process that served it was killed (SIGKILL) while
    three clients kept asking (the next API process sends what the dead one had journaled but not yet
    delivered), and the attribution worker counts each exposure on the topic exactly once, though the
    topic may hold one twice (a line the dead process had sent but not yet deleted from its journal)."""
    srv = served
    answered: list[str] = []
    stop = asyncio.Event()

    async def client(k: int) -> None:
        i = k
        while not stop.is_set():
            path, params, _ = srv.cases()[i % len(srv.cases())]
            try:
                r = await srv.http.get(f"{API}/{path}", params={**params, "count": 5 + i % 7})
            except httpx.TransportError:   # the process is gone, or not back yet
                await asyncio.sleep(0.05)
                continue
            if r.status_code == 200:
                answered.append(r.json()["request_id"])
            i += 3

    clients = [asyncio.create_task(client(k)) for k in range(3)]
    try:
        await wait_for(lambda: _true(len(answered) >= 40), 60, "40 answers before the kill", interval_s=0.1)
        srv.procs.kill("api")
        killed_at = len(answered)
        journal = srv.s.home_dir / "exposures" / srv.s.topic("exposures")
        left = sum(len(f.read_bytes().splitlines()) for f in journal.glob("*.jsonl"))   # lines not yet deleted
        print(f"\nEXPOSURE-FIGURES answered_before_kill {killed_at} journal_lines_left_by_the_dead_process {left}")
        srv.procs.start("api")
        await wait_for(lambda: _true(len(answered) >= killed_at + 20), 90, "answers from the new API process",
                       interval_s=0.2, check=lambda: srv.procs.check_alive(*SERVING))
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
    want = set(answered)

    async def all_logged() -> bool:
        return want <= (await _exposures(srv.s))[0].keys()
    await wait_for(all_logged, 60, "every answered request's exposure on the topic", interval_s=1.0)

    # counted once each: the A/B totals of every exposure ("_all") equal the distinct lists on the topic
    from recstream.experiments.attribution import ALL_EXPERIMENT, ALL_VARIANT
    from streams.attribution_store import read_offsets, read_totals

    if not srv.procs.alive("attribution"):
        srv.procs.start("attribution")
    seen: dict = {}

    async def counted() -> bool:
        on_topic, end = await _exposures(srv.s)
        stored = await read_offsets(srv.redis, srv.s.redis_namespace)
        totals = (await read_totals(srv.redis, srv.s.redis_namespace, ALL_EXPERIMENT)).get(ALL_VARIANT)
        seen.update(records=sum(on_topic.values()), distinct=len(on_topic), counted=totals.impressions if totals else 0,
                    behind={f"{tp.partition}": n - stored.get(tp, 0) for tp, n in end.items()})
        return all(stored.get(tp, 0) >= n for tp, n in end.items()) and seen["counted"] == seen["distinct"]
    try:
        await wait_for(counted, 90, "the attribution worker through the exposures topic", interval_s=1.0,
                       check=lambda: srv.procs.check_alive("attribution"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {seen}\n{srv.procs.tail('attribution')}") from None
    imp = keys.AttributionKeys(srv.s.redis_namespace).imp
    assert await srv.redis.exists(*(imp(rid) for rid in want)) == len(want)   # each answered list among them
    print(f"EXPOSURE-FIGURES on_topic {seen['records']} distinct {seen['distinct']} counted {seen['counted']}")


async def _true(value: bool) -> bool:
    return value


# -- 3. a new model version under load -----------------------------------------------------------------------

async def test_a_new_version_is_swapped_in_under_load_without_a_failed_request(served: Served, tmp_path):
    srv, s = served, served.s
    old = srv.version
    registry = Registry(s.mlflow_tracking_uri, s.model_name)

    def register_again():
        bundle = registry.download(CHAMPION, tmp_path / "champion")
        reg = registry.register(bundle, registry.champion_metrics(), {"source": "test_serving: the champion again"},
                                PROMOTION_METRIC, s.promotion_margin)
        return bundle, reg
    bundle, reg = await asyncio.to_thread(register_again)
    assert reg.alias == CHAMPION and reg.version != old
    new = reg.version

    results: list[tuple[int, dict, float]] = []
    stop = asyncio.Event()

    async def load(rate_per_s: float = 30):
        cases = [c for c in srv.cases() if c[1].get("user_id") is None]   # not the cached homepage
        i = 0
        start = time.perf_counter()
        while not stop.is_set():
            path, params, _ = cases[i % len(cases)]
            r, body, took = await srv.ask(path, **params)
            results.append((r.status_code, body, took))
            i += 1
            await asyncio.sleep(max(0.0, start + i / rate_per_s - time.perf_counter()))

    sender = asyncio.create_task(load())
    try:
        await asyncio.sleep(1.0)   # load before the swap
        published = await publish_model(s, s.model_name, new, BatchOutputs.load(bundle / "batch"), progress=lambda _: None)
        assert published.version == new and (await current(s))["version"] == new

        async def switched():
            tail = results[-20:]
            return len(tail) == 20 and all(b.get("model_version") == new for _, b, _ in tail)
        await wait_for(switched, 60, f"replies from version {new}", interval_s=0.2,
                       check=lambda: srv.procs.check_alive(*SERVING))
        await asyncio.sleep(1.0)   # and after
    finally:
        stop.set()
        await sender
    srv.version = new
    failed = [(status, body) for status, body, _ in results if status != 200 or body["fallback"]]
    assert not failed, f"{len(failed)} of {len(results)} requests failed or fell back: {failed[:3]}"
    versions = [b["model_version"] for _, b, _ in results]
    assert set(versions) == {old, new}, Counter(versions)
    switch = versions.index(new)
    assert versions[0] == old and all(v == new for v in versions[-20:]), versions
    assert len(results) > 60, len(results)
    # every reply still a full, valid one
    for _status, body, _ in results[switch:][-8:]:
        assert len(body["items"]) == (4 if body["kind"] == "cart" else 8)



async def test_the_serving_agents_yield_the_cores_to_the_features_and_the_api(served: Served):
    """Freshness first (RECSTREAM_SERVING_NICE, RECSTREAM_BACKGROUND_NICE): the retrieval, ranking and
    attribution workers run below the normal CPU priority; the feature worker and the API (which takes
    the events in) do not."""
    if not served.procs.alive("attribution"):
        served.procs.start("attribution")
    own = os.getpriority(os.PRIO_PROCESS, 0)   # the workers start at this test's own niceness
    lowered, background = min(19, own + served.s.serving_nice), min(19, own + served.s.background_nice)
    assert served.s.serving_nice > 0 and served.s.background_nice > 0
    want = {"features": own, "retrieval": lowered, "ranking": lowered, "api": own, "attribution": background}
    niceness: dict[str, int] = {}

    async def lowered_at_start() -> bool:   # a worker lowers its own priority as it starts
        niceness.update({name: os.getpriority(os.PRIO_PROCESS, served.procs.procs[name].pid) for name in want})
        return niceness == want and sessions() == {name: n - own for name, n in want.items()}

    def sessions() -> dict[str, int]:
        """Each worker leads a session of its own; where Linux weighs sessions against each other
        (autogroup), the session's nice is what counts (cli.main._lower_priority)."""
        out = {}
        for name in want:
            with contextlib.suppress(FileNotFoundError):   # a kernel without autogroup
                out[name] = int(Path(f"/proc/{served.procs.procs[name].pid}/autogroup").read_text().split()[-1])
        return out if out else {name: n - own for name, n in want.items()}
    try:
        await wait_for(lowered_at_start, 30, "the workers' niceness", interval_s=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {niceness} != {want}; sessions {sessions()}") from None
