"""Benchmark: the feature agent (one Faust worker process) against a bare aiokafka loop doing the same
Redis writes, and its event-to-feature latency at the design's full-scale average rate.

Run from the repository root, with Kafka and Redis up (`recstream services up`):

    .venv/bin/python bench/ingest.py                        # the run: bench/results/ingest.json
    .venv/bin/python bench/ingest.py --profile /tmp/w.prof  # throughput phase only, worker under cProfile

1. Throughput: N shop events (many users) go to a fresh 8-partition clickstream topic *before* the
   worker starts; then one `recstream worker features` subprocess drains them. The clock runs from
   the first applied offset seen in Redis to the last (`{ns}applied:{g}:{group}:{topic}:{p}`, polled
   every 0.2 s): events/s = events applied in that window / its length.
2. The reference: `bench/ingest.py --bare-loop`, a subprocess too, drains the same topic with a plain
   AIOKafkaConsumer (own group, getmany batches of feature_batch_max) and the same pure plan +
   RedisStore.fold, user states in a dict (no table, no changelog), into its own Redis namespace.
3. Latency: a fresh topic and worker, 2 s of warm-up traffic, then a producer paced at --rate for
   --seconds with each event stamped time.time() as it is serialised for the send. The worker's
   cumulative event_latency_counts (agents/worker.py snapshot) before and after the window, once
   the lag is back to 0, subtract to exactly that window's histogram.
4. HTTP ingest figures are read from bench/results/http_ingest.json (bench/http_ingest.py).
Everything gets a fresh topic prefix, app id and Redis namespace; topics and keys are removed after.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import redis.asyncio as aioredis
import uvloop
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench import harness  # noqa: E402
from recstream.data import ShopConfig, shop_dataset  # noqa: E402
from recstream.features import Incoming, UserState, keys  # noqa: E402
from recstream.features.config import feature_config, limits  # noqa: E402
from recstream.settings import Settings, load  # noqa: E402
from recstream.stats import percentiles_ms  # noqa: E402
from schemas import Event, SchemaError  # noqa: E402
from streams.online_store import open_store, unlink_matching  # noqa: E402
from streams.producer import create_producer  # noqa: E402
from streams.replay import publish  # noqa: E402
from streams.topics import ensure_topics, spec  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ingest.json"
HTTP_RESULTS = ROOT / "bench" / "results" / "http_ingest.json"
POLL_S = 0.2
GOALS = {"agent_events_per_s": 10_000.0, "agent_to_bare_ratio": 0.5, "lag_p99_ms": 200.0, "design_p99_ms": 1000.0}


# -- the bare reference loop (runs in its own process: `bench/ingest.py --bare-loop`) ---------------

async def bare_loop(s: Settings) -> None:
    """What the feature agent does, minus Faust: decode, plan, one Lua apply per batch, states in a dict."""
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    client = aioredis.from_url(s.redis_url)
    topic = s.topic("clickstream")
    store = open_store(s, client, topic=topic)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=s.kafka_bootstrap, group_id=s.app_id,
                                auto_offset_reset="earliest", enable_auto_commit=True, auto_commit_interval_ms=1000)
    cfg, lim = feature_config(s), limits(s)
    states: dict[str, UserState] = {}
    applied: dict[int, int] = {}
    await consumer.start()
    try:
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=s.feature_batch_within_ms, max_records=s.feature_batch_max)
            batch = []
            for tp, messages in fetched.items():
                for m in messages:
                    try:
                        batch.append(Incoming(Event.from_json(m.value), tp.partition, m.offset))
                    except SchemaError:
                        pass  # the bench sends none
            if not batch:
                continue
            result = await store.fold(batch, states, applied, cfg, lim)
            states.update(result.states)
    finally:
        await consumer.stop()
        await client.aclose()


# -- processes, settings, cleanup ----------------------------------------------------------------

def fresh(base: Settings, tag: str, *, home_dir: Path) -> Settings:
    return dataclasses.replace(base, topic_prefix=f"bench{tag}", app_id=f"bench-{tag}",
                               redis_namespace=f"bench{tag}:", home_dir=home_dir)


def start(s: Settings, argv: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "RECSTREAM_TOPIC_PREFIX": s.topic_prefix, "RECSTREAM_APP_ID": s.app_id,
           "RECSTREAM_HOME_DIR": str(s.home_dir), "RECSTREAM_REDIS_NAMESPACE": s.redis_namespace,
           "RECSTREAM_CLICKSTREAM_PARTITIONS": str(s.clickstream_partitions)}
    return harness.start_process(argv, log_path, env)


def worker_argv(profile: Path | None = None) -> list[str]:
    return [*(["-m", "cProfile", "-o", str(profile)] if profile else []), "-m", "cli.main", "worker", "features"]


async def cleanup(base: Settings, prefixes: list[str], app_ids: list[str], namespaces: list[str]) -> tuple[int, int]:
    """Delete this run's topics (its prefixes, and Faust's changelog/assignor topics) and Redis keys."""
    admin = AIOKafkaAdminClient(bootstrap_servers=base.kafka_bootstrap)
    await admin.start()
    try:
        starts = tuple(p + "." for p in prefixes) + tuple(a + "-" for a in app_ids)
        topics = [t for t in await admin.list_topics() if t.startswith(starts)]
        if topics:
            await admin.delete_topics(topics)
    finally:
        await admin.close()
    client = aioredis.from_url(base.redis_url)
    keys = 0
    try:
        for ns in namespaces:
            keys += await unlink_matching(client, ns + "*")
    finally:
        await client.aclose()
    return len(topics), keys


# -- CPU accounting: what bounds a phase --------------------------------------------------------

def service_pids(base: Settings) -> dict[str, int]:
    pids = {}
    for name in ("kafka", "redis"):
        try:
            pids[name] = int((base.home_dir / "run" / f"{name}.pid").read_text())
        except (OSError, ValueError):
            pass
    return pids


def machine_jiffies() -> tuple[int, int]:
    cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(cpu) - cpu[3] - cpu[4], sum(cpu)  # busy (all but idle, iowait), total


def cpu_mark(pids: dict[str, int]) -> dict:
    """CPU seconds so far of each live process in `pids`, and the machine's jiffies, at one moment."""
    cpu = {}
    for name, pid in pids.items():
        try:
            cpu[name] = harness.cpu_s(pid)
        except OSError:   # the process ended
            pass
    return {"t": time.perf_counter(), "cpu": cpu, "machine": machine_jiffies()}


