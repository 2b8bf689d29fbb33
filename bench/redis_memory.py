"""Benchmark: Redis memory of the online feature store per user and per item, for the capacity plan.

Run from the repository root with Redis up (`recstream services up`):

    .venv/bin/python bench/redis_memory.py            # bench/results/redis_memory.json

A generated shop's events are folded into a fresh namespace of the local Redis exactly as the feature
agent does it (the pure plan, then RedisStore.apply in batches), its catalogue written as the catalogue
agent does, and one 128-dimension float32 vector per user and per item stored as the trainer publishes
them. Then every key of the namespace is classified by its kind (the key's first segment) and measured
with MEMORY USAGE (keys, value, Redis's own overhead; no allocator fragmentation). The reference beside
it: the raw bytes of each key's name and value (what the data weighs before Redis stores it), and
INFO's used_memory before and after (the whole growth, fragmentation and dictionaries included).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from bench.harness import down  # noqa: E402  (figures truncated, never rounded up)
from recstream.data import ShopConfig, shop_dataset  # noqa: E402
from recstream.features.config import feature_config, limits  # noqa: E402
from recstream.features.plan import Incoming  # noqa: E402
from recstream.settings import load  # noqa: E402
from streams.online_store import RedisStore, open_store, unlink_matching  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "redis_memory.json"
DIM = 128
USER_KINDS = ("user_session", "user_features", "user_state", "emb_user")   # one of each per active user
ITEM_KINDS = ("item_features", "covis", "cobuy", "emb_item")  # up to one of each per product


def kind_of(key: str, ns: str) -> str:
    """The key's kind: its first segment after the namespace (embeddings split by user/item)."""
    parts = key[len(ns):].split(":")
    if parts[0] == "emb" and len(parts) > 1:
        return f"emb_{parts[1]}"
    return parts[0]


