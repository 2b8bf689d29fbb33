"""Benchmark: erasing shoppers from the archive of the serving benchmark's shop, and what it does to serving.

Run from the repository root, with Kafka, Redis and MLflow up (`recstream services up`):

    flock /tmp/recstream-heavy.lock .venv/bin/python bench/erasure.py     # the run: bench/results/erasure.json
    .venv/bin/python bench/erasure.py --users 500 --products 5000 --erase 100 --seconds 20 --rate 50 \\
        --out /tmp/erasure.json                                          # a small one

1. The archive: the serving benchmark's shop (bench/serving.py's defaults: 100k products, 5,000 shoppers,
   seed 11: ~354k events) written as the archive worker writes it (streams/archive.py write_batch): events
   in time order on the partition of their shopper (murmur2, 8 partitions), a flush every 20,000 records
   (RECSTREAM_ARCHIVE_FLUSH_RECORDS), so one file per partition and hour of each flush, in its own home
   (.local/benchera).
2. Serving, unless --no-serving: bench/serving.py's deployment (its cached set-up, or built: 6-8 min on a
   quiet machine) with the features, retrieval and ranking workers and the API; the same open-loop mix at
   --rate QPS for --seconds, once alone (p99 before) and once while the erasure runs (p99 during).
3. The erasure: `recstream erase --hashed --user ...` for --erase shoppers drawn at random (seed 5)
   in a child process, as an operator would run it, on the serving deployment itself (its Redis
   namespace, topics and session table; the archive above): the Redis part (erased set, the shoppers'
   keys, the passes over the keyspace at most --cpu-share busy: RECSTREAM_ERASURE_CPU_SHARE), the
   tombstones and records on the erasures topic, which the serving deployment's feature worker reads
   and honours meanwhile, then the archive's rewrite (every file read by its user_id column, those
   holding an erased shopper rewritten without them, at the lowest CPU priority and at most --cpu-share
   of one core). Its time, the keys it deleted, the bytes it rewrote and the rows it removed come from
   its reply. The load window starts with it; if the erasure outlasts it, the share it covered is
   recorded. The erased shoppers are gone from the serving set-up afterwards, so its cache marker is
   removed: the next serving or erasure run builds it again.
   With --no-serving the erasure runs in a deployment of its own (`benchera`: topics, Redis namespace).
The machine's load is recorded before each phase: the serving figures compare only on a quiet machine.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench import harness  # noqa: E402
from bench.harness import down, log  # noqa: E402
from recstream.data import ShopConfig, generate  # noqa: E402
from recstream.settings import Settings, load  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "erasure.json"
TAG = "benchera"
FLUSH_RECORDS = 20_000
GOAL_P99_RATIO = 1.10   # "no effect beyond 10 %"


def erasure_settings() -> Settings:
    return dataclasses.replace(load(), topic_prefix=TAG, redis_namespace=f"{TAG}:", app_id=f"bench-{TAG}",
                               home_dir=ROOT / ".local" / TAG)


def write_archive(s: Settings, events: list) -> dict:
    """The shop's events as the archive worker writes them (see the module docstring); the archive's size."""
    from streams.archive import dataset_dir, write_batch
    from streams.producer import owner_partition

    root = dataset_dir(s)
    shutil.rmtree(root, ignore_errors=True)
    offsets = [0] * s.clickstream_partitions
    owner: dict[str, int] = {}
    t = time.perf_counter()
    chunk: dict[int, list] = {}
    for i, e in enumerate(sorted(events, key=lambda e: e.timestamp), 1):
        p = owner.setdefault(e.user_id, owner_partition(e.user_id.encode(), s.clickstream_partitions))
        chunk.setdefault(p, []).append((offsets[p], e))
        offsets[p] += 1
        if i % FLUSH_RECORDS == 0:
            write_batch(root, chunk)
            chunk = {}
    if chunk:
        write_batch(root, chunk)
    files = list(root.rglob("*.parquet"))
    return {"events": len(events), "files": len(files), "bytes": sum(f.stat().st_size for f in files),
            "write_s": down(time.perf_counter() - t, 1)}


def machine_load() -> list[float]:
    return [down(x) for x in os.getloadavg()]


async def erase_child(s: Settings, users: list[str], logdir: Path) -> dict:
    """`recstream erase` in a child process; its reply and wall time."""
    env = {**os.environ, **harness.settings_env(s)}
    argv = [sys.executable, "-m", "cli.main", "erase", "--hashed", *[a for u in users for a in ("--user", u)]]
    t = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                stderr=open(logdir / "erase.log", "wb"))
    out, _ = await proc.communicate()
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"recstream erase exited with {proc.returncode}: see {logdir / 'erase.log'}")
    return {"reply": orjson.loads(out), "seconds": seconds}


async def keys_left(client: aioredis.Redis, s: Settings, users: list[str]) -> int:
    """The erased shoppers' fixed per-user keys still in Redis (session, features, state: 0 when the
    erasure and the feature worker's honouring of its records are through)."""
    from recstream.features import keys

    names = [s.redis_namespace + k for u in users for k in keys.user_keys(u)]
    return sum([int(await client.exists(*names[i:i + 500])) for i in range(0, len(names), 500)])


