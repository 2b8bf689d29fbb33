"""The one way to open the feature store's Redis connection: a single node or a Redis Cluster (settings)."""
from __future__ import annotations

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
