"""The one way to open the feature store's Redis connection: a single node or a Redis Cluster (settings)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeGuard

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from recstream.settings import Settings

AnyRedis = aioredis.Redis | RedisCluster


def connect(s: Settings, **kwargs: Any) -> AnyRedis:
    """`redis_url` as a single Redis, or, with `redis_cluster`, as one node of a cluster whose slot map
    the client reads from it (and follows on MOVED). `kwargs`: client options (timeouts)."""
    if s.redis_cluster:
        return RedisCluster.from_url(s.redis_url, **kwargs)
    return aioredis.from_url(s.redis_url, **kwargs)


def is_cluster(client: Any) -> TypeGuard[RedisCluster]:
    return isinstance(client, RedisCluster)


# keys a SCAN call visits: Redis runs one command at a time, so every call blocks the serving reads behind
# it for as long as it runs. COUNT 5000 took 10-11 ms a call on a 659k-key Redis (SLOWLOG), and an erasure
# of 1,000 shoppers (six keyspace passes) moved 8 % of the answers at 30 QPS to the fallback; 500 keeps
# each call near a millisecond, the same work in finer slices
SCAN_COUNT = 500


def scan(client: AnyRedis, match: str, count: int = SCAN_COUNT) -> AsyncIterator[Any]:
    """The keys matching `match`, by SCAN in small steps (background jobs beside serving: erasure,
    cleanup of old versions); on a cluster SCAN visits every master."""
    return client.scan_iter(match=match, count=count)
