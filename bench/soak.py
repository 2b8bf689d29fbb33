"""Soak: the whole stack under steady load for a long time; errors, latency, feature lag and memory.

    flock /tmp/recstream-heavy.lock .venv/bin/python bench/soak.py                 # 600 s, the record
    flock /tmp/recstream-heavy.lock .venv/bin/python bench/soak.py --seconds 60    # a quick check

Starts the feature worker, archive, retrieval, ranking, attribution and the HTTP API as `recstream`
subprocesses (tests/integration/serving_stack.Processes) in a namespace of their own (topics, consumer
groups, Redis keys, home folder), on the local Kafka and Redis. Loads the generated shop's catalogue
and a warm-up of its events; publishes the MLflow champion, when there is one, into the namespace
(else retrieval and ranking serve by their rules). Then, for --seconds, drives
  * --qps recommendation requests per second (homepage for a shopper, anonymous homepage, similar,
    also viewed, cart: a fixed mix) on an open-loop schedule, and
  * --events events per second as POST /api/v1/events batches of --batch,
and measures: errors (any status other than 200/202, timeouts, refused connections), fallbacks
(200 answers served by the popularity fallback, counted apart), request latency p50/p99, events
acknowledged, feature lag in seconds (every --probe-s a marker event is posted and the time until
its session is in Redis is measured; the feature worker's own lag in records is sampled too), and
the RSS of every process at start (after the warm-up) and end, with the peak. Prints a table and
writes bench/results/soak.json. The reference side by side: the rates achieved against the targets
(a load generator that falls behind says so, rather than passing on less load).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import redis.asyncio as aioredis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.harness import Processes, cpu_s, down, rss_mb  # noqa: E402  (figures truncated, never rounded up)
from bench.ingest import machine_jiffies, service_pids  # noqa: E402  (Kafka's and Redis' pids, the machine's CPU)
from recstream.data import ShopConfig, shop_dataset  # noqa: E402
from recstream.features import keys  # noqa: E402
from recstream.settings import load  # noqa: E402
from streams.online_store import unlink_matching  # noqa: E402
from streams.replay import publish_dataset  # noqa: E402

WORKERS = ("features", "archive", "attribution", "retrieval", "ranking", "api")
OUT = REPO / "bench" / "results" / "soak.json"
MIX = ("homepage_user", "homepage_anon", "similar", "also_viewed", "cart")


class Tally:
    def __init__(self):
        self.requests = self.errors = self.fallbacks = self.events = self.event_errors = self.behind = 0
        self.latency: list[float] = []
        self.errors_by: dict[str, int] = {}
        self.error_samples: list[str] = []   # the first few, with when and what, for the logs' side
        self.t0 = time.time()
        self.lag_series: list[tuple[float, float]] = []        # (seconds since start, lag s) per probe
        self.rss_series: list[tuple[float, dict]] = []         # (seconds since start, {process: MiB})

    def error(self, what: str, detail: str = "") -> None:
        self.errors_by[what] = self.errors_by.get(what, 0) + 1
        if len(self.error_samples) < 10:
            self.error_samples.append(f"{time.time() - self.t0:.1f} s: {what} {detail}".strip())


# aiohttp, not httpx, drives the load: httpx cost the driver about half a core at the full rates on 2 cores,
# CPU the stack under test then lacked (the driver is not part of it)
HTTP_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


async def call(http: aiohttp.ClientSession, method: str, path: str, **kw) -> tuple[int, bytes]:
    """(status, body) of one request."""
    async with http.request(method, path, **kw) as r:
        return r.status, await r.read()


async def recommend(http: aiohttp.ClientSession, rng: random.Random, users: list[str], products: list[str],
                    t: Tally) -> None:
    kind = MIX[rng.randrange(len(MIX))]
    if kind == "homepage_user":
        path, q = "homepage", {"user_id": rng.choice(users)}
    elif kind == "homepage_anon":
        path, q = "homepage", {}
    elif kind == "cart":
        path, q = "cart", {"cart_items": ",".join(rng.sample(products, 2))}
    else:
        path, q = kind.replace("_", "-"), {"product_id": rng.choice(products)}
    t0 = time.perf_counter()
    try:
        status, body = await call(http, "GET", f"/api/v1/recommendations/{path}", params=q)
    except HTTP_ERRORS as exc:
        t.requests += 1
        t.errors += 1
        t.error(type(exc).__name__, f"GET {path} {exc!r}")
        return
    t.requests += 1
    t.latency.append(time.perf_counter() - t0)
    if status != 200:
        t.errors += 1
        t.error(f"HTTP {status}")
    elif orjson.loads(body).get("fallback"):
        t.fallbacks += 1


def make_events(rng: random.Random, users: list[str], products: list[str], n: int, run: str, seq: int) -> list[dict]:
    now = time.time()
    out = []
    for i in range(n):
        user = rng.choice(users)
        out.append({"event_id": f"{run}-{seq}-{i}", "user_id": user, "session_id": f"{user}-soak",
                    "product_id": rng.choice(products),
                    "event_type": rng.choices(("view", "click", "add_to_cart", "purchase"), (80, 12, 6, 2))[0],
                    "timestamp": now, "device": "mobile", "page": "product"})
    return out


async def post_events(http: aiohttp.ClientSession, events: list[dict], t: Tally) -> None:
    try:
        status, _ = await call(http, "POST", "/api/v1/events", data=orjson.dumps(events),
                               headers={"Content-Type": "application/json"})
    except HTTP_ERRORS as exc:
        t.event_errors += 1
        t.error("events " + type(exc).__name__, repr(exc))
        return
    if status == 202:
        t.events += len(events)
    else:
        t.event_errors += 1
        t.error(f"events HTTP {status}")


async def paced(rate: float, duration: float, max_inflight: int, make, t: Tally) -> None:
    """Call make() (a coroutine) at `rate` per second on a fixed schedule for `duration` seconds; a
    tick that finds max_inflight calls still running is counted as `behind` and skipped."""
    tasks: set[asyncio.Task] = set()
    start = time.perf_counter()
    i = 0
    while True:
        at = start + i / rate
        if at - start >= duration:
            break
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        i += 1
        if len(tasks) >= max_inflight:
            t.behind += 1
            continue
        task = asyncio.create_task(make())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)


async def probe_lag(http: aiohttp.ClientSession, client: aioredis.Redis, ns: str, run: str, every_s: float,
                    duration: float, samples: list[float], t: Tally) -> None:
    """Every `every_s`: post one marker event, then time until its user's session is in Redis."""
    end = time.perf_counter() + duration
    i = 0
    while time.perf_counter() < end:
        user = f"probe-{run}-{i}"
        ev = [{"event_id": f"probe-{run}-{i}", "user_id": user, "session_id": user, "product_id": "p00000",
               "event_type": "view", "timestamp": time.time()}]
        t0 = time.perf_counter()
        await post_events(http, ev, t)
        while time.perf_counter() - t0 < 120:
            if await client.exists(ns + keys.user_session(user)):
                break
            await asyncio.sleep(0.02)
        samples.append(time.perf_counter() - t0)
        t.lag_series.append((time.time() - t.t0, samples[-1]))
        i += 1
        await asyncio.sleep(max(0.0, every_s - (time.perf_counter() - t0)))