class CpuMeter:
    """CPU over a window, in cores: the measured process, Kafka, Redis, this bench process (the poller,
    or the producer of the latency phase), the whole machine, and what is left: other tenants."""

    def __init__(self, base: Settings, pid: int):
        self.pids = {"process": pid, **service_pids(base), "bench": os.getpid()}

    def mark(self) -> dict:
        return cpu_mark(self.pids)

    @staticmethod
    def cores(a: dict, b: dict) -> dict[str, float]:
        dt = b["t"] - a["t"]
        out = {f"{n}_cores": (b["cpu"][n] - a["cpu"][n]) / dt for n in a["cpu"] if n in b["cpu"] and dt > 0}
        busy, total = b["machine"][0] - a["machine"][0], b["machine"][1] - a["machine"][1]
        out["machine_busy_cores"] = busy / total * len(os.sched_getaffinity(0)) if total else float("nan")
        out["other_cores"] = out["machine_busy_cores"] - sum(v for k, v in out.items() if k != "machine_busy_cores")
        return out


# -- phase 1 and 2: throughput on a preloaded topic ---------------------------------------------

async def applied_total(client: aioredis.Redis, s: Settings, group: str) -> int:
    prefix = s.redis_namespace + keys.applied_prefix(group, s.topic("clickstream"))
    values = await client.mget([prefix + str(p) for p in range(s.clickstream_partitions)])
    return sum(int(v) + 1 for v in values if v is not None)


async def throughput(base: Settings, s: Settings, label: str, argv: list[str], n: int, cap_s: float,
                     log_path: Path) -> dict:
    """Start the consumer process on the preloaded topic; time its first applied offset to its last."""
    client = aioredis.from_url(s.redis_url)
    proc = start(s, argv, log_path)
    meter = CpuMeter(base, proc.pid)
    bar = tqdm(total=n, desc=label, unit="ev", mininterval=0.5)
    try:
        deadline = time.monotonic() + 120  # start-up, group join, first batch
        while (done0 := await applied_total(client, s, s.app_id)) == 0:
            harness.check_alive(proc, log_path)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: nothing applied after 120 s:\n{log_path.read_text()[-3000:]}")
            await asyncio.sleep(POLL_S)
        first, done = meter.mark(), done0
        bar.update(done)
        while done < n and first["t"] + cap_s > time.perf_counter():
            harness.check_alive(proc, log_path)
            await asyncio.sleep(POLL_S)
            done = await applied_total(client, s, s.app_id)
            bar.update(done - bar.n)
        last = meter.mark()
    finally:
        bar.close()
        rc = harness.stop_process(proc)
        await client.aclose()
    seconds = last["t"] - first["t"]
    return {"label": label, "events": done - done0, "seconds": seconds, "events_per_s": (done - done0) / seconds,
            "complete": done >= n, "applied_at_start": done0, "exit_code": rc, **CpuMeter.cores(first, last)}


