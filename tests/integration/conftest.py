"""Integration fixtures: the real local stack, started by the project's own scripts (never skipped)."""
import dataclasses
import uuid

import pytest

from recstream import services
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
