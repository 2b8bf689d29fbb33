"""POST /api/v1/events on the real broker: acked events are on the topic, refused ones are not."""
import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import Event
from serving.app import create_app
from streams.producer import create_producer
from streams.topics import ensure_topics
from tests.factories import bind, event_json

JSON = {"content-type": "application/json"}
BODY_LIMIT = 1700  # bytes, for the bad-input table
HANG_S = 30.0     # "never hangs" bounds on a busy box; how fast the API answers is bench/'s to measure


event = bind(event_json, "i", user=lambda f: f"u{f['i'] % 7}", session=lambda f: f"s{f['i'] % 7}",
             ts=lambda f: time.time() - 60)


@contextlib.asynccontextmanager
async def api(s, producer=None) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running (the producer started), and a client bound to it."""
    app = create_app(s, producer)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            yield client


async def topic_records(s, expected: int, timeout_s: float = 20) -> list:
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(s.topic("clickstream"), p) for p in range(s.clickstream_partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        out: list = []
        deadline = time.monotonic() + timeout_s
        while len(out) < expected and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(msgs)
        return out
    finally:
        await consumer.stop()


async def end_offsets(s) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(s.topic("clickstream"), p) for p in range(s.clickstream_partitions)]
        return sum((await consumer.end_offsets(parts)).values())
    finally:
        await consumer.stop()


async def test_a_single_event_is_acked_and_on_the_topic_keyed_by_user(fresh):
    s = fresh()
    await ensure_topics(s)
    async with api(s) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        sent = event(1, event_type="purchase", price=19.9, quantity=2)
        response = await client.post("/api/v1/events", content=orjson.dumps(sent), headers=JSON)
    assert response.status_code == 202 and response.json() == {"accepted": 1}
    [record] = await topic_records(s, 1)
    assert record.key == b"u1"
    assert Event.from_json(record.value) == Event.from_dict(sent)
    assert orjson.loads(record.value)["version"] == 1


async def test_a_batch_of_100_is_acked_and_all_come_back(fresh):
    s = fresh()
    await ensure_topics(s)
    sent = [event(i) for i in range(100)]
    async with api(s) as client:
        response = await client.post("/api/v1/events", json={"events": sent})
    assert response.status_code == 202 and response.json() == {"accepted": 100}
    records = await topic_records(s, 100)
    assert sorted(Event.from_json(r.value).event_id for r in records) == sorted(e["event_id"] for e in sent)
    assert all(r.key == Event.from_json(r.value).user_id.encode() for r in records)
    assert await end_offsets(s) == 100


async def chunks(parts: list[bytes], taken: list[int]) -> AsyncIterator[bytes]:
    for part in parts:
        taken.append(len(part))
        yield part


@pytest.mark.parametrize("content, headers, status, expect", [
    (b"{not json", JSON, 400, {"error": "malformed JSON"}),
    (b"[]", JSON, 400, {"error": "empty batch: send at least one event"}),
    (orjson.dumps(event(1)), {"content-type": "text/plain"}, 415, {"error": "Content-Type must be application/json"}),
    (orjson.dumps(event(1)), {}, 415, {"error": "Content-Type must be application/json, got none"}),
    (orjson.dumps(event(1, quantity=-2)), JSON, 422,
     {"error": "invalid event", "fields": [{"field": "quantity", "reason": "must be at least 1, got -2"}]}),
    (orjson.dumps([event(0), event(1), event(2), event(3, quantity=-2)]), JSON, 422,
     {"error": "1 of 4 events invalid; none was accepted",
      "fields": [{"field": "events[3].quantity", "reason": "must be at least 1, got -2"}]}),
    (orjson.dumps({"events": [event(0), event(1), event(0)]}), JSON, 422,
     {"fields": [{"field": "events[2].event_id", "reason": "repeats events[0].event_id 'e0'"}]}),
    (orjson.dumps([event(i) for i in range(11)]), JSON, 413,
     {"error": "11 events in one request; the limit is 10 events per request"}),
    (orjson.dumps([event(i, page="x" * 64) for i in range(10)]), JSON, 413,  # 10 events, 1.9 kB
     {"error": f"body over the limit of {BODY_LIMIT} bytes per request"}),
])
async def test_bad_input_is_refused_and_nothing_reaches_the_topic(fresh, content, headers, status, expect):
    s = fresh(http_max_batch_events=10, http_max_body_bytes=BODY_LIMIT)
    await ensure_topics(s)
    async with api(s) as client:
        response = await client.post("/api/v1/events", content=content, headers=headers)
    assert (len(content) > BODY_LIMIT) == expect.get("error", "").startswith("body over")  # the table's own check
    assert response.status_code == status, response.text
    body = response.json()
    for key, value in expect.items():
        assert value == body[key] or (isinstance(value, str) and value in body[key]), body
    assert await end_offsets(s) == 0


async def test_a_chunked_body_over_the_limit_is_413_and_not_read_to_the_end(fresh):
    s = fresh(http_max_body_bytes=10_000)
    await ensure_topics(s)
    taken: list[int] = []
    async with api(s) as client:  # no Content-Length: the limit holds on the bytes actually read
        response = await client.post("/api/v1/events", content=chunks([b" " * 1000] * 100, taken), headers=JSON)
    assert response.status_code == 413 and "10000 bytes" in response.json()["error"]
    assert 10 < len(taken) < 100  # stopped soon after the limit, not after all 100 kB
    assert await end_offsets(s) == 0


async def test_unknown_routes_and_methods_answer_json(fresh):
    s = fresh()
    async with api(s) as client:
        missing = await client.get("/api/v1/nothing")
        wrong = await client.get("/api/v1/events")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


async def test_the_kafka_contracts_json_schemas_are_served_as_docs_holds_them(fresh):
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs" / "schemas"
    async with api(fresh()) as client:
        for name in ("event.schema.json", "product.schema.json"):
            got = await client.get(f"/schemas/{name}")
            assert got.status_code == 200 and got.headers["content-type"] == "application/schema+json"
            assert got.content == (docs / name).read_bytes()
        described = (await client.get("/openapi.json")).json()["paths"]
    assert {"/schemas/event.schema.json", "/schemas/product.schema.json"} <= described.keys()


async def test_unreachable_kafka_is_503_with_retry_after_and_the_app_still_serves(fresh):
    s = fresh(produce_timeout_ms=500)
    await ensure_topics(s)
    dead = create_producer(dataclasses.replace(s, kafka_bootstrap="127.0.0.1:1"))
    started = time.monotonic()
    async with api(s, dead) as client:  # the lifespan waits produce_timeout_ms, then serves anyway
        assert time.monotonic() - started < HANG_S   # the broker never answers: without the wait's bound, forever
        health = await client.get("/healthz")
        response = await client.post("/api/v1/events", json=event(1))
    assert health.status_code == 503 and health.json() == {"error": "kafka unavailable", "status": "kafka unavailable"}
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "Kafka is not connected" in response.json()["error"]
    assert await end_offsets(s) == 0


async def test_kafka_not_acking_in_time_is_503_and_a_retry_may_duplicate(fresh):
    """The timeout path on the real broker: acks cannot come within 1 ms while the producer lingers
    50 ms. The events are still delivered afterwards: why a client retry after 503 may duplicate,
    and why consumers drop repeats by event_id."""
    s = fresh()
    await ensure_topics(s)
    slow = create_producer(s, linger_ms=50)
    async with api(dataclasses.replace(s, produce_timeout_ms=1), slow) as client:
        for _ in range(100):  # connecting is not bounded by the 1 ms: wait for it
            if (await client.get("/healthz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        await slow.partitions_for(s.topic("clickstream"))  # metadata cached: send() only queues
        response = await client.post("/api/v1/events", json=[event(1), event(2)])
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json() == {"error": "Kafka did not acknowledge within 1 ms; retry later"}
        late = await topic_records(s, 2)
    assert sorted(Event.from_json(r.value).event_id for r in late) == ["e1", "e2"]


async def test_a_producer_that_died_after_start_is_503_within_the_timeout(fresh):
    s = fresh(produce_timeout_ms=500)
    await ensure_topics(s)
    producer = create_producer(s)
    async with api(s, producer) as client:
        await producer.stop()
        started = time.monotonic()
        response = await client.post("/api/v1/events", json=event(1))
        assert time.monotonic() - started < HANG_S
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"].endswith("retry later")
    assert await end_offsets(s) == 0


async def test_an_idle_keep_alive_connection_outlives_the_clients_own_idle_expiry(fresh, tmp_path):
    """uvicorn's default keep-alive (5 s) equals httpx's idle expiry, so a client could reuse a connection
    just as the server closed it (a ReadError in the soak). The real server keeps it open
    RECSTREAM_HTTP_KEEPALIVE_S: the same connection still answers after 6 s of silence."""
    from tests.integration.serving_stack import Processes, wait_for

    s = fresh(http_keepalive_s=30)
    await ensure_topics(s)
    procs = Processes(s, tmp_path)
    procs.start("api")
    try:
        async def up() -> bool:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", procs.port)
                w.close()
                return True
            except OSError:
                return False
        await wait_for(up, 60, "the API to listen", check=lambda: procs.check_alive("api"))
        reader, writer = await asyncio.open_connection("127.0.0.1", procs.port)

        async def healthz() -> bytes:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            return head.split(b"\r\n")[0] + b" " + await reader.readexactly(length)

        first = await healthz()
        assert first == b'HTTP/1.1 200 OK {"status":"ok"}'
        await asyncio.sleep(6.0)   # with uvicorn's default the server has closed the connection by now
        assert await healthz() == first
        writer.close()
    finally:
        procs.stop_all()
