"""Integration fixtures: the real local stack, started by the project's own scripts (never skipped)."""
import dataclasses
import uuid

import pytest

from cli import services
from recstream.settings import Settings, load

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def stack() -> Settings:
    s = load()
    services.install(s)
    services.up(s)
    return s


@pytest.fixture
def fresh(stack: Settings):
    """A factory of Settings with a namespace of their own: topic prefix, app id, Redis key prefix."""
    def make(**overrides) -> Settings:
        tag = uuid.uuid4().hex[:10]
        values = {"topic_prefix": f"t{tag}", "app_id": f"recstream-test-{tag}", "clickstream_partitions": 4,
                  "redis_namespace": f"t{tag}:"}
        return dataclasses.replace(stack, **{**values, **overrides})
    return make


async def read_topic(s: Settings, topic: str, timeout_ms: int = 5000) -> list:
    """Every record of a (small) topic from the beginning, with no consumer group."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=s.kafka_bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        return [m for batch in (await consumer.getmany(timeout_ms=timeout_ms)).values() for m in batch]
    finally:
        await consumer.stop()


async def read_changelog(s: Settings) -> dict:
    """The session table's changelog, last value per key: what a restoring worker reads."""
    import orjson
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(f"{s.app_id}-user-sessions-changelog", bootstrap_servers=s.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    rows = {}
    try:
        idle = 0
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=1000)
            idle = 0 if batch else idle + 1
            for msgs in batch.values():
                for m in msgs:
                    rows[orjson.loads(m.key)] = orjson.loads(m.value)
    finally:
        await consumer.stop()
    return rows
