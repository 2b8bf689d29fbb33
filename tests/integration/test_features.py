import asyncio
import contextlib
import time

import redis.asyncio as aioredis
from faust.contrib.asgi import faust_app_running

from agents import features
from recstream.features import keys
from streams.app import create_app
from streams.online_store import open_store
from streams.producer import create_producer
from streams.replay import publish
from streams.topics import ensure_topics
from tests import factories
from tests.factories import bind, event
from tests.integration.conftest import read_topic

T0 = time.time() - 600


ev = bind(event, "i", "user", "kind", "pid", "category", t0=T0, dt=10.0)
product = bind(factories.product, "pid", "category", "in_stock", created_at=T0 - 86400)


async def wait_until(cond, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await cond():
            return True
        await asyncio.sleep(0.1)
    return False


@contextlib.asynccontextmanager
async def feature_agents(s):
    """The feature agents of `s` running in this process, for the body of the `async with`."""
    await ensure_topics(s)
    client = aioredis.from_url(s.redis_url)
    app = create_app(s)
    agents = features.register(app, s, client)
    try:
        async with faust_app_running(app):
            yield agents
    finally:
        await client.aclose()


async def run_agents(s, records_by_topic, until):
    await ensure_topics(s)
    client = aioredis.from_url(s.redis_url)
    app = create_app(s)
    agents = features.register(app, s, client)
    async with faust_app_running(app):
        producer = create_producer(s)
        await producer.start()
        try:
            for topic, records in records_by_topic:
                await publish(producer, s.topic(topic), records, progress=False)
        finally:
            await producer.stop()
        assert await wait_until(lambda: until(agents)), agents.stats
    return agents, client


async def test_events_in_features_out_with_the_right_values(fresh, tmp_path):
    s = fresh(home_dir=tmp_path)
    catalogue = [product("p1", "Audio"), product("p2", "Audio"), product("p3", "Phones"), product("p4", "Cables")]
    events = [
        ev(1, "u1", "view", "p1"),                        # category filled in from item_features
        ev(2, "u1", "view", "p2", "Audio"),
        ev(3, "u1", "click", "p3", "Phones"),
        ev(4, "u1", "add_to_cart", "p2", "Audio"),
        ev(5, "u1", "purchase", "p2", "Audio"),
        ev(6, "u1", "purchase", "p4", "Cables"),
        ev(5, "u1", "purchase", "p2", "Audio"),           # a repeated event_id: counted once
        ev(7, "u2", "view", "p2", "Audio"),
        ev(8, "u2", "view", "p1", "Audio"),
        ev(9, "u2", "view", "p3", "Phones", session="s9"),  # a new session starts a new list
    ]

    async def done(agents):
        return agents.stats.seen == len(events) and agents.stats.items == len(catalogue)

    # catalogue first and alone, so the category lookup for e1 finds it
    agents, client = await run_agents(s, [("catalogue", catalogue), ("clickstream", events)], done)
    store = agents.store
    try:
        assert agents.stats.duplicates == 1
        assert await store.user_session("u1") == ["p3", "p2", "p1"]
        f = await store.user_features("u1")
        assert f["last_viewed"] == "p3" and f["cart_items"] == [] and f["purchases"] == ["p4", "p2"]
        assert f["session_categories"] == {"Audio": 2, "Phones": 1}
        assert await store.user_session("u2") == ["p3"]
        assert (await store.user_features("u2"))["session_categories"] == {"Phones": 1}
        assert 0 < await client.ttl(s.redis_namespace + keys.user_session("u1")) <= s.session_idle_timeout_s
        assert dict(await store.neighbours("covis", "p2")) == {"p1": 2.0, "p3": 1.0}   # u1 and u2 both
        assert dict(await store.neighbours("cobuy", "p4")) == {"p2": 1.0}
        views = await store.popularity("view", time.time(), s.popularity_window_days, ["p1", "p2", "p3"])
        assert views == {"p1": 2.0, "p2": 2.0, "p3": 1.0}
        purchases = await store.popularity("purchase", time.time(), 7, ["p2"])
        assert purchases == {"p2": 1.0}   # the repeat did not count
        top = [pid for pid, _ in await store.trending(time.time(), s.trending_half_life_s, n=4)]
        assert top[0] == "p2"               # 2 views + cart + purchase outweighs the rest
        audio = [pid for pid, _ in await store.trending(time.time(), s.trending_half_life_s, category="Audio")]
        assert set(audio) == {"p1", "p2"}
        item = await store.item_features("p3")
        assert item["category"] == "Phones" and item["in_stock"] == "1" and item["price"] == "10.0"
    finally:
        await client.aclose()


async def test_a_stock_change_reaches_item_features(fresh, tmp_path):
    s = fresh(home_dir=tmp_path)
    await ensure_topics(s)
    client = aioredis.from_url(s.redis_url)
    app = create_app(s)
    features.register(app, s, client)
    try:
        async with faust_app_running(app):
            producer = create_producer(s)
            await producer.start()
            try:
                await publish(producer, s.topic("catalogue"), [product("p7", "Audio")], progress=False)
                assert await wait_until(lambda: _eq(client, s, "p7", "1"))
                # the update follows (how fast: bench/ingest.py; a test asserts behaviour, not latency)
                await publish(producer, s.topic("catalogue"), [product("p7", "Audio", in_stock=False)], progress=False)
                assert await wait_until(lambda: _eq(client, s, "p7", "0"), timeout_s=30)
            finally:
                await producer.stop()
    finally:
        await client.aclose()


async def _eq(client, s, pid, in_stock):
    return await client.hget(s.redis_namespace + keys.item_features(pid), "in_stock") == in_stock.encode()


async def test_malformed_records_go_to_the_dead_letter_topic_and_the_stream_goes_on(fresh, tmp_path):
    from streams import deadletter

    s = fresh(home_dir=tmp_path)
    bad = [b"{oops", b'{"event_id":"x","user_id":"u1"}', ev(1, "u1", "view", "p1").to_json().replace(b'"view"', b'"wish"')]
    good = [ev(2, "u1", "view", "p1"), ev(3, "u1", "view", "p2")]
    async with feature_agents(s) as agents:
        producer = create_producer(s)
        await producer.start()
        try:
            for raw in bad:
                await producer.send_and_wait(s.topic("clickstream"), raw, key=b"u1")
            await publish(producer, s.topic("clickstream"), good, progress=False)
        finally:
            await producer.stop()

        async def done():
            return agents.stats.seen == len(bad) + len(good)
        assert await wait_until(done)
        assert await agents.store.user_session("u1") == ["p2", "p1"]  # after the bad ones
    assert agents.stats.dead_letters == len(bad)
    msgs = await read_topic(s, s.topic("deadletter"))
    letters = [deadletter.DeadLetter.from_headers(m.key, m.value, list(m.headers)) for m in msgs]
    assert [lt.value for lt in letters] == bad  # the raw bytes, untouched
    assert [lt.field for lt in letters] == ["<body>", "session_id", "event_type"]
    assert "malformed JSON" in letters[0].reason and "'wish' is not one of" in letters[2].reason
    assert all(lt.source_topic == s.topic("clickstream") and lt.key == b"u1" for lt in letters)
    assert [lt.offset for lt in letters] == [0, 1, 2]


async def test_records_the_consumer_skipped_are_read_again_from_kafka(fresh, tmp_path):
    """A group whose committed offset is past records Redis never applied (what faust's seek during a
    rebalance left behind in about one rebalance test in four): the worker finds the hole between
    the applied offset and its first record, reads the skipped records again, and counts them."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from tests.integration.serving_stack import Processes, wait_for

    s = fresh(home_dir=tmp_path, clickstream_partitions=1)
    await ensure_topics(s)
    events = [ev(i, "u1", "view", f"p{i}") for i in range(1, 9)]
    client = aioredis.from_url(s.redis_url)
    store = open_store(s, client)
    producer = create_producer(s)
    await producer.start()
    procs = Processes(s, tmp_path)
    try:
        await publish(producer, s.topic("clickstream"), events[:2], progress=False)
        procs.start("features")
        await wait_for(lambda: _applied(store, 1), 90, "the first two events applied",
                       check=lambda: procs.check_alive("features"))
        procs.stop_all()
        await publish(producer, s.topic("clickstream"), events[2:], progress=False)
        tp = TopicPartition(s.topic("clickstream"), 0)
        group = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=s.app_id, enable_auto_commit=False)
        await group.start()
        try:
            group.assign([tp])
            await group.commit({tp: 4})   # offsets 2 and 3 skipped: never delivered to the worker
        finally:
            await group.stop()
        procs.start("features")

        async def all_counted() -> bool:
            f = await store.user_features("u1")
            return bool(f) and f["events"] == 8
        await wait_for(all_counted, 90, "all 8 events counted", check=lambda: procs.check_alive("features"))
        assert await store.user_session("u1") == [f"p{i}" for i in range(8, 0, -1)]
        views = await store.popularity("view", time.time(), s.popularity_window_days, ["p3", "p4"])
        assert views == {"p3": 1.0, "p4": 1.0}
        assert "offsets 2-3 were skipped by the consumer; 2 records read again" in procs.tail("features", 100_000)
    finally:
        procs.stop_all()
        await producer.stop()
        await client.aclose()


async def _applied(store, offset: int) -> bool:
    return (await store.applied_offsets([0]))[0] >= offset


async def test_a_backlog_is_taken_in_wide_batches_and_fresh_events_in_short_ones(fresh, tmp_path):
    """Records appended a minute before the agent starts: it is behind, so it gathers for the longest
    window (batch_window) and takes the backlog in a few large batches (a 20 ms window: dozens); an
    event appended now, once it is caught up, brings the window back to the shortest."""
    s = fresh(home_dir=tmp_path)
    await ensure_topics(s)
    backlog = [ev(i, f"u{i % 40}", "view", f"p{i % 25}", dt=0.1) for i in range(1, 3001)]
    a_minute_ago = int((time.time() - 60) * 1000)
    producer = create_producer(s)
    await producer.start()
    try:
        sent = [await producer.send(s.topic("clickstream"), e.to_json(), key=e.key, timestamp_ms=a_minute_ago)
                for e in backlog]
        await asyncio.gather(*sent)
        async with feature_agents(s) as agents:
            async def seen(n: int):
                return agents.stats.seen == n
            assert await wait_until(lambda: seen(len(backlog))), agents.stats
            assert sum(agents.stats.processed.values()) == len(backlog), agents.stats
            widest = s.feature_batch_within_max_ms / 1000
            assert agents.stats.window_s == widest
            assert agents.stats.batches < 10, agents.stats.batches
            shortest, windows = s.feature_batch_within_ms / 1000, []
            for i in range(1, 6):   # events appended now, one at a time: a batch or two brings it down
                await publish(producer, s.topic("clickstream"), [ev(5000 + i, "u-now", "view", f"p{i}",
                                                                    timestamp=time.time())], progress=False)
                assert await wait_until(lambda: seen(len(backlog) + i)), agents.stats
                caught_up = await wait_until(lambda: _window_is(agents, shortest), timeout_s=3)
                windows.append(agents.stats.window_s)   # (the window is chosen as the next batch begins)
                if caught_up:
                    break
            assert windows[-1] == shortest and len(windows) <= 3, windows
            assert (await agents.store.user_session("u-now"))[0] == f"p{len(windows)}"
            assert (await agents.store.user_features("u7"))["events"] == len(backlog) // 40, agents.stats
    finally:
        await producer.stop()


async def _window_is(agents, seconds: float) -> bool:
    return agents.stats.window_s == seconds
