"""Publish a trained version to serving: Redis under versioned keys, then one pointer swap, then a
message on the model-updates topic.

Readers read `model:{g}:current` first and then only keys of that version, so a half-finished publish
is never read: the pointer moves only after every key of the new version is written. The version
before stays readable for requests in flight; older ones are removed.

  model:{g}:current                JSON {name, version, published_at, rank}
  emb:user:{version}:{u1}          float32 bytes of the ALS user embedding
  emb:item:{version}:{p9}          float32 bytes of the item embedding (ALS, or content model for new items)
  uoff:{version}:{u1}              hash: category_affinity (JSON), median_price
  ioff:{version}:{p9}              hash: popularity_7d, category
(recstream/features/keys.py builds them: braces are Redis Cluster hash tags, so a user's or item's
vectors live in the slot of its features.)
"""
from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from models.artifacts import BatchOutputs, Embeddings
from recstream.features import keys
from recstream.settings import Settings
from streams.online_store import unlink_keys, unlink_matching
from streams.producer import create_producer
from streams.redisconn import AnyRedis, connect

CHUNK = 1000  # commands per pipeline round trip: small enough not to stall Redis for serving reads


@dataclass(frozen=True)
class Published:
    version: str
    keys: int
    seconds: float
    removed_versions: list[str]


def _embedding_writes(key: Callable[[str], str], emb: Embeddings):
    """(key(id), float32 bytes) for every vector of `emb`."""
    for i, x in enumerate(emb.ids):
        yield key(x), emb.vectors[i].tobytes()


async def publish(s: Settings, name: str, version: str, out: BatchOutputs, item_embeddings: Embeddings | None = None,
                  progress: Callable[[str], None] = print, announce: bool = True) -> Published:
    """announce=False: Redis only, no model-updates message (offline evaluation, whose agents are in-process)."""
    t0 = time.perf_counter()
    ns = s.redis_namespace
    client = connect(s)
    items = item_embeddings or out.item_embeddings
    try:
        previous = await client.get(ns + keys.MODEL_CURRENT)
        try:
            n = await _write_version(client, ns, version, out, items, progress)
        except Exception:   # nothing of a half-written version is left for a later pointer to name
            with contextlib.suppress(Exception):
                await _remove_version(client, ns, version)
            raise
        pointer = {"name": name, "version": version, "published_at": time.time(), "rank": items.rank}
        await client.set(ns + keys.MODEL_CURRENT, orjson.dumps(pointer))
        removed = await _remove_old_versions(client, ns, keep={version, _version_of(previous)})
    finally:
        await client.aclose()
    if announce:
        await _announce(s, pointer)
    return Published(version, n, time.perf_counter() - t0, removed)


async def _write_version(client: AnyRedis, ns: str, version: str, out: BatchOutputs, items: Embeddings,
                         progress: Callable[[str], None]) -> int:
    """Every key of `version` (not the pointer); the number written."""
    n = 0
    pipe = client.pipeline(transaction=False)

    async def flush_if_full(force: bool = False) -> None:
        nonlocal pipe
        if force or len(pipe) >= CHUNK:
            await pipe.execute()
            pipe = client.pipeline(transaction=False)

    for key, value in (*_embedding_writes(lambda u: ns + keys.embedding("user", version, u), out.user_embeddings),
                       *_embedding_writes(lambda p: ns + keys.embedding("item", version, p), items)):
        pipe.set(key, value)
        n += 1
        await flush_if_full()
    users = set(out.category_affinity) | set(out.user_median_price)
    for user in users:
        fields = {"category_affinity": orjson.dumps(out.category_affinity.get(user, {})).decode()}
        if user in out.user_median_price:
            fields["median_price"] = repr(out.user_median_price[user])
        pipe.hset(ns + keys.user_offline(version, user), mapping=fields)
        n += 1
        await flush_if_full()
    for item in set(out.item_popularity) | set(out.item_category):
        fields = {"popularity_7d": repr(out.item_popularity.get(item, 0.0))}
        if item in out.item_category:
            fields["category"] = out.item_category[item]
        pipe.hset(ns + keys.item_offline(version, item), mapping=fields)
        n += 1
        await flush_if_full()
    await flush_if_full(force=True)
    progress(f"publish: {n} keys of version {version} written; switching the model pointer")
    return n


def publish_registered(s: Settings, version: str, progress: Callable[[str], None] = print) -> Published:
    """Publish a version already in the registry (A/B promotion of another version's ranker): its
    bundle's ALS vectors and offline features, then the pointer and the announcement. Products the
    model has no vector for get content-model vectors at request time, as for any new product."""
    from models.registry import Registry  # mlflow is slow to import: only here

    with tempfile.TemporaryDirectory(prefix="recstream-publish-") as tmp:
        folder = Registry(s.mlflow_tracking_uri, s.model_name).download(version, Path(tmp))
        out = BatchOutputs.load(folder / "batch")
    return asyncio.run(publish(s, s.model_name, version, out, progress=progress))


async def _remove_version(client: AnyRedis, ns: str, version: str) -> None:
    for pattern in (f"emb:user:{version}:*", f"emb:item:{version}:*", f"uoff:{version}:*", f"ioff:{version}:*"):
        await unlink_matching(client, ns + pattern)


def _version_of(pointer: bytes | None) -> str | None:
    return orjson.loads(pointer)["version"] if pointer else None


async def _remove_old_versions(client: AnyRedis, ns: str, keep: set[str | None]) -> list[str]:
    removed: set[str] = set()
    for pattern in ("emb:user:*", "emb:item:*", "uoff:*", "ioff:*"):
        batch = []
        async for key in client.scan_iter(f"{ns}{pattern}", count=5000):
            parts = key.decode()[len(ns):].split(":")
            version = parts[2] if parts[0] == "emb" else parts[1]
            if version not in keep:
                batch.append(key)
                removed.add(version)
            if len(batch) >= CHUNK:
                await unlink_keys(client, batch)
                batch = []
        await unlink_keys(client, batch)
    return sorted(removed)


async def _announce(s: Settings, pointer: dict) -> None:
    producer = create_producer(s)
    await producer.start()
    try:
        await producer.send_and_wait(s.topic("model.updates"), orjson.dumps(pointer), key=pointer["name"].encode())
    finally:
        await producer.stop()


async def current(s: Settings) -> dict | None:
    client = connect(s)
    try:
        return orjson.loads(raw) if (raw := await client.get(s.redis_namespace + keys.MODEL_CURRENT)) else None
    finally:
        await client.aclose()


def decode_embedding(raw: bytes | None) -> np.ndarray | None:
    return np.frombuffer(raw, dtype=np.float32) if raw else None