async def preload(s: Settings, events: list[Event]) -> float:
    await ensure_topics(s, [spec(s, "clickstream")])
    producer = create_producer(s)
    await producer.start()
    try:
        return (await publish(producer, s.topic("clickstream"), events)).rate
    finally:
        await producer.stop()


# -- phase 3: latency at a paced rate -----------------------------------------------------------

class LiveEvent:
    """A shop event sent now: a fresh event_id, and the timestamp taken when publish() serialises it,
    which it does right before the send (streams/replay.py), not when the schedule picks it."""
    __slots__ = ("fields", "key")

    def __init__(self, template: Event, event_id: str):
        self.fields = {**template.to_dict(), "event_id": event_id}
        self.key = template.key

    def to_json(self) -> bytes:
        self.fields["timestamp"] = time.time()
        return orjson.dumps(self.fields)


async def wait_snapshot(client: aioredis.Redis, key: str, proc, log_path: Path, want: int, timeout_s: float) -> dict:
    """The worker's first snapshot that counts `want` processed events with no lag (or the last one seen)."""
    deadline, snap = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        harness.check_alive(proc, log_path)
        raw = await client.get(key)
        if raw:
            snap = orjson.loads(raw)
            if sum(snap["processed"].values()) >= want and snap["lag_total"] == 0:
                return snap
        await asyncio.sleep(POLL_S)
    if snap is None:
        raise RuntimeError(f"no worker snapshot at {key}:\n{log_path.read_text()[-3000:]}")
    return snap


async def latency(base: Settings, s: Settings, events: list[Event], rate: float, seconds: float, warm_s: float,
                  drain_s: float, log_path: Path) -> dict:
    await ensure_topics(s, [spec(s, "clickstream")])
    client = aioredis.from_url(s.redis_url)
    proc = start(s, worker_argv(), log_path)
    key = f"{s.redis_namespace}metrics:features:{socket.gethostname()}:{proc.pid}"
    producer = create_producer(s)
    await producer.start()
    live = (LiveEvent(e, f"{s.app_id}-{i}") for i, e in enumerate(itertools.cycle(events)))
    warm_n, n = int(rate * warm_s), int(rate * seconds)
    try:
        await wait_snapshot(client, key, proc, log_path, 0, 120)  # the worker runs
        await publish(producer, s.topic("clickstream"), itertools.islice(live, warm_n), rate_per_s=rate, progress=False)
        before = await wait_snapshot(client, key, proc, log_path, warm_n, 120)
        meter = CpuMeter(base, proc.pid)
        first = meter.mark()
        sent = await publish(producer, s.topic("clickstream"), itertools.islice(live, n), rate_per_s=rate, total=n)
        last = meter.mark()
        after = await wait_snapshot(client, key, proc, log_path, warm_n + sent.acked, drain_s)
    finally:
        await producer.stop()
        rc = harness.stop_process(proc)
        await client.aclose()
    window = np.asarray(after["event_latency_counts"]) - np.asarray(before["event_latency_counts"])
    pct = percentiles_ms(window, (50, 99, 99.9))
    processed = sum(after["processed"].values()) - sum(before["processed"].values())
    return {"sent": sent.acked, "send_seconds": sent.seconds, "send_rate": sent.rate, "in_histogram": int(window.sum()),
            "processed": processed, "drained": processed >= sent.acked and after["lag_total"] == 0,
            "lag_total_at_end": after["lag_total"], "p50_ms": pct["p50"], "p99_ms": pct["p99"],
            "p999_ms": pct["p99.9"], "exit_code": rc, **CpuMeter.cores(first, last)}


# -- the run ------------------------------------------------------------------------------------

def shop_events(args: argparse.Namespace) -> list[Event]:
    t0 = time.perf_counter()
    data = shop_dataset(ShopConfig(users=args.users, products=args.products, end_s=float(int(time.time()) - 60)))
    print(f"shop: {len(data.events):,} events, {args.users:,} users, {args.products:,} products "
          f"({time.perf_counter() - t0:.1f} s)")
    return data.events


