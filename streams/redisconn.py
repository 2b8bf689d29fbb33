"""The one way to open the feature store's Redis connection: a single node or a Redis Cluster (settings)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, TypeGuard, cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from recstream.settings import Settings

AnyRedis = aioredis.Redis | RedisCluster


def connect(s: Settings, **kwargs: Any) -> AnyRedis:
    """`redis_url` as a single Redis, or, with `redis_cluster`, as one node of a cluster whose slot map
    the client reads from it (and follows on MOVED). `kwargs`: client options (timeouts). A single node's
    commands are packed by hiredis (HiredisPacking; redis-py's cluster client fixes its connection class)."""
    if s.redis_cluster:
        return RedisCluster.from_url(s.redis_url, **kwargs)
    client = aioredis.from_url(s.redis_url, **kwargs)
    pool = client.connection_pool   # the class the URL's scheme chose (TCP, TLS, unix socket), packing in C
    pool.connection_class = hiredis_packing(pool.connection_class)
    return client


class HiredisPacking:
    """Packs commands with hiredis (C) instead of redis-py's Python loop: the ranking agent's reads of one
    candidate set (stock of ~230 ids and the rest) took 162 us to pack in Python, 20 us in hiredis; the
    same bytes on the wire. An argument hiredis refuses (None, a bool) goes to redis-py, whose error
    (DataError) names the type, as without this."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0] or isinstance(args[0], bytes) and b" " in args[0]:
            return cast(list[bytes], super().pack_command(*args))   # type: ignore[misc]  # "CONFIG GET": split there
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return cast(list[bytes], super().pack_command(*args))   # type: ignore[misc]


_PACKING: dict[type, type] = {}


def hiredis_packing(base: type) -> type:
    """`base` (a redis.asyncio connection class) packing its commands with hiredis; one class per base."""
    if base not in _PACKING:
        _PACKING[base] = type(f"HiredisPacking{base.__name__}", (HiredisPacking, base), {})
    return _PACKING[base]


def score_pairs(raw: list[Any]) -> list[tuple[str, float]]:
    """A sorted set's `ZRANGE ... WITHSCORES` reply as sent without redis-py's reshaping (which formats each
    RESP3 score back to text and parses it again): [[member, score], ...] on RESP3, flat on RESP2."""
    if raw and not isinstance(raw[0], list):
        return [(m.decode(), float(sc)) for m, sc in zip(raw[::2], raw[1::2])]
    return [(m.decode(), sc) for m, sc in raw]


def is_cluster(client: Any) -> TypeGuard[RedisCluster]:
    return isinstance(client, RedisCluster)


# keys a SCAN call visits: Redis runs one command at a time, so every call blocks the serving reads behind
# it for as long as it runs. COUNT 5000 took 10-11 ms a call on a 659k-key Redis (SLOWLOG), and an erasure
# of 1,000 shoppers (six keyspace passes) moved 8 % of the answers at 30 QPS to the fallback; 500 keeps
# each call near a millisecond, the same work in finer slices
SCAN_COUNT = 500


async def scan(client: AnyRedis, match: str, count: int = SCAN_COUNT, share: float = 1.0) -> AsyncIterator[Any]:
    """The keys matching `match`, by SCAN in small steps (background jobs beside serving: erasure,
    cleanup of old versions); on a cluster SCAN visits every master in turn. With `share` < 1 it pauses
    after each call, for as long as the call and the caller's work on its keys took times (1/share - 1):
    the pass keeps Redis and the caller busy at most that share of the time (an erasure's passes over a
    large keyspace, README "Personal data")."""
    nodes: list[Any] = [None]
    if is_cluster(client):
        await client.initialize()   # (the slot map: a no-op once read)
        nodes = client.get_primaries()
    for node in nodes:
        cursor: int = 0
        while True:
            started = time.perf_counter()
            if node is None:
                cursor, found = await client.scan(cursor, match=match, count=count)
            else:
                # (a cluster client answers {node name: cursor}, the keys; redis-py types it as one node's)
                by_node, found = cast(tuple[dict[str, int], list[Any]],
                                      await client.scan(cursor, match=match, count=count, target_nodes=node))
                cursor = by_node[node.name]
            for key in found:
                yield key
            if cursor == 0:
                break
            if share < 1:
                await asyncio.sleep((time.perf_counter() - started) * (1 / share - 1))
