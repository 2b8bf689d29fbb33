"""Attribution worker on the real Kafka + Redis: exact A/B totals, exactly once across a restart."""
import asyncio
import dataclasses
import time

import orjson
import redis.asyncio as aioredis

from recstream.experiments.attribution import VariantTotals
from recstream.stats import LatencyHistogram
from streams.attribution import run_attribution
from streams.attribution_store import read_daily, read_offsets, read_totals
from streams.deadletter import DeadLetter
from streams.producer import create_producer
from streams.topics import ensure_topics
from tests import factories
from tests.factories import bind
from tests.integration.conftest import read_topic

T = time.time() - 7200
BAD = b'{"event_id":"bad-1","user_id":"ua","event_type":"teleport"}'


exposure = bind(factories.exposure, "rid", "user", "experiments", "items", "ts")
event = bind(factories.event, "i", "user", "kind", "product", "ts", session=lambda f: f"s-{f['user_id']}")


def latency(*ms) -> tuple[int, ...]:
    h = LatencyHistogram()
    h.extend([m / 1000 for m in ms])
    return tuple(h.counts.tolist())


EXPOSURES_1 = [exposure("rA1", "ua", {"exp1": "A"}, ("p1", "p2"), T),
               exposure("rA2", "ua", {"exp1": "A"}, ("p3",), T + 10, status="cached", latency_ms=1.0),
               exposure("rB1", "ub", {"exp1": "B"}, ("p1", "p4"), T, status="fallback_deadline", latency_ms=300.0),
               exposure("rN", "uc", None, ("p5",), T, status="fallback_error", latency_ms=5.0)]
EVENTS_1 = [event("e1", "ua", "click", "p1", T + 20, rid="rA1"),
            event("e2", "ua", "purchase", "p1", T + 30, rid="rA1", price=10.0, quantity=2),
            event("e3", "ua", "add_to_cart", "p3", T + 100),                  # no request id, in the window: rA2
            event("e4", "ub", "click", "p4", T + 1800 + 50),                  # out of the window: unattributed
            event("e5", "ub", "click", "p1", T + 40, rid="rB1"),
            event("e5", "ub", "click", "p1", T + 40, rid="rB1"),              # duplicate
            event("e6", "uc", "purchase", "p5", T + 60, rid="rN"),            # no price: bought, 0 revenue
            event("e7", "ua", "view", "p2", T + 70)]                          # plain view: ignored
EXPOSURES_2 = [exposure("rB2", "ub", {"exp1": "B"}, ("p6",), T + 3000, latency_ms=20.0)]
EVENTS_2 = [event("e8", "ub", "purchase", "p6", T + 3010, rid="rB2", price=5.0),
            event("e1", "ua", "click", "p1", T + 20, rid="rA1")]              # a repeat of a counted event

A = VariantTotals(units=1, impressions=2, clicked=1, carted=1, bought=1, revenue=20.0, units_clicked=1, units_carted=1,
                  units_bought=1, sum_x2=4, sum_clicked2=1, sum_x_clicked=2, sum_carted2=1, sum_x_carted=2,
                  sum_bought2=1, sum_x_bought=2, sum_revenue2=400.0, sum_x_revenue=40.0, cached=1,
                  latency=latency(10, 1))
B1 = VariantTotals(units=1, impressions=1, clicked=1, units_clicked=1, sum_x2=1, sum_clicked2=1, sum_x_clicked=1,
                   fallback_deadline=1, latency=latency(300))
ALL1 = VariantTotals(units=3, impressions=4, clicked=2, carted=1, bought=2, revenue=20.0, units_clicked=2,
                     units_carted=1, units_bought=2, sum_x2=6, sum_clicked2=2, sum_x_clicked=3, sum_carted2=1,
                     sum_x_carted=2, sum_bought2=2, sum_x_bought=3, sum_revenue2=400.0, sum_x_revenue=40.0, cached=1,
                     fallback_deadline=1, fallback_error=1, unattributed=1, latency=latency(10, 1, 300, 5))
