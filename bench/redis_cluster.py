"""Benchmark: the feature store's apply throughput on a single Redis and on the local Redis Cluster.

Run from the repository root, with Redis up (`recstream services up`); the cluster is started if it
is not (`recstream services cluster-up`, idempotent):

    .venv/bin/python bench/redis_cluster.py        # bench/results/redis_cluster.json

The shop's events (seeded), in batches of RECSTREAM_FEATURE_BATCH_MAX, go through RedisClusterStore.fold
in this process (pure plan + writes; no Kafka, no Faust): events/s = events / wall time, per backend,
each into a fresh namespace removed after. Planning alone is timed too, so the Redis share shows.
The reference: `redis-benchmark` on the same servers (SET and ZADD, 50 clients, pipeline 16; with
`--cluster` on the cluster), what the servers take from a C client.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench import harness  # noqa: E402
from cli import redis_cluster  # noqa: E402
from recstream.data import ShopConfig, shop_dataset  # noqa: E402
from recstream.features import Incoming, plan  # noqa: E402
from recstream.features.config import feature_config, limits  # noqa: E402
from recstream.settings import Settings, load  # noqa: E402
from streams.online_store import (  # noqa: E402
    open_store,  # noqa: E402
    unlink_matching,
)
from streams.redisconn import connect  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "redis_cluster.json"
PARTITIONS = 8


def incoming(events) -> list[Incoming]:
    """Events on PARTITIONS partitions by user (as Kafka keys them), offsets in order."""
    offsets = [0] * PARTITIONS
    out = []
    for e in events:
        p = int.from_bytes(hashlib.blake2b(e.user_id.encode(), digest_size=4).digest(), "big") % PARTITIONS
        out.append(Incoming(e, p, offsets[p]))
        offsets[p] += 1
    return out


async def fold_all(s: Settings, batch: list[Incoming], size: int) -> dict:
    client = connect(s)
    ns = f"bench-rc-{uuid.uuid4().hex[:8]}:"
    store = open_store(s, client, namespace=ns, group="bench", topic="recs.clickstream")
    cfg, lim = feature_config(s), limits(s)
    states, applied = {}, {}
    try:
        t0 = time.perf_counter()
        for i in range(0, len(batch), size):
            result = await store.fold(batch[i:i + size], states, applied, cfg, lim)
            states.update(result.states)
        wall = time.perf_counter() - t0
    finally:
        await unlink_matching(client, ns + "*")
        await client.aclose()
    return {"events": len(batch), "seconds": round(wall, 3), "events_per_s": round(len(batch) / wall)}


def plan_only(s: Settings, batch: list[Incoming], size: int) -> float:
    cfg, lim = feature_config(s), limits(s)
    states: dict = {}
    t0 = time.perf_counter()
    for i in range(0, len(batch), size):
        states.update(plan(batch[i:i + size], states, {}, {}, cfg, lim).states)
    return time.perf_counter() - t0


def redis_benchmark(port: int, cluster: bool, n: int) -> dict[str, float]:
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-q", "-t", "set,zadd", "-n", str(n),
            "-c", "50", "-P", "16", *(["--cluster"] if cluster else [])]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300).stdout
    found = re.findall(r"(\w+): ([\d.]+) requests per second", out.replace("\r", "\n"))
    return {name.lower(): float(v) for name, v in found}


async def main(args: argparse.Namespace) -> dict:
    base = load()
    redis_cluster.cluster_up(base, say=lambda m: print(m, file=sys.stderr))
    cluster = dataclasses.replace(base, redis_url=redis_cluster.url(base), redis_cluster=True)
    data = shop_dataset(ShopConfig(users=args.users, products=1500, seed=7, end_s=float(int(time.time()) - 60)))
    batch = incoming(data.events)
    size = base.feature_batch_max
    planning = plan_only(base, batch, size)
    out = {"events": len(batch), "batch": size, "plan_only_events_per_s": round(len(batch) / planning)}
    for label, s in (("single", base), ("cluster", cluster)):
        await fold_all(s, batch[: size], size)   # warm-up: scripts loaded, connections open
        runs = [await fold_all(s, batch, size) for _ in range(args.repeat)]
        best = max(runs, key=lambda r: r["events_per_s"])
        out[label] = {"fold": best, "runs_events_per_s": [r["events_per_s"] for r in runs],
                      "redis_benchmark": redis_benchmark(s.redis_port if label == "single"
                                                         else base.redis_cluster_port_list[0],
                                                         label == "cluster", args.bench_requests)}
        print(label, out[label], file=sys.stderr)
    out["cluster_to_single"] = round(out["cluster"]["fold"]["events_per_s"] / out["single"]["fold"]["events_per_s"], 3)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=400, help="shop size: shoppers (count)")
    ap.add_argument("--repeat", type=int, default=3, help="folds per backend; the best is reported (count)")
    ap.add_argument("--bench-requests", type=int, default=200_000, help="redis-benchmark requests per test (count)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    result = harness.write_result("redis_cluster", asyncio.run(main(args)), out=args.out)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
