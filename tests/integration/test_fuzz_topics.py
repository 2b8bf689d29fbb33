"""Bad input at scale on Kafka: seeded random bytes on every topic a recstream consumer reads land in the
dead-letter topic, with their reason, once per consuming worker; the workers stay up and process the
valid records sent after the garbage.

Consumers: clickstream (feature worker, archive, attribution: three dead letters per bad record),
catalogue (feature worker), rec.requests (retrieval), rec.candidates (ranking), exposures (attribution).
Each worker runs as a `recstream worker` subprocess on the real Kafka and Redis."""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from recstream.features import keys
from schemas import Event, Product, RecommendationRequest
from streams.deadletter import DeadLetter
from streams.topics import TopicSpec, ensure_topics
from tests.integration.serving_stack import Processes, wait_for

pytestmark = pytest.mark.integration

SEED = 20261126
PER_TOPIC = 200
HUGE = 300_000                    # bytes: well inside Kafka's 1 MB message limit, with room for the headers
WORKERS = ("features", "archive", "attribution", "retrieval", "ranking")
# topic -> how many workers read it (each sends its own dead letter)
READERS = {"clickstream": 3, "catalogue": 1, "rec.requests": 1, "rec.candidates": 1, "exposures": 1}


def garbage(rng: random.Random, n: int, keyed: bool = False) -> list[tuple[bytes | None, bytes]]:
    """(key, value) pairs none of which is a valid record of any schema: empty, random bytes of random
    length (a few huge), invalid UTF-8, JSON of the wrong shape, near-records with bad ids or types.
    keyed: never a null key (a compacted topic refuses records without one)."""
    now = time.time()
    near = {"event_id": "e1", "user_id": "u:1", "session_id": "s1", "product_id": "p1", "event_type": "view",
            "timestamp": now}
    shapes = [b"null", b"1", b"-0.5e308", b'"text"', b"[]", b"[1,2,3]", b"{}", b'{"version": 99}', b"true",
              orjson.dumps({"unknown": "x" * 1000}), b"[" * 2000 + b"]" * 2000, b'{"a": NaN}',
              orjson.dumps({**near}), orjson.dumps({**near, "user_id": "u\x00"}),
              orjson.dumps({**near, "user_id": "u1", "product_id": "p*1"}),
              orjson.dumps({**near, "user_id": "u1", "timestamp": now * 1000}),
              orjson.dumps({"request_id": "r", "kind": "similar", "created_at": now}),
              orjson.dumps({"request_id": "r", "kind": "homepage", "created_at": now, "count": 10 ** 9})]
    out: list[tuple[bytes | None, bytes]] = []
    for i in range(n):
        roll = i % 10
        if i == 0:
            value = b""
        elif i in (1, 2, 3):
            value = rng.randbytes(HUGE)
        elif roll in (0, 1, 2):
            value = rng.randbytes(rng.randint(1, 2000))
        elif roll == 3:
            value = b'{"user_id": "' + rng.randbytes(rng.randint(1, 50)) + b'\xff\xfe"}'   # invalid UTF-8 in JSON
        elif roll == 4:
            value = bytes([0xC3, 0x28, 0xA0, 0xA1, 0xE2, 0x28, 0xA1]) * rng.randint(1, 100)
        else:
            value = rng.choice(shapes)
        key = rng.choice([b"" if keyed else None, b"", rng.randbytes(rng.randint(1, 64)), b"u1"])
        out.append((key, value))
    return out


@pytest.fixture
def workers(fresh, tmp_path):
    s = fresh(clickstream_partitions=1, request_partitions=1, home_dir=tmp_path, archive_flush_interval_s=2.0,
              experiments_file=tmp_path / "experiments.toml")
    asyncio.run(ensure_topics(s))
    procs = Processes(s, tmp_path)
    for name in WORKERS:
        procs.start(name)
    yield procs
    procs.stop_all()


async def _produce(s, records: list[tuple[str, bytes | None, bytes]]) -> list[tuple[str, int, int]]:
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all", max_request_size=1_000_000)
    await producer.start()
    try:
        acks = [await producer.send(topic, value, key=key) for topic, key, value in records]
        return [(m.topic, m.partition, m.offset) for m in await asyncio.gather(*acks)]
    finally:
        await producer.stop()


class Reader:
    """A group-less consumer of one topic from its beginning, read incrementally."""

    def __init__(self, s, topic: str):
        self.consumer = AIOKafkaConsumer(topic, bootstrap_servers=s.kafka_bootstrap, auto_offset_reset="earliest",
                                         enable_auto_commit=False, fetch_max_bytes=8_000_000,
                                         max_partition_fetch_bytes=4_000_000)
        self.records: list = []

    async def __aenter__(self):
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc):
        await self.consumer.stop()

    async def poll(self) -> list:
        for batch in (await self.consumer.getmany(timeout_ms=500)).values():
            self.records.extend(batch)
        return self.records


def _request(s, reply_to: str, tag: str = "probe") -> bytes:
    return RecommendationRequest.from_dict({"request_id": f"{tag}-{uuid.uuid4().hex}", "created_at": time.time(),
                                            "kind": "homepage", "deadline_ms": 10_000, "reply_to": reply_to}).to_json()