async def run(args: argparse.Namespace) -> dict | None:
    base = load()
    tag = uuid.uuid4().hex[:10]
    events = shop_events(args)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp = Path(tmp)
        agent = fresh(base, tag, home_dir=tmp / "agent")
        bare = dataclasses.replace(agent, app_id=f"bench-bare-{tag}", redis_namespace=f"bench{tag}bare:")
        lat = fresh(base, tag + "lat", home_dir=tmp / "latency")
        try:
            print(f"topic prefix {agent.topic_prefix}, app id {agent.app_id}, namespace {agent.redis_namespace}")
            preload_rate = await preload(agent, events[:args.events])
            if args.profile:
                res = await throughput(base, agent, "agent (cProfile)", worker_argv(args.profile), args.events,
                                       args.cap_seconds, tmp / "worker.log")
                print_profile(res, args.profile)
                return None
            phases = {"agent": await throughput(base, agent, "agent", worker_argv(), args.events, args.cap_seconds,
                                                tmp / "worker.log"),
                      "bare": await throughput(base, bare, "bare aiokafka", [str(Path(__file__).resolve()),
                                               "--bare-loop"], args.events, args.cap_seconds, tmp / "bare.log")}
            phases["latency"] = await latency(base, lat, events, args.rate, args.seconds, args.warm_seconds,
                                              args.drain_seconds, tmp / "latency-worker.log")
        finally:
            removed = await cleanup(base, [agent.topic_prefix, lat.topic_prefix], [agent.app_id, bare.app_id, lat.app_id],
                                    [agent.redis_namespace, bare.redis_namespace, lat.redis_namespace])
            print(f"cleanup: {removed[0]} topics deleted, {removed[1]:,} Redis keys unlinked")
    return report(args, agent, preload_rate, phases)


def print_profile(res: dict, path: Path) -> None:
    print(f"\nagent under cProfile: {res['events']:,} events in {res['seconds']:.1f} s = "
          f"{res['events_per_s']:,.0f}/s (cProfile slows it); worker {res['process_cores']:.2f} cores\n")
    for order, top in (("cumtime", 25), ("tottime", 25)):
        pstats.Stats(str(path)).strip_dirs().sort_stats(order).print_stats(top)


