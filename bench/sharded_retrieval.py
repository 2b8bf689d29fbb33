"""Benchmark: retrieval sharded by item across worker processes (issue 9): one retrieval process over the
whole catalogue against two shard processes whose answers ranking gathers and merges, same model, same
load, one run; then shard 1 killed under load.

Run from the repository root, with Kafka, Redis and MLflow up (`recstream services up`):

    flock /tmp/recstream-heavy.lock .venv/bin/python bench/sharded_retrieval.py    # -> bench/results/sharded_retrieval.json

Set-up (bench/serving.py's, cached under its own tag `benchshard`): the shop of --products items, its
events through the feature worker, one model trained with RECSTREAM_RETRIEVAL_SHARDS=2 (an index per
shard, each "auto": IVF tuned for recall@200 0.95 on its own items, or exact).
1. The reference, `whole`: the API, one ranking agent and one retrieval process with
   RECSTREAM_RETRIEVAL_SHARDS=1, which loads both shard files and searches them in turn in process
   (models.index.ShardedIndex): the candidates of one index over every item.
2. `sharded`: that retrieval process stopped; two started with RECSTREAM_RETRIEVAL_SHARDS=2 and
   RECSTREAM_RETRIEVAL_SHARD=0 / 1, each its own consumer group on the request topic with half the
   index; ranking gathers their two candidate sets (RECSTREAM_RETRIEVAL_GATHER_MS) and merges the top k.
Each: fixed-rate open-loop runs at --rates (bench/serving.py's load, passing as there: p99 <= 50 ms,
all 200, fallback <= 1%); the resident memory of every retrieval process; the ranking agent's count of
requests ranked without every shard (gather_partial).
3. Shard down: --down-qps for --down-seconds against `sharded`; shard 1 gets SIGKILL at a third of
it. Every answer's status and fallback flag after the kill: the requests are ranked from shard 0's
half (still the agents' answer, not the fallback).
Figures are truncated, never rounded up. This box has 2 cores: two shard processes add a Kafka hop
and a process to the same cores, so the figures show the cost of the scatter-gather, not its gain
(the gain is memory per process and, on more machines, search time per shard).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import orjson
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench import harness, ingest  # noqa: E402
from bench import serving as srv  # noqa: E402
from bench.scale_workers import ladder, timed_load  # noqa: E402
from recstream.settings import Settings, load  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "sharded_retrieval.json"
TAG = "benchshard"
SHARDS = 2
log, down = srv.log, srv.down


def settings(args: argparse.Namespace) -> Settings:
    return dataclasses.replace(srv.bench_settings(args), topic_prefix=TAG, redis_namespace=f"{TAG}:",
                               app_id=f"bench-{TAG}", model_name=f"bench-{TAG}", home_dir=ROOT / ".local" / TAG,
                               retrieval_shards=SHARDS)


def shard_env(shard: int | None) -> dict[str, str]:
    if shard is None:   # one process over the whole catalogue
        return {"RECSTREAM_RETRIEVAL_SHARDS": "1", "RECSTREAM_RETRIEVAL_SHARD": "0"}
    return {"RECSTREAM_RETRIEVAL_SHARDS": str(SHARDS), "RECSTREAM_RETRIEVAL_SHARD": str(shard)}


async def snapshots(s: Settings, client: aioredis.Redis, role: str, pids: set[int]) -> list[dict]:
    out = []
    async for key in client.scan_iter(match=f"{s.redis_namespace}metrics:{role}:*"):
        raw = await client.get(key)
        if raw and int(key.decode().rsplit(":", 1)[1]) in pids:
            snap = orjson.loads(raw)
            if time.time() - snap["ts"] < 5:
                out.append(snap)
    return out


async def ready(s: Settings, client: aioredis.Redis, procs: harness.Procs, retrieval: list[str],
                timeout_s: float = 240) -> None:
    """Until every named retrieval process and the ranking agent report the published model."""
    want = await srv.serving_pointer(s, client)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.check()
        pids = procs.pids()
        r = await snapshots(s, client, "retrieval", {pids[n] for n in retrieval})
        k = await snapshots(s, client, "ranking", {pids["ranking"]})
        if sum(x.get("model_version") == want for x in r) == len(retrieval) and k and k[0].get("model_version") == want:
            return
        await asyncio.sleep(1)
    raise RuntimeError(f"{retrieval} and ranking did not serve model {want} within {timeout_s} s")


async def partial(s: Settings, client: aioredis.Redis, procs: harness.Procs) -> int:
    await asyncio.sleep(2.2)   # the agent publishes its snapshot every 2 s
    snap = await snapshots(s, client, "ranking", {procs.pids()["ranking"]})
    return snap[0].get("gather_partial", 0) if snap else -1


async def phase(label: str, args, s, procs, client, port, traffic, retrieval: list[str]) -> dict:
    await ready(s, client, procs, retrieval)
    await asyncio.sleep(8)   # the groups settle (heartbeats every 3 s)
    cpu = srv.Cpu({**procs.pids(), **ingest.service_pids(load())})
    warm = (await srv.run_load(port, traffic, 40, 10, cpu)).summary()
    log(f"{label}: warm-up p99 {warm['p99_ms']} ms, fallback {warm['fallback_share']}")
    before = await partial(s, client, procs)
    out = await ladder(port, traffic, cpu, client, s, args.rates, args.step_seconds, label)
    out["gather_partial"] = await partial(s, client, procs) - before
    out["retrieval_rss_mb"] = {n: down(harness.rss_mb(procs.pids()[n]), 1) for n in retrieval}
    return out


async def shard_down(args, s, procs, client, port, traffic) -> dict:
    t0 = time.monotonic()
    kill_at = t0 + args.down_seconds / 3

    async def killer() -> None:
        await asyncio.sleep(kill_at - time.monotonic())
        procs.procs["retrieval-1"].send_signal(signal.SIGKILL)
        log("shard 1 killed")
    task = asyncio.create_task(killer())
    outcomes = await timed_load(port, traffic, args.down_qps, args.down_seconds)
    await task
    procs.procs.pop("retrieval-1").wait()
    after = [o for o in outcomes if o.t >= kill_at + 0.5]   # the requests in flight at the kill aside
    before = [o for o in outcomes if o.t < kill_at]
    return {"qps": args.down_qps, "seconds": args.down_seconds, "requests": len(outcomes),
            "before": {"requests": len(before), "errors": sum(o.status != 200 for o in before),
                       "fallbacks": sum(o.fallback for o in before)},
            "after": {"requests": len(after), "errors": sum(o.status != 200 for o in after),
                      "fallbacks": sum(o.fallback for o in after),
                      "agent_answer_share": down(sum(o.status == 200 and not o.fallback for o in after)
                                                 / max(1, len(after)), 4)}}


def index_files(s: Settings, version: str) -> dict:
    """Bytes of each shard's index file in the version's bundle, and what each holds."""
    import tempfile

    from models.index import RetrievalIndex, shard_file
    from models.registry import Registry

    with tempfile.TemporaryDirectory() as tmp:
        folder = Registry(s.mlflow_tracking_uri, s.model_name).download(version, Path(tmp))
        out = {}
        for i in range(SHARDS):
            path = folder / shard_file(i, SHARDS)
            idx = RetrievalIndex.from_bytes(path.read_bytes())
            out[path.name] = {"bytes": path.stat().st_size, "items": len(idx), "kind": idx.kind,
                              **{k: v for k, v in idx.params.items() if k in ("nlist", "nprobe")}}
        return out


async def run(args: argparse.Namespace) -> dict:
    s = settings(args)
    logdir = ROOT / ".local" / f"{TAG}-logs"   # not under home_dir: a fresh set-up removes that
    logdir.mkdir(parents=True, exist_ok=True)
    os.environ.update(shard_env(0))   # the set-up's training child builds an index per shard
    client = aioredis.from_url(s.redis_url)
    procs = srv.procs_for(s, logdir)
    out: dict = {}
    try:
        await ensure_topics(s)
        info = await srv.setup(s, args, procs, client)
        out["setup"] = {k: info.get(k) for k in ("done_at", "events", "products", "users", "version", "cached",
                                                 "setup_s")}
        out["train_index"] = {k: v for k, v in (info.get("train") or {}).get("metrics", {}).items() if "faiss" in k}
        out["index_files"] = await asyncio.to_thread(index_files, s, str(info["version"]))
        traffic = srv.traffic_of(info)
        port = harness.free_port()
        if "features" not in procs.procs:
            procs.start("features", ["worker", "features"])
        procs.start("ranking", ["worker", "ranking"])
        procs.start("api", ["serve", "--host", "127.0.0.1", "--port", str(port)])
        procs.start("retrieval", ["worker", "retrieval"], shard_env(None))
        out["whole"] = await phase("whole", args, s, procs, client, port, traffic, ["retrieval"])
        procs.stop("retrieval")
        for i in range(SHARDS):
            procs.start(f"retrieval-{i}", ["worker", "retrieval"], shard_env(i))
        out["sharded"] = await phase("sharded", args, s, procs, client, port, traffic,
                                     [f"retrieval-{i}" for i in range(SHARDS)])
        out["shard_down"] = await shard_down(args, s, procs, client, port, traffic)
    finally:
        procs.stop_all()
        await client.aclose()
    return out


def figures_of(d: dict) -> dict:
    f: dict = {}
    for name in ("whole", "sharded"):
        ph = d[name]
        f[f"{name}_qps"] = ph["max_qps_passing"]
        best = [r for r in ph["runs"] if r["passes"] and r["rate_qps"] == ph["max_qps_passing"]]
        first = ph["runs"][0]
        f[f"{name}_p50_ms_at_{first['rate_qps']:g}_qps"] = first["p50_ms"]
        f[f"{name}_p99_ms_at_{first['rate_qps']:g}_qps"] = first["p99_ms"]
        if best:
            f[f"{name}_p99_ms_at_max"] = best[0]["p99_ms"]
        f[f"{name}_retrieval_cores_at_{first['rate_qps']:g}_qps"] = down(sum(
            v for k, v in first["cpu_cores"].items() if k.startswith("retrieval")))
        f[f"{name}_ranking_cores_at_{first['rate_qps']:g}_qps"] = first["cpu_cores"]["ranking"]
    f["sharded_gather_partial"] = d["sharded"]["gather_partial"]
    f["shard_down_agent_answer_share"] = d["shard_down"]["after"]["agent_answer_share"]
    f["shard_down_errors"] = d["shard_down"]["after"]["errors"]
    f.update({f"index_{k}": v for k, v in d.get("train_index", {}).items()})
    files = d["index_files"].values()   # what each process holds (its RSS is mostly Python and libraries)
    f["index_items_per_shard"] = [x["items"] for x in files]
    f["whole_index_bytes_per_process"] = sum(x["bytes"] for x in files)
    f["sharded_index_bytes_per_process"] = max(x["bytes"] for x in files)
    return f


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--products", type=int, default=100_000, help="catalogue size (count)")
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--ranker-trees", type=int, default=200)
    p.add_argument("--ranker-target-sample", type=float, default=0.02)
    p.add_argument("--rates", type=lambda x: [float(r) for r in x.split(",")], default=[40.0, 60.0, 80.0, 100.0])
    p.add_argument("--step-seconds", type=float, default=20.0)
    p.add_argument("--down-qps", type=float, default=40.0)
    p.add_argument("--down-seconds", type=float, default=30.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    command = harness.command_line()
    details = asyncio.run(run(args))
    figures = figures_of(details)
    for name in ("whole", "sharded"):
        print(f"\n{name}: rate ladder (p99 <= 50 ms, all 200, fallback <= 1% to pass); retrieval RSS "
              f"{details[name]['retrieval_rss_mb']} MiB")
        for r in details[name]["runs"]:
            print(f"  {r['rate_qps']:>6g} QPS p50 {r['p50_ms']:>7} p99 {r['p99_ms']:>7} ms fallback "
                  f"{r['fallback_share']:<7} non-200 {r['errors_non200']} {'pass' if r['passes'] else 'fail'}  "
                  f"cores {r['cpu_cores']}")
    print(f"\nshard down: {details['shard_down']}\nindex files: {details['index_files']}")
    print("\n" + json.dumps(figures, indent=1))
    harness.write_result("sharded_retrieval", figures, out=args.out, command=command, details=details)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