async def worker_erasures(client: aioredis.Redis, s: Settings) -> int | None:
    """The erasure records the serving deployment's feature worker honoured (its latest metrics snapshot,
    published every second or so); None without one."""
    from recstream.features import keys

    await asyncio.sleep(3)
    names = await client.zrange(s.redis_namespace + keys.metrics_index("features"), 0, -1)
    snaps = [orjson.loads(raw) for raw in await client.mget(names) if raw] if names else []
    return sum(snap.get("erasures", 0) for snap in snaps) if snaps else None


async def run(args: argparse.Namespace) -> dict:
    from streams.topics import ensure_topics

    era = dataclasses.replace(erasure_settings(), erasure_cpu_share=args.cpu_share)   # (--no-serving)
    logdir = Path(tempfile.mkdtemp(prefix="bench-erasure-"))
    details: dict = {"logs": str(logdir), "load_before_archive": machine_load()}
    cfg = ShopConfig(users=args.users, products=args.products, seed=args.seed,
                     end_s=float(int(time.time()) // 60 * 60 - 60))
    serving = None
    if not args.no_serving:
        from bench import serving as serving_bench

        sargs = argparse.Namespace(products=args.products, users=args.users, seed=args.seed,
                                   ranker_trees=args.ranker_trees, ranker_target_sample=0.02)
        s = serving_bench.bench_settings(sargs)
        era = dataclasses.replace(s, home_dir=era.home_dir, erasure_cpu_share=args.cpu_share)
        client = aioredis.from_url(s.redis_url)
        procs = serving_bench.procs_for(s, logdir)
        serving = (serving_bench, s, sargs, client, procs)
    try:
        if serving is not None:
            sb, s, sargs, client, procs = serving
            await ensure_topics(s)
            info = await sb.setup(s, sargs, procs, client)
            cfg = dataclasses.replace(cfg, end_s=info["end_s"])   # the very shop the serving set-up replayed
            details["serving_setup"] = {k: info[k] for k in ("events", "products", "users", "version", "cached")}
        shop = generate(cfg)
        archive = await asyncio.to_thread(write_archive, era, shop.events)
        log(f"archive: {archive['events']} events in {archive['files']} files, {archive['bytes']:,} bytes")
        details["archive"] = archive
        users = random.Random(5).sample(sorted({e.user_id for e in shop.events}), args.erase)
        del shop
        await ensure_topics(era)
        figures: dict = {"users": args.erase, "archive_events": archive["events"], "archive_bytes": archive["bytes"]}
        if serving is None:
            details["load_before_erase"] = machine_load()
            done = await erase_child(era, users, logdir)
            p99_before = p99_during = None
        else:
            sb, s, sargs, client, procs = serving
            traffic = sb.traffic_of(info)
            port = harness.free_port()
            await sb.start_serving(s, procs, client, port)
            cpu = sb.Cpu({**procs.pids()})
            await sb.run_load(port, traffic, min(args.rate, 50), 10, cpu)   # warm-up
            details["load_before_serving"] = machine_load()
            before = await sb.run_load(port, traffic, args.rate, args.seconds, cpu)
            details["load_before_erase"] = machine_load()
            await client.delete(f"{s.redis_namespace}bench:setup")   # the shoppers about to be erased leave it
            log("the serving set-up's cache marker removed: the next run builds it again")
            erasing = asyncio.ensure_future(erase_child(era, users, logdir))
            during = await sb.run_load(port, traffic, args.rate, args.seconds, cpu)
            overlap = args.seconds
            done = await erasing
            details["erased_shoppers_keys_left"] = await keys_left(client, s, users)
            details["feature_worker_erasures"] = await worker_erasures(client, s)
            p99_before, p99_during = before.summary()["p99_ms"], during.summary()["p99_ms"]
            details["serving_before"] = before.summary()
            details["serving_during"] = during.summary()
            details["erase_covered_share_of_window"] = down(min(1.0, done["seconds"] / overlap), 3)
            # which part of the erasure moves serving: the child's start-up, Redis and the record come first,
            # the archive's rewrite last (its own seconds in the reply), then the window's rest
            rewrite_from = max(0.0, done["seconds"] - done["reply"]["archive"]["seconds"])
            details["during_by_phase"] = {
                "start_up_redis_and_record": during.window(0.0, rewrite_from),
                "archive_rewrite": during.window(rewrite_from, done["seconds"]),
                "after": during.window(done["seconds"], float(args.seconds)),
                "before_window": before.window(0.0, float(args.seconds))}
            log("during, by phase: " + "; ".join(f"{k} {v['from_s']}-{v['to_s']} s: {v['requests']} requests, p99 "
                                                 f"{v['p99_ms']} ms, fallback {v['fallback_share']}"
                                                 for k, v in details["during_by_phase"].items()))
        reply = done["reply"]
        rewrite = reply["archive"]
        figures.update({"seconds": down(done["seconds"], 2), "archive_seconds": rewrite["seconds"],
                        "archive_bytes_rewritten": rewrite["bytes_rewritten"], "files_rewritten": rewrite["files_rewritten"],
                        "files_scanned": rewrite["files_scanned"], "rows_removed": rewrite["rows_removed"],
                        "redis_keys_deleted": reply["redis"]["keys_deleted"],
                        "p99_ms_before": p99_before, "p99_ms_during": p99_during,
                        "p99_ratio": down(p99_during / p99_before, 3) if p99_before and p99_during else None,
                        "rate_qps": None if serving is None else args.rate, "cpu_share": args.cpu_share})
        figures["meets_goal"] = None if figures["p99_ratio"] is None else figures["p99_ratio"] <= GOAL_P99_RATIO
        details["load_after"] = machine_load()
        return {"figures": figures, "details": details}
    finally:
        if serving is not None:
            serving[4].stop_all()
            await serving[3].aclose()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--products", type=int, default=100_000, help="catalogue size (count; bench/serving.py's)")
    p.add_argument("--users", type=int, default=5000, help="shoppers of the generated shop (count; bench/serving.py's)")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--ranker-trees", type=int, default=200, help="as bench/serving.py (its set-up is shared)")
    p.add_argument("--erase", type=int, default=1000, help="shoppers erased (count)")
    p.add_argument("--rate", type=float, default=100.0, help="serving load during both windows (QPS)")
    p.add_argument("--seconds", type=float, default=60, help="length of each load window (seconds)")
    p.add_argument("--cpu-share", type=float, default=0.25,
                   help="RECSTREAM_ERASURE_CPU_SHARE of the erasure (share of one core; 1: unthrottled)")
    p.add_argument("--no-serving", action="store_true", help="the archive's erasure alone, no serving load")
    p.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = p.parse_args()
    out = asyncio.run(run(args))
    record = harness.write_result("erasure", out["figures"], out=args.out, details=out["details"])
    print(orjson.dumps(record["figures"], option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