def report(args: argparse.Namespace, s: Settings, preload_rate: float, phases: dict) -> dict:
    a, b, lat = phases["agent"], phases["bare"], phases["latency"]
    http = orjson.loads(HTTP_RESULTS.read_bytes())
    hf = http["figures"]
    figures = {
        "agent_events_per_s": a["events_per_s"], "bare_aiokafka_events_per_s": b["events_per_s"],
        "agent_to_bare_ratio": a["events_per_s"] / b["events_per_s"],
        "lag_p50_ms": lat["p50_ms"], "lag_p99_ms": lat["p99_ms"], "latency_send_rate_events_per_s": lat["send_rate"],
        "http_events_per_s": hf["http_events_per_s_batch100"], "http_events_per_s_batch1": hf["http_events_per_s_batch1"],
        "http_p99_ms_batch100": hf["http_p99_ms_batch100"],
    }
    print(f"\nthroughput on a preloaded {s.clickstream_partitions}-partition topic ({args.events:,} events; "
          f"feature_batch_max {s.feature_batch_max}); cores = share of one CPU over the timed window\n")
    print(f"{'consumer':14} {'events':>8} {'seconds':>8} {'events/s':>10} {'proc cores':>10} {'kafka':>6} "
          f"{'redis':>6} {'bench':>6} {'others':>6} {'machine':>8} {'complete':>8}")
    nan = float("nan")
    for r in (a, b):
        print(f"{r['label']:14} {r['events']:>8,} {r['seconds']:>8.2f} {r['events_per_s']:>10,.0f} "
              f"{r['process_cores']:>10.2f} {r.get('kafka_cores', nan):>6.2f} {r.get('redis_cores', nan):>6.2f} "
              f"{r['bench_cores']:>6.2f} {r['other_cores']:>6.2f} {r['machine_busy_cores']:>8.2f} {str(r['complete']):>8}")
    print(f"\nlatency: {lat['sent']:,} events sent at {lat['send_rate']:,.1f}/s (asked {args.rate:,}/s) for "
          f"{lat['send_seconds']:.1f} s; {lat['in_histogram']:,} in the window's histogram, drained {lat['drained']}; "
          f"p99.9 {lat['p999_ms']:.1f} ms; cores while sending: worker {lat['process_cores']:.2f}, "
          f"kafka {lat.get('kafka_cores', nan):.2f}, redis {lat.get('redis_cores', nan):.2f}, "
          f"bench producer {lat['bench_cores']:.2f}, others {lat['other_cores']:.2f}, "
          f"machine {lat['machine_busy_cores']:.2f}\n")
    ok = lambda met: "met" if met else "NOT met"  # noqa: E731
    rows = [
        ("agent events/s (1 worker)", f"{figures['agent_events_per_s']:,.0f}", f">= {GOALS['agent_events_per_s']:,.0f}",
         ok(figures["agent_events_per_s"] >= GOALS["agent_events_per_s"])),
        ("bare aiokafka events/s", f"{figures['bare_aiokafka_events_per_s']:,.0f}", "reference", ""),
        ("agent / bare", f"{figures['agent_to_bare_ratio']:.3f}", f">= {GOALS['agent_to_bare_ratio']}",
         ok(figures["agent_to_bare_ratio"] >= GOALS["agent_to_bare_ratio"])),
        (f"event-to-feature p50 ms @ {args.rate:,}/s", f"{lat['p50_ms']:.1f}", "", ""),
        (f"event-to-feature p99 ms @ {args.rate:,}/s", f"{lat['p99_ms']:.1f}",
         f"< {GOALS['lag_p99_ms']:.0f} (design < {GOALS['design_p99_ms']:.0f})",
         f"{ok(lat['p99_ms'] < GOALS['lag_p99_ms'] and lat['drained'])} (design: "
         f"{ok(lat['p99_ms'] < GOALS['design_p99_ms'] and lat['drained'])})"),
        ("achieved send rate events/s", f"{lat['send_rate']:,.1f}", f"{args.rate:,}", ""),
        ("HTTP events/s, batch 100", f"{hf['http_events_per_s_batch100']:,.1f}", "", f"p99 {hf['http_p99_ms_batch100']} ms"),
        ("HTTP events/s, batch 1", f"{hf['http_events_per_s_batch1']:,.1f}", "", f"p99 {hf['http_p99_ms_batch1']} ms"),
    ]
    print("| figure | value | goal | verdict |\n| --- | ---: | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n(HTTP figures from {HTTP_RESULTS.relative_to(ROOT)}, run {http['date']}: {http['command']})")
    return harness.result("ingest", figures, phases=phases, parameters={
                       "events": args.events, "users": args.users, "products": args.products,
                       "partitions": s.clickstream_partitions, "feature_batch_max": s.feature_batch_max,
                       "feature_batch_within_ms": s.feature_batch_within_ms, "table_store": s.table_store,
                       "throughput_cap_s": args.cap_seconds, "preload_events_per_s": preload_rate,
                       "latency_rate_per_s": args.rate, "latency_seconds": args.seconds,
                       "warmup_seconds": args.warm_seconds, "load_average_at_end": os.getloadavg(),
                       "http_figures_from": {"file": str(HTTP_RESULTS.relative_to(ROOT)), "date": http["date"],
                                             "command": http["command"]}})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--events", type=int, default=200_000, help="events preloaded for the throughput phases (count)")
    p.add_argument("--users", type=int, default=6000, help="shoppers in the generated shop (count)")
    p.add_argument("--products", type=int, default=5000, help="products in the generated shop (count)")
    p.add_argument("--cap-seconds", type=float, default=90.0, help="a throughput phase stops after this long (seconds)")
    p.add_argument("--rate", type=int, default=5787, help="latency phase send rate (events/s)")
    p.add_argument("--seconds", type=float, default=60.0, help="latency window (seconds)")
    p.add_argument("--warm-seconds", type=float, default=2.0, help="warm-up traffic before the window (seconds)")
    p.add_argument("--drain-seconds", type=float, default=60.0, help="longest wait for lag 0 after sending (seconds)")
    p.add_argument("--profile", type=Path, help="only the agent throughput phase, worker under cProfile -o PATH")
    p.add_argument("--bare-loop", action="store_true", help=argparse.SUPPRESS)  # the reference's own process
    args = p.parse_args()
    if args.bare_loop:
        uvloop.run(bare_loop(load()))
        return 0
    result = uvloop.run(run(args))
    if result is None:
        return 0
    harness.write_json(RESULTS, result)
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