async def fold_shop(store: RedisStore, s, events, partitions: int, batch: int) -> float:
    cfg, lim = feature_config(s), limits(s)
    states, applied, offsets = {}, {}, collections.Counter()
    incoming = []
    for e in events:
        p = zlib.crc32(e.user_id.encode()) % partitions
        incoming.append(Incoming(e, p, offsets[p]))
        offsets[p] += 1
    t0 = time.perf_counter()
    for i in range(0, len(incoming), batch):
        result = await store.fold(incoming[i:i + batch], states, applied, cfg, lim)
        states.update(result.states)
        if (i // batch) % 50 == 0:
            print(f"  folded {min(i + batch, len(incoming)):,} / {len(incoming):,} events", flush=True)
    return time.perf_counter() - t0


async def store_vectors(client: aioredis.Redis, ns: str, kind: str, ids: list[str], rng) -> None:
    """One float32 vector per id, the trainer's value format (raw little-endian bytes)."""
    for i in range(0, len(ids), 2000):
        pipe = client.pipeline(transaction=False)
        for x in ids[i:i + 2000]:
            pipe.set(f"{ns}emb:{kind}:bench:{x}", rng.standard_normal(DIM).astype(np.float32).tobytes())
        await pipe.execute()


async def measure(client: aioredis.Redis, ns: str, sample: int) -> dict[str, dict]:
    keys: dict[str, list[bytes]] = collections.defaultdict(list)
    async for k in client.scan_iter(match=f"{ns}*", count=5000):
        keys[kind_of(k.decode(), ns)].append(k)
    out = {}
    for kind, ks in sorted(keys.items()):
        picked = ks if len(ks) <= sample else [ks[i] for i in np.random.default_rng(0).choice(len(ks), sample, replace=False)]
        pipe = client.pipeline(transaction=False)
        for k in picked:
            pipe.memory_usage(k, samples=0)
        used = [u or 0 for u in await pipe.execute()]
        raw = await raw_bytes(client, picked)
        mean = sum(used) / len(used)
        out[kind] = {"keys": len(ks), "sampled": len(picked), "bytes_per_key": down(mean, 1),
                     "raw_bytes_per_key": down(sum(raw) / len(raw), 1), "total_mb": down(mean * len(ks) / 2**20, 2)}
    return out


async def raw_bytes(client: aioredis.Redis, keys: list[bytes]) -> list[int]:
    """Key name plus the value's payload: strings as stored, hashes field+value, zsets member + 8 bytes."""
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.type(k)
    types = [t.decode() for t in await pipe.execute()]
    pipe = client.pipeline(transaction=False)
    for k, t in zip(keys, types):
        {"string": pipe.get, "hash": pipe.hgetall, "zset": lambda x: pipe.zrange(x, 0, -1),
         "set": pipe.smembers}.get(t, pipe.type)(k)
    out = []
    for k, t, v in zip(keys, types, await pipe.execute()):
        if t == "string":
            size = len(v)
        elif t == "hash":
            size = sum(len(a) + len(b) for a, b in v.items())
        elif t == "zset":
            size = sum(len(m) + 8 for m in v)
        elif t == "set":
            size = sum(len(m) for m in v)
        else:
            size = 0
        out.append(len(k) + size)
    return out


async def run(args: argparse.Namespace) -> dict:
    s = load()
    ns = f"mem{uuid.uuid4().hex[:8]}:"
    client = aioredis.from_url(s.redis_url)
    store = open_store(s, client, namespace=ns, group="bench", topic="clickstream")
    t0 = time.perf_counter()
    data = shop_dataset(ShopConfig(users=args.users, products=args.products, end_s=float(int(time.time()) - 60)))
    print(f"shop: {len(data.events):,} events, {args.users:,} users, {args.products:,} products "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    before = (await client.info("memory"))["used_memory"]
    try:
        await store.write_items(data.products)
        fold_s = await fold_shop(store, s, data.events, args.partitions, args.batch)
        users = sorted({e.user_id for e in data.events})
        rng = np.random.default_rng(1)
        await store_vectors(client, ns, "user", users, rng)
        await store_vectors(client, ns, "item", [p.product_id for p in data.products], rng)
        after = (await client.info("memory"))["used_memory"]
        kinds = await measure(client, ns, args.sample)
    finally:
        removed = await unlink_matching(client, f"{ns}*")
        await client.aclose()
    per_user = sum(kinds[k]["bytes_per_key"] * kinds[k]["keys"] for k in USER_KINDS if k in kinds) / len(users)
    per_item = sum(kinds[k]["bytes_per_key"] * kinds[k]["keys"] for k in ITEM_KINDS if k in kinds) / len(data.products)
    shared = sum(v["total_mb"] for k, v in kinds.items() if k not in USER_KINDS + ITEM_KINDS and k != "applied")
    figures = {
        "events": len(data.events), "users": len(users), "products": len(data.products), "fold_s": down(fold_s, 1),
        "bytes_per_user": down(per_user, 1), "bytes_per_item": down(per_item, 1),
        "shared_mb": down(shared, 2), "used_memory_growth_mb": down((after - before) / 2**20, 2),
        "memory_usage_total_mb": down(sum(v["total_mb"] for v in kinds.values()), 2), "kinds": kinds,
    }
    print(f"\n{'kind':<16}{'keys':>10}{'bytes/key':>12}{'raw bytes/key':>15}{'total MB':>10}")
    for k, v in kinds.items():
        print(f"{k:<16}{v['keys']:>10,}{v['bytes_per_key']:>12}{v['raw_bytes_per_key']:>15}{v['total_mb']:>10}")
    print(f"\nper active user {figures['bytes_per_user']} B (session, features, vector); per item "
          f"{figures['bytes_per_item']} B (fields, neighbours, vector); popularity and the rest {figures['shared_mb']} MB")
    print(f"MEMORY USAGE total {figures['memory_usage_total_mb']} MB against used_memory growth "
          f"{figures['used_memory_growth_mb']} MB (the reference; {removed:,} keys removed after)")
    return harness.result("redis_memory", figures, parameters={
        "users": args.users, "products": args.products, "dim": DIM, "batch": args.batch,
        "partitions": args.partitions, "sample": args.sample})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--users", type=int, default=10_000, help="shoppers in the generated shop (count)")
    p.add_argument("--products", type=int, default=20_000, help="products in the generated shop (count)")
    p.add_argument("--batch", type=int, default=4000, help="events per applied batch, as feature_batch_max (count)")
    p.add_argument("--partitions", type=int, default=8, help="clickstream partitions the events are spread over (count)")
    p.add_argument("--sample", type=int, default=3000, help="keys measured per kind (count)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes (path)")
    args = p.parse_args()
    res = asyncio.run(run(args))
    harness.write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