async def worker_lag_records(client: aioredis.Redis, ns: str) -> int:
    """The feature workers' own lag in records, from their latest metrics snapshots (found by their index:
    a SCAN of the keyspace took the whole run on a Redis holding other benchmarks' keys, so the RSS
    sampler behind it recorded once)."""
    names = await client.zrange(ns + keys.metrics_index("features"), 0, -1)
    snaps = [orjson.loads(raw) for raw in await client.mget(names) if raw] if names else []
    return max([int(m.get("lag_total", 0)) for m in snaps], default=0)


async def sample_rss(procs: Processes, every_s: float, duration: float, peak: dict[str, float],
                     lag_records: list[int], client: aioredis.Redis, ns: str, t: Tally) -> None:
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        now = {name: rss_mb(p.pid) for name, p in procs.procs.items()}
        now["driver"] = rss_mb(os.getpid())
        for name, mb in now.items():
            peak[name] = max(peak.get(name, 0.0), mb)
        t.rss_series.append((time.time() - t.t0, {k: down(v, 1) for k, v in now.items()}))
        lag_records.append(await worker_lag_records(client, ns))
        await asyncio.sleep(every_s)


def publish_champion(s) -> str | None:
    """Publish the MLflow champion into this namespace; None when there is none (rules only)."""
    try:
        from batch.publish import publish_registered
        from models.registry import CHAMPION, Registry

        version = Registry(s.mlflow_tracking_uri, s.model_name).alias_version(CHAMPION)
        publish_registered(s, version, progress=lambda _: None)
        return version
    except Exception as exc:  # no registry, no champion: the agents serve by their rules
        print(f"soak: no model published ({type(exc).__name__}: {str(exc)[:120]}); rules only")
        return None


