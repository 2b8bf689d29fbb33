import asyncio
import time
from collections import Counter

from aiokafka import AIOKafkaConsumer
from faust.contrib.asgi import faust_app_running

from agents import clickstream
from recstream.data import ShopConfig, shop_dataset
from streams import deadletter
from streams.app import create_app
from streams.producer import create_producer
from streams.replay import publish
from streams.topics import ensure_topics

GOOD = b'{"event_id":"ok-%d","user_id":"u%d","session_id":"s","product_id":"p1","event_type":"view","timestamp":1.7e9}'


async def wait_until(cond, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return cond()


async def test_agent_counts_through_the_broker_and_dead_letters_bad_records(fresh, tmp_path):
    s = fresh(home_dir=tmp_path)
    await ensure_topics(s)
    data = shop_dataset(ShopConfig(users=30, products=150, seed=9, end_s=1_764_000_000.0))
    app = create_app(s)
    tally = clickstream.register(app, s)
    bad = [b"{oops", b'{"event_id":"x","user_id":"u1"}']
    async with faust_app_running(app):
        producer = create_producer(s)
        await producer.start()
        try:
            await publish(producer, s.topic("clickstream"), data.events, progress=False)
            for raw in bad:
                await producer.send_and_wait(s.topic("clickstream"), raw, key=b"u1")
            # the stream goes on after a refused record
            await producer.send_and_wait(s.topic("clickstream"), GOOD % (1, 1), key=b"u1")
        finally:
            await producer.stop()
        assert await wait_until(lambda: tally.stats.seen == len(data.events) + len(bad) + 1)
        expected = Counter()
        for e in data.events:
            expected[(e.user_id, e.event_type)] += 1
        expected[("u1", "view")] += 1
        got = Counter({(user, kind): n for user, row in tally.table.items() for kind, n in row.items()})
        assert got == expected
    assert tally.stats.dead_letters == 2

    consumer = AIOKafkaConsumer(s.topic("deadletter"), bootstrap_servers=s.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        msgs = [m for batch in (await consumer.getmany(timeout_ms=5000)).values() for m in batch]
    finally:
        await consumer.stop()
    letters = [deadletter.DeadLetter.from_headers(m.key, m.value, list(m.headers)) for m in msgs]
    assert [lt.value for lt in letters] == bad  # the raw bytes, untouched
    assert letters[0].field == "<body>" and "malformed JSON" in letters[0].reason
    assert letters[1].field == "session_id" and "is required" in letters[1].reason
    assert all(lt.source_topic == s.topic("clickstream") and lt.key == b"u1" for lt in letters)