def test_random_bytes_on_every_topic_land_in_the_dead_letter_topic(workers):
    procs, s = workers, workers.s
    reply_to = s.topic("rec.replies.fuzz")
    asyncio.run(ensure_topics(s, [TopicSpec(reply_to, 1, "request_id", "reply", "fuzz test replies", {})]))
    asyncio.run(_run(procs, s, reply_to))


async def _run(procs: Processes, s, reply_to: str) -> None:
    rng = random.Random(SEED)
    client = aioredis.from_url(s.redis_url)
    now = time.time()
    try:
        async with Reader(s, reply_to) as replies, Reader(s, s.topic("deadletter")) as letters:
            # 1. a product and views of it (so retrieval has candidates: the ranking agent fails a batch whose
            # candidate list is empty, see the report), then, as the serving agents read from "latest",
            # wait until a probe request is answered
            seed_product = Product.from_dict({"product_id": "fuzz-p0", "title": "before the garbage",
                                              "category_path": ["Fuzz"], "price": 1.0, "created_at": now - 10})
            views = [Event.from_dict({"event_id": f"fuzz-v{i}", "user_id": f"fuzz-u{i}", "session_id": "s",
                                      "product_id": "fuzz-p0", "event_type": "view", "timestamp": now - 5})
                     for i in range(3)]
            await _produce(s, [(s.topic("catalogue"), b"fuzz-p0", seed_product.to_json())]
                           + [(s.topic("clickstream"), e.key, e.to_json()) for e in views])

            async def seeded():
                procs.check_alive()
                return await client.exists(s.redis_namespace + keys.user_session("fuzz-u2"))
            await wait_for(seeded, 120, "the feature worker to apply the seed events")

            async def answered():
                procs.check_alive()
                await _produce(s, [(s.topic("rec.requests"), b"probe", _request(s, reply_to))])
                return await replies.poll()
            await wait_for(answered, 120, "a reply to a probe request (retrieval and ranking up)", interval_s=1)

            # 2. the garbage, on every topic
            sent = []
            for name in READERS:
                sent += [(s.topic(name), key, value) for key, value in garbage(rng, PER_TOPIC, keyed=name == "catalogue")]
            positions = await _produce(s, sent)
            value_at = {pos: value for pos, (_, _, value) in zip(positions, sent)}

            # 3. valid records after it: an event, a product, a request
            product = Product.from_dict({"product_id": "fuzz-p1", "title": "after the garbage",
                                         "category_path": ["Fuzz"], "price": 1.0, "created_at": now - 10})
            event = Event.from_dict({"event_id": "fuzz-e1", "user_id": "fuzz-u1", "session_id": "fuzz-s1",
                                     "product_id": product.product_id, "event_type": "view", "timestamp": now})
            await _produce(s, [(s.topic("catalogue"), product.product_id.encode(), product.to_json()),
                               (s.topic("clickstream"), event.key, event.to_json())])
            n_replies = len(replies.records)
            after_tag = "after"

            # 4. every bad record in the dead-letter topic, once per reader, with its reason and bytes
            expected = sum(READERS[name[len(s.topic_prefix) + 1:]] for name, _, _ in sent)

            async def all_letters():
                procs.check_alive()
                return len(await letters.poll()) >= expected
            await wait_for(all_letters, 180, f"{expected} dead letters", interval_s=1)
            counts: Counter = Counter()
            for m in letters.records:
                letter = DeadLetter.from_headers(m.key, m.value, list(m.headers))
                pos = (letter.source_topic, letter.partition, letter.offset)
                assert pos in value_at, f"a dead letter of a record not sent as garbage: {letter}"
                assert letter.reason and letter.field, letter
                assert (m.value or b"") == value_at[pos], f"dead letter {pos} does not carry the original bytes"
                counts[pos] += 1
            for pos in positions:
                topic = pos[0][len(s.topic_prefix) + 1:]
                assert counts[pos] == READERS[topic], f"{pos}: {counts[pos]} dead letters, {READERS[topic]} readers"
            assert len(letters.records) == expected
            reasons = Counter(DeadLetter.from_headers(m.key, m.value, list(m.headers)).field for m in letters.records)
            print(f"{len(sent)} garbage records -> {len(letters.records)} dead letters; fields: {dict(reasons)}")

            # 5. the workers are alive and the valid records went through
            procs.check_alive()

            async def processed():
                got = await client.hget(s.redis_namespace + keys.item_features(product.product_id), "title")
                return got and await client.exists(s.redis_namespace + keys.user_session(event.user_id))
            await wait_for(processed, 60, "the valid event and product in Redis")

            async def answered_after():   # anonymous homepage: the seeded product is trending
                await _produce(s, [(s.topic("rec.requests"), b"after", _request(s, reply_to, after_tag))])
                return [m for m in (await replies.poll())[n_replies:]
                        if orjson.loads(m.value)["request_id"].startswith(after_tag)]
            await wait_for(answered_after, 60, "a reply to a valid request after the garbage", interval_s=1)

            async def archived():
                return any(f.stat().st_size > 0 for f in (s.archive_dir).rglob("*.parquet"))
            await wait_for(archived, 60, "the archive's Parquet file with the valid event")
            procs.check_alive()
            for name in WORKERS:
                assert "Traceback" not in procs.tail(name, 2_000_000), procs.tail(name)
    finally:
        await client.aclose()