async def warm_up(procs: Processes, http: aiohttp.ClientSession, timeout_s: float, want_model: bool) -> bool:
    """Wait until the API is healthy and (with a model) answers a homepage from the agents."""
    deadline = time.monotonic() + timeout_s
    served = False
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            if (await call(http, "GET", "/healthz"))[0] == 200:
                status, body = await call(http, "GET", "/api/v1/recommendations/homepage", params={"user_id": "u00001"})
                if status == 200 and (not orjson.loads(body).get("fallback") or not want_model):
                    served = not orjson.loads(body).get("fallback")
                    if served or not want_model:
                        return served
        except HTTP_ERRORS:
            pass
        await asyncio.sleep(1)
    return served


async def soak(args: argparse.Namespace) -> dict:
    tag = uuid.uuid4().hex[:8]
    home = Path(tempfile.mkdtemp(prefix="recstream-soak-"))
    base = load()
    s = dataclasses.replace(base, topic_prefix=f"soak{tag}", app_id=f"recstream-soak-{tag}",
                            redis_namespace=f"soak{tag}:", clickstream_partitions=4, home_dir=home,
                            experiments_file=home / "experiments.toml",
                            **({"serving_deadline_ms": args.deadline_ms} if args.deadline_ms else {}))
    data = shop_dataset(ShopConfig(seed=7))
    users = sorted({e.user_id for e in data.events})
    products = [p.product_id for p in data.products]
    print(f"soak: namespace {s.redis_namespace} home {home}; shop {len(products)} products, {len(users)} users, "
          f"{len(data.events)} warm-up events")
    await publish_dataset(s, data, progress=False)
    version = await asyncio.to_thread(publish_champion, s) if args.model else None
    procs = Processes(s, home)
    client = aioredis.from_url(s.redis_url)
    t, rng = Tally(), random.Random(7)
    samples: list[float] = []
    peak: dict[str, float] = {}
    lag_records: list[int] = []
    try:
        for name in WORKERS:
            procs.start(name)
        async with aiohttp.ClientSession(procs.base_url, timeout=aiohttp.ClientTimeout(total=10),
                                         connector=aiohttp.TCPConnector(limit=args.connections)) as http:
            served = await warm_up(procs, http, 180, version is not None)
            await asyncio.sleep(5)    # let the warm-up events drain
            rss_start = {name: down(rss_mb(p.pid), 1) for name, p in procs.procs.items()}
            rss_start["driver"] = down(rss_mb(os.getpid()), 1)
            pids = {**{name: p.pid for name, p in procs.procs.items()}, "driver": os.getpid()}
            services = service_pids(base)
            cpu_start = {name: cpu_s(pid, 0.0) for name, pid in {**pids, **services}.items()}
            busy_start = machine_jiffies()[0]
            print(f"soak: stack up (agents serving: {served}); {args.seconds:.0f} s at {args.qps:g} req/s "
                  f"+ {args.events:g} events/s")
            seq = iter(range(10 ** 9))
            started = time.perf_counter()
            t.t0 = time.time()   # the series count from here
            await asyncio.gather(
                paced(args.qps, args.seconds, args.connections, lambda: recommend(http, rng, users, products, t), t),
                paced(args.events / args.batch, args.seconds, max(2, args.connections // 4),
                      lambda: post_events(http, make_events(rng, users, products, args.batch, tag, next(seq)), t), t),
                probe_lag(http, client, s.redis_namespace, tag, args.probe_s, args.seconds, samples, t),
                sample_rss(procs, 5.0, args.seconds, peak, lag_records, client, s.redis_namespace, t))
            elapsed = time.perf_counter() - started
            procs.check_alive()
            healthy = (await call(http, "GET", "/healthz"))[0] == 200
        rss_end = {name: down(rss_mb(p.pid), 1) for name, p in procs.procs.items()}
        rss_end["driver"] = down(rss_mb(os.getpid()), 1)
        cpu_share = {name: down((cpu_s(pid, 0.0) - cpu_start[name]) / elapsed, 2)
                     for name, pid in {**pids, **services}.items()}
        busy = down((machine_jiffies()[0] - busy_start) / os.sysconf("SC_CLK_TCK") / elapsed, 2)
        for name, mb in rss_end.items():
            peak[name] = max(peak.get(name, 0.0), mb)
        alive = {name: procs.alive(name) for name in WORKERS}
    finally:
        procs.stop_all()
        await unlink_matching(client, s.redis_namespace + "*")
        await client.aclose()
        await delete_topics(s)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    at_2min = min(t.rss_series, key=lambda row: abs(row[0] - 120.0))[1] if t.rss_series else {}
    processes = {name: {"rss_start_mb": rss_start.get(name), "rss_2min_mb": at_2min.get(name),
                        "rss_end_mb": rss_end.get(name),
                        "rss_peak_mb": down(peak.get(name, 0.0), 1),
                        "growth_mb": down(rss_end.get(name, 0) - rss_start.get(name, 0), 1),
                        "cpu_cores": cpu_share.get(name)} for name in rss_start}
    figures = {
        "errors": t.errors + t.event_errors, "request_errors": t.errors, "event_errors": t.event_errors,
        "errors_by": t.errors_by, "error_samples": t.error_samples, "requests": t.requests, "fallbacks": t.fallbacks,
        "fallback_share": down(t.fallbacks / t.requests, 4) if t.requests else None,
        "events": t.events,
        "latency_p50_ms": harness.pct_ms(t.latency, 0.50), "latency_p99_ms": harness.pct_ms(t.latency, 0.99),
        "lag_max_s": down(max(samples), 3) if samples else None,
        "lag_p50_s": down(float(np.median(samples)), 3) if samples else None, "lag_samples": len(samples),
        "worker_lag_records_max": max(lag_records) if lag_records else None,
        "processes": processes, "alive_at_end": alive, "healthz_at_end": healthy,
        # the services' CPU beside the project's processes, and the whole machine's (of nproc cores)
        "services_cpu_cores": {name: cpu_share.get(name) for name in services},
        "machine_busy_cores": busy,
        # flat memory after warm-up: every process ends within 15 % of its RSS at the 2-minute mark
        "rss_flat_after_2min": all(p["rss_end_mb"] <= 1.15 * p["rss_2min_mb"] for p in processes.values()
                                   if p["rss_2min_mb"] and p["rss_end_mb"]) if at_2min else None,
        # the reference, side by side: what the load generator achieved against the targets
        "requests_per_s": down(t.requests / elapsed, 1), "target_requests_per_s": args.qps,
        "events_per_s": down(t.events / elapsed, 1), "target_events_per_s": args.events,
        "ticks_skipped_behind": t.behind, "elapsed_s": down(elapsed, 1),
    }
    series = {"lag_s": [[down(a, 1), down(b, 3)] for a, b in t.lag_series],
              "rss_mb": [[down(a, 1), m] for a, m in t.rss_series]}
    return harness.result("soak", figures, series=series, parameters={
        "seconds": args.seconds, "target_qps": args.qps, "target_events_per_s": args.events,
        "batch": args.batch, "connections": args.connections, "probe_every_s": args.probe_s,
        "serving_deadline_ms": s.serving_deadline_ms, "model_version": version,
        "agents_serving_at_start": served, "mix": list(MIX)})


def plot(r: dict, path: Path) -> None:
    """Feature lag and each process's RSS over the run: flat lines are the goal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lag, rss) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    xs = [a for a, _ in r["series"]["lag_s"]]
    lag.plot(xs, [b for _, b in r["series"]["lag_s"]], lw=0.8, color="tab:red")
    lag.set_ylabel("feature lag (s)")
    lag.set_title(f"soak: {r['parameters']['target_qps']:g} req/s + {r['parameters']['target_events_per_s']:g} "
                  f"events/s, {r['figures']['errors']} errors")
    lag.grid(alpha=0.3)
    times = [a for a, _ in r["series"]["rss_mb"]]
    for name in (r["series"]["rss_mb"][0][1] if r["series"]["rss_mb"] else {}):
        rss.plot(times, [m.get(name, float("nan")) for _, m in r["series"]["rss_mb"]], label=name, lw=1)
    rss.set_ylabel("RSS (MiB)")
    rss.set_xlabel("seconds into the run")
    rss.legend(ncol=4, fontsize=8)
    rss.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def delete_topics(s) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(s.topic_prefix + ".")]
        if names:
            await admin.delete_topics(names)
    except Exception as exc:  # leftovers only cost disk; say so
        print(f"soak: topics {s.topic_prefix}.* not deleted: {exc!r}")
    finally:
        await admin.close()


def table(r: dict) -> str:
    f = r["figures"]
    rows = [("requests", f["requests"], f"{f['requests_per_s']}/s of {f['target_requests_per_s']}/s"),
            ("events acked", f["events"], f"{f['events_per_s']}/s of {f['target_events_per_s']}/s"),
            ("errors", f["errors"], json.dumps(f["errors_by"])),
            ("fallbacks", f["fallbacks"], f"share {f['fallback_share']}"),
            ("latency p50 / p99 ms", f"{f['latency_p50_ms']} / {f['latency_p99_ms']}", ""),
            ("feature lag max s", f["lag_max_s"], f"p50 {f['lag_p50_s']} s over {f['lag_samples']} probes; "
                                                  f"worker lag max {f['worker_lag_records_max']} records"),
            ("ticks skipped (behind)", f["ticks_skipped_behind"], "")]
    out = [f"{a:24} {b!s:>16}  {c}" for a, b, c in rows]
    out.append(f"{'process':24} {'rss start':>10} {'rss end':>10} {'peak':>10} {'growth':>8}  (MiB)  cores used")
    for name, p in f["processes"].items():
        out.append(f"{name:24} {p['rss_start_mb']:>10} {p['rss_end_mb']:>10} {p['rss_peak_mb']:>10} {p['growth_mb']:>8}"
                   f"        {p['cpu_cores']}")
    out.append(f"{'services':24} " + ", ".join(f"{k} {v} cores" for k, v in f.get("services_cpu_cores", {}).items())
               + f"; machine busy {f.get('machine_busy_cores')} of {r['machine'].get('nproc')} cores")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600.0, help="measured duration (default 600)")
    p.add_argument("--qps", type=float, default=200.0, help="recommendation requests per second")
    p.add_argument("--events", type=float, default=2000.0, help="events per second")
    p.add_argument("--batch", type=int, default=100, help="events per POST")
    p.add_argument("--connections", type=int, default=64, help="HTTP connections (requests in flight at most)")
    p.add_argument("--probe-s", type=float, default=3.0, help="feature-lag probe interval (seconds)")
    p.add_argument("--deadline-ms", type=int, default=0, help="serving deadline (default: the setting's)")
    p.add_argument("--no-model", dest="model", action="store_false", help="do not publish the MLflow champion")
    p.add_argument("--keep", action="store_true", help="keep the home folder (logs) after the run")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    r = asyncio.run(soak(args))
    print(table(r))
    harness.write_json(args.out, r)
    plot(r, args.out.with_suffix(".png"))
    print(f"soak: written {args.out} and {args.out.with_suffix('.png')}")
    f = r["figures"]
    return 0 if f["errors"] == 0 and all(f["alive_at_end"].values()) and f["healthz_at_end"] else 1


if __name__ == "__main__":
    sys.exit(main())
