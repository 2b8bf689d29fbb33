"""Test namespaces on the shared stack (a topic prefix, an app id, a Redis key prefix) and their removal.

Every namespace made here is remembered until it is removed: its topics (`<prefix>.*`, and the Faust
apps' `<app id>-*` changelog and assignor topics) and its Redis keys. A test run leaves the shared
broker as it found it; before, a few local runs left ~20,000 partitions and the broker died with
"Too many open files". Only what this process made is removed: other test runs share the broker."""
from __future__ import annotations

import dataclasses
import shutil
import uuid

from aiokafka.admin import AIOKafkaAdminClient

from recstream.settings import Settings
from streams.online_store import unlink_matching
from streams.redisconn import connect
from streams.topics import delete_topics

_live: dict[str, Settings] = {}   # topic prefix -> the namespace's settings, until removed


NAMES = ("topic_prefix", "app_id", "redis_namespace")


def make(stack: Settings, **overrides) -> Settings:
    """`stack` with a namespace of its own, remembered for removal; `overrides` set other fields (not
    the namespace's names: removal deletes by them, and must never reach the user's `recs.*` topics)."""
    if named := set(NAMES) & overrides.keys():
        raise ValueError(f"a test namespace is named here, not by the test: {sorted(named)}")
    tag = uuid.uuid4().hex[:10]
    s = dataclasses.replace(stack, topic_prefix=f"t{tag}", app_id=f"recstream-test-{tag}", redis_namespace=f"t{tag}:",
                            **overrides)
    _live[s.topic_prefix] = s
    return s


def owned(s: Settings, topic: str) -> bool:
    return topic.startswith(f"{s.topic_prefix}.") or topic.startswith(f"{s.app_id}-")


async def topics_of(s: Settings) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        return sorted(t for t in await admin.list_topics() if owned(s, t))
    finally:
        await admin.close()


async def remove(s: Settings) -> tuple[int, int]:
    """Delete the namespace's topics, Redis keys and exposure journal folder (an API run in the test's
    process journals under the stack's home); (topics, keys) deleted. Forgets it either way."""
    _live.pop(s.topic_prefix, None)
    shutil.rmtree(s.home_dir / "exposures" / s.topic("exposures"), ignore_errors=True)
    names = await topics_of(s)
    if names:
        await delete_topics(s, names)
    client = connect(s)
    try:
        keys = await unlink_matching(client, s.redis_namespace + "*")
    finally:
        await client.aclose()
    return len(names), keys


async def remove_all() -> None:
    """Remove every namespace still remembered (the module- and session-scoped deployments')."""
    for s in list(_live.values()):
        await remove(s)