# after the second round: ub has 2 impressions in B (x 1 -> 2), one bought with revenue 5
B2 = dataclasses.replace(B1, impressions=2, bought=1, revenue=5.0, units_bought=1, sum_x2=4, sum_x_clicked=2,
                         sum_bought2=1, sum_x_bought=2, sum_revenue2=25.0, sum_x_revenue=10.0, latency=latency(300, 20))


async def produce(s, exposures, events, bad=False) -> dict:
    """Send everything; returns the end offset of every partition written: "topic:partition" -> next offset."""
    ends = {}
    producer = create_producer(s)
    await producer.start()
    try:
        sent = [await producer.send_and_wait(s.topic("exposures"), x.to_json(), key=x.key) for x in exposures]
        sent += [await producer.send_and_wait(s.topic("clickstream"), e.to_json(), key=e.key) for e in events]
        if bad:
            sent.append(await producer.send_and_wait(s.topic("clickstream"), BAD, key=b"ua"))
    finally:
        await producer.stop()
    for md in sent:
        k = f"{md.topic}:{md.partition}"
        ends[k] = max(ends.get(k, 0), md.offset + 1)
    return ends


async def run_until(s, client, ends: dict, timeout_s: float = 20, min_s: float = 0):
    """Run the worker until Redis holds offsets at `ends` (and at least `min_s`), then stop it cleanly."""
    stop = asyncio.Event()
    started = time.monotonic()
    task = asyncio.create_task(run_attribution(s, stop))
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            stored = {f"{tp.topic}:{tp.partition}": o for tp, o in (await read_offsets(client, s.redis_namespace)).items()}
            if all(stored.get(k, 0) >= v for k, v in ends.items()) and time.monotonic() - started >= min_s:
                break
            assert not task.done(), task.result()
            assert time.monotonic() < deadline, f"not caught up: stored {stored}, ends {ends}"
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 15) == 0


async def test_attribution_counts_exactly_once_through_redis_offsets(fresh):
    s = fresh()
    await ensure_topics(s)
    client = aioredis.from_url(s.redis_url)
    try:
        ends = await produce(s, EXPOSURES_1, EVENTS_1, bad=True)
        await run_until(s, client, ends)
        assert await read_totals(client, s.redis_namespace, "exp1") == {"A": A, "B": B1}
        assert await read_totals(client, s.redis_namespace, "_all") == {"all": ALL1}
        assert A.rates()["ctr"] == 0.5 and A.rates()["revenue_per_impression"] == 10.0

        # Restart under another consumer group (no Kafka offsets at all): positions come from Redis,
        # so nothing of round one is counted again; a repeated event id is dropped too.
        ends2 = await produce(s, EXPOSURES_2, EVENTS_2)
        s2 = dataclasses.replace(s, app_id=s.app_id + "-2")
        await run_until(s2, client, {k: max(ends.get(k, 0), v) for k, v in (ends | ends2).items()})
        assert await read_totals(client, s.redis_namespace, "exp1") == {"A": A, "B": B2}
        all2 = await read_totals(client, s.redis_namespace, "_all")
        assert (all2["all"].impressions, all2["all"].bought, all2["all"].revenue) == (5, 3, 25.0)

        # A third start with nothing new changes nothing.
        await run_until(s, client, {}, min_s=3)
        assert await read_totals(client, s.redis_namespace, "exp1") == {"A": A, "B": B2}

        # The day buckets add up to the totals.
        daily = await read_daily(client, s.redis_namespace, "exp1")
        for variant, want in (("A", A), ("B", B2)):
            days = list(daily[variant].values())
            assert sum(days[1:], days[0]) == want

        # The malformed record went to the dead-letter topic, once.
        letters = await read_topic(s, s.topic("deadletter"))
        assert len(letters) == 1 and letters[0].value == BAD
        letter = DeadLetter.from_headers(letters[0].key, letters[0].value, letters[0].headers)
        assert letter.source_topic == s.topic("clickstream") and "teleport" in letter.reason

        # On-call snapshot: the last run's counts and no lag.
        live = await client.zrange(f"{s.redis_namespace}metrics-index:attribution", 0, -1)
        snap = orjson.loads(await client.get(live[0]))
        assert len(live) == 1 and snap["lag_total"] == 0 and snap["agent"] == "attribution"
    finally:
        await client.aclose()
