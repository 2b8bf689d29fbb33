"""Publish a trained version to serving: the online store (Redis) under versioned keys, then one pointer swap, then a
message on the model-updates topic.

Readers read `model:{g}:current` first and then only keys of that version, so a half-finished publish
is never read: the pointer moves only after every key of the new version is written. The version
before stays readable for requests in flight; older ones are removed.

  model:{g}:current                JSON {name, version, published_at, rank}
  emb:user:{version}:{u1}          float32 bytes of the ALS user embedding
  emb:item:{version}:{p9}          float32 bytes of the item embedding (ALS, or content model for new items)
  uoff:{version}:{u1}              hash: category_affinity (JSON), median_price
  ioff:{version}:{p9}              hash: popularity (weighted events over the training window), category
(recstream/features/keys.py builds them: braces are Redis Cluster hash tags, so a user's or item's
vectors live in the slot of its features.)
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from models.artifacts import BatchOutputs, Embeddings
from recstream.settings import Settings
from streams.online_store import open_store
from streams.producer import create_producer
from streams.redisconn import connect
from streams.store import Store


@dataclass(frozen=True)
class Published:
    version: str
    keys: int
    seconds: float
    removed_versions: list[str]


def _vectors(kind: str, emb: Embeddings) -> Iterator[tuple[str, str, bytes]]:
    """(kind, id, float32 bytes) for every vector of `emb`."""
    for i, x in enumerate(emb.ids):
        yield kind, x, emb.vectors[i].tobytes()


def _offline(out: BatchOutputs) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(kind, id, fields) of every user's and item's offline features."""
    for user in set(out.category_affinity) | set(out.user_median_price):
        fields = {"category_affinity": orjson.dumps(out.category_affinity.get(user, {})).decode()}
        if user in out.user_median_price:
            fields["median_price"] = repr(out.user_median_price[user])
        yield "user", user, fields
    for item in set(out.item_popularity) | set(out.item_category):
        fields = {"popularity": repr(out.item_popularity.get(item, 0.0))}
        if item in out.item_category:
            fields["category"] = out.item_category[item]
        yield "item", item, fields


async def publish(s: Settings, name: str, version: str, out: BatchOutputs, item_embeddings: Embeddings | None = None,
                  progress: Callable[[str], None] = print, announce: bool = True,
                  store: Store | None = None) -> Published:
    """announce=False: the store only, no model-updates message (offline evaluation, whose agents are
    in-process). `store`: where to publish (tests pass a MemoryStore), else the settings' Redis."""
    t0 = time.perf_counter()
    client = None
    if store is None:
        client = connect(s)
        store = open_store(s, client)
    items = item_embeddings or out.item_embeddings
    try:
        previous = await store.model_pointer()
        try:
            n = await store.write_version(version, itertools.chain(_vectors("user", out.user_embeddings),
                                                                    _vectors("item", items)), _offline(out))
        except Exception:   # nothing of a half-written version is left for a later pointer to name
            with contextlib.suppress(Exception):
                await store.remove_version(version)
            raise
        progress(f"publish: {n} keys of version {version} written; switching the model pointer")
        pointer = {"name": name, "version": version, "published_at": time.time(), "rank": items.rank}
        await store.set_model_pointer(pointer)
        removed = await store.remove_versions_except({version, previous["version"] if previous else None})
    finally:
        if client is not None:
            await client.aclose()
    if announce:
        await _announce(s, pointer)
    return Published(version, n, time.perf_counter() - t0, removed)


def publish_registered(s: Settings, version: str, progress: Callable[[str], None] = print) -> Published:
    """Publish a version already in the registry (A/B promotion of another version's ranker): its
    bundle's ALS vectors and offline features, then the pointer and the announcement. Products the
    model has no vector for get content-model vectors at request time, as for any new product."""
    from models.registry import Registry  # mlflow is slow to import: only here

    with tempfile.TemporaryDirectory(prefix="recstream-publish-") as tmp:
        folder = Registry(s.mlflow_tracking_uri, s.model_name).download(version, Path(tmp))
        out = BatchOutputs.load(folder / "batch")
    return asyncio.run(publish(s, s.model_name, version, out, progress=progress))


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
        return await open_store(s, client).model_pointer()
    finally:
        await client.aclose()


def decode_embedding(raw: bytes | None) -> np.ndarray | None:
    return np.frombuffer(raw, dtype=np.float32) if raw else None
