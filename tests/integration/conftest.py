"""Integration fixtures: the real local stack, started by the project's own scripts (never skipped)."""
import pytest

from cli import services
from recstream.settings import Settings, load
from tests.integration import namespaces

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def stack() -> Settings:
    s = load()
    services.install(s)
    services.up(s)
    return s


@pytest.fixture(scope="session", autouse=True)
async def _remove_namespaces():
    """At the session's end, the namespaces module- and session-scoped fixtures made (tests/integration/namespaces.py)."""
    yield
    await namespaces.remove_all()


@pytest.fixture
async def fresh(stack: Settings):
    """A factory of Settings with a namespace of their own: topic prefix, app id, Redis key prefix;
    the test's topics and keys are deleted after it."""
    made: list[Settings] = []

    def make(**overrides) -> Settings:
        made.append(namespaces.make(stack, **{"clickstream_partitions": 4, **overrides}))
        return made[-1]
    yield make
    for s in made:
        await namespaces.remove(s)


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
    """The session table's changelog, last value per key (None: a tombstone): what a restoring worker reads."""
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
                    rows[orjson.loads(m.key)] = None if m.value is None else orjson.loads(m.value)
    finally:
        await consumer.stop()
    return rows
