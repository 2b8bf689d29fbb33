"""Benchmark: horizontal workers (issue 9) on this machine: 1 vs 2 feature-worker processes, 1 vs 2
retrieval + ranking pairs, and a rebalance under load (a worker of each kind added, then one removed).

Run from the repository root, with Kafka, Redis and MLflow up (`recstream services up`):

    flock /tmp/recstream-heavy.lock .venv/bin/python bench/scale_workers.py      # -> bench/results/scale.json
    .venv/bin/python bench/scale_workers.py --events 60000 --rates 60,100 --step-seconds 10 \
        --rebalance-seconds 40 --out /tmp/scale.json                                     # a quicker one

1. Feature workers (bench/ingest.py's method): N shop events preloaded into a fresh 8-partition
   clickstream topic, then drained by 1, and (fresh topic, app id and namespace) by 2
   `recstream worker features` processes of one app. The clock starts once the processes' own
   metrics snapshots show every partition owned (disjointly, each process some) and an offset
   applied, so the start-up rebalance is outside the window, and stops at the last applied offset
   (`applied:` offsets in Redis, polled every 0.2 s). Both runs' Redis state is then compared:
   every user's `user_features` equal between the runs and its `events` equal to the user's
   events; the popularity counts sum to the number of events, per event type.
2. Serving (bench/serving.py's set-up, cached under its own tag `benchscale`; its load client): the
   API + 1 retrieval + 1 ranking agent, then with a second retrieval and ranking agent of the same
   groups. Fixed-rate open-loop runs at --rates, ascending, until two fail in a row; a rate passes
   as in bench/serving.py (p99 <= 50 ms, every answer a 200, at most 1% fallback).
   `serving_workers_N_qps` is the highest passing rate.
3. Rebalance under load: events at --rebalance-events-per-s into a fresh feature app with one
   worker, and requests at --rebalance-qps against the serving stack (1 + 1), for
   --rebalance-seconds. At 1/6 of the run a second feature worker and a second retrieval + ranking
   pair start; at 7/12 the first of each gets SIGTERM. Every request's status and fallback flag is
   kept with its time. After: every event applied exactly once (each partition's applied offset is
   its last offset; every user's `events` in Redis equals the events sent for that user).
Figures are truncated, never rounded up. CPU columns: cores each process used over the window.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from agents.worker import metrics_index  # noqa: E402
from bench import (  # noqa: E402
    harness,  # noqa: E402
    ingest,
)
from bench import serving as srv  # noqa: E402
from recstream.features import keys, popularity  # noqa: E402
from recstream.settings import Settings, load  # noqa: E402
from schemas import Event  # noqa: E402
from streams.online_store import open_store, unlink_matching  # noqa: E402
from streams.producer import create_producer  # noqa: E402
from streams.replay import publish  # noqa: E402
from streams.topics import ensure_topics, spec  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "scale.json"
TAG = "benchscale"
log, down, pct = srv.log, srv.down, srv.pct


# -- who owns what: the feature workers' own metrics snapshots ---------------------------------------

async def owned(client: aioredis.Redis, s: Settings, pid: int) -> set[int] | None:
    """Clickstream partitions the feature worker `pid` consumes, from its latest snapshot (every 2 s)."""
    suffix = f":{socket.gethostname()}:{pid}"
    for key in await client.zrange(metrics_index(s, "features"), 0, -1):
        if key.decode().endswith(suffix):
            raw = await client.get(key)
            return {int(p) for p in orjson.loads(raw)["lag"]} if raw else None
    return None


async def split(client: aioredis.Redis, s: Settings, pids: list[int]) -> list[set[int]] | None:
    """Each worker's partitions when together they own every partition, each some, none twice."""
    sets = [await owned(client, s, pid) for pid in pids]
    if any(not x for x in sets):
        return None
    every = set(range(s.clickstream_partitions))
    if sum(len(x) for x in sets) != len(every) or set().union(*sets) != every:
        return None
    return sets


# -- 1. feature workers -----------------------------------------------------------------------------

async def drain(base: Settings, s: Settings, workers: int, n: int, cap_s: float, logdir: Path) -> dict:
    """Start `workers` feature processes on the preloaded topic; events/s from stable ownership to the end."""
    client = aioredis.from_url(s.redis_url)
    logs = [logdir / f"{s.app_id}-w{k + 1}.log" for k in range(workers)]
    procs = [ingest.start(s, ingest.worker_argv(), path) for path in logs]
    pids = {**{f"worker{k + 1}": p.pid for k, p in enumerate(procs)}, **ingest.service_pids(base), "bench": os.getpid()}
    label = f"{workers} feature worker{'s' if workers > 1 else ''}"
    try:
        deadline = time.monotonic() + 180
        while True:
            for p, path in zip(procs, logs):
                harness.check_alive(p, path)
            done0 = await ingest.applied_total(client, s, s.app_id)
            parts = await split(client, s, [p.pid for p in procs])
            if parts and done0 > 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: no stable assignment after 180 s")
            await asyncio.sleep(ingest.POLL_S)
        first = ingest.cpu_mark(pids)
        log(f"{label}: partitions {[sorted(x) for x in parts]}; {done0:,} of {n:,} applied before the clock starts")
        done, last_log = done0, time.monotonic()
        while done < n and first["t"] + cap_s > time.perf_counter():
            for p, path in zip(procs, logs):
                harness.check_alive(p, path)
            await asyncio.sleep(ingest.POLL_S)
            done = await ingest.applied_total(client, s, s.app_id)
            if time.monotonic() - last_log > 5:
                last_log = time.monotonic()
                log(f"  {label}: {done:,} / {n:,} applied")
        last = ingest.cpu_mark(pids)
        parts_end = await split(client, s, [p.pid for p in procs])
    finally:
        codes = [harness.stop_process(p) for p in procs]
        await client.aclose()
    seconds = last["t"] - first["t"]
    cores = srv.Cpu.cores(first, last)
    return {"workers": workers, "events": done - done0, "seconds": down(seconds, 3),
            "events_per_s": down((done - done0) / seconds, 1), "complete": done >= n, "applied_before_clock": done0,
            "partitions": [sorted(x) for x in parts], "partitions_at_end": [sorted(x) for x in parts_end or []],
            "exit_codes": codes, "cpu_cores": cores}


async def redis_state(s: Settings, events: list[Event]) -> dict:
    """What the run left in Redis: every user's features, and the popularity counts per event type."""
    client = aioredis.from_url(s.redis_url)
    store = open_store(s, client)
    try:
        users = sorted({e.user_id for e in events})
        pipe = client.pipeline(transaction=False)
        for u in users:
            pipe.hgetall(s.redis_namespace + keys.user_features(u))
        feats = dict(zip(users, await pipe.execute()))
        days = sorted({popularity.day(e.timestamp) for e in events})
        counts = {}
        for kind in ("view", "click", "add_to_cart", "purchase"):
            total = 0.0
            for d in days:
                total += sum(v for _, v in await client.zrange(s.redis_namespace + popularity.count_key(kind, d), 0, -1,
                                                               withscores=True))
            counts[kind] = total
        applied = await store.applied_offsets(range(s.clickstream_partitions))
    finally:
        await client.aclose()
    return {"features": feats, "pop": counts, "applied": applied}


def compare_runs(events: list[Event], one: dict, two: dict) -> dict:
    per_user = collections.Counter(e.user_id for e in events)
    per_kind = collections.Counter(e.event_type for e in events)
    events_field = {u: int(f.get(b"events", b"0")) for u, f in two["features"].items()}
    return {
        "users": len(per_user),
        "users_features_equal_between_runs": sum(one["features"][u] == two["features"][u] for u in per_user),
        "users_events_equal_sent_2_workers": sum(events_field[u] == per_user[u] for u in per_user),
        "users_events_equal_sent_1_worker": sum(int(one["features"][u].get(b"events", b"0")) == per_user[u]
                                                for u in per_user),
        "pop_counts_1_worker": one["pop"], "pop_counts_2_workers": two["pop"], "events_by_type": dict(per_kind),
        "pop_counts_equal_events": one["pop"] == {k: float(per_kind[k]) for k in one["pop"]} == two["pop"],
        "applied_offsets_equal": one["applied"] == two["applied"],
    }


async def feature_phase(args: argparse.Namespace, base: Settings, events: list[Event], logdir: Path) -> dict:
    runs, states, settings = {}, {}, []
    tag = uuid.uuid4().hex[:8]
    try:
        for workers in (1, 2):
            s = ingest.fresh(base, f"{tag}w{workers}", home_dir=logdir / f"home-w{workers}")
            settings.append(s)
            rate = await ingest.preload(s, events)
            log(f"preloaded {len(events):,} events into {s.topic('clickstream')} ({rate:,.0f}/s); "
                f"starting {workers} worker(s)")
            runs[workers] = await drain(base, s, workers, len(events), args.cap_seconds, logdir)
            r = runs[workers]
            log(f"{workers} worker(s): {r['events']:,} events in {r['seconds']} s = {r['events_per_s']:,} events/s; "
                f"cores {r['cpu_cores']}")
            states[workers] = await redis_state(s, events)
        check = compare_runs(events, states[1], states[2])
        log(f"state check: {check}")
    finally:
        removed = await ingest.cleanup(base, [x.topic_prefix for x in settings], [x.app_id for x in settings],
                                       [x.redis_namespace for x in settings])
        log(f"cleanup: {removed[0]} topics deleted, {removed[1]:,} Redis keys unlinked")
    return {"runs": {str(k): v for k, v in runs.items()}, "state_check": check}


# -- 2. serving --------------------------------------------------------------------------------------

def serving_settings(args: argparse.Namespace) -> Settings:
    return dataclasses.replace(srv.bench_settings(args), topic_prefix=TAG, redis_namespace=f"{TAG}:",
                               app_id=f"bench-{TAG}", model_name=f"bench-{TAG}", home_dir=ROOT / ".local" / TAG)


async def agents_ready(s: Settings, client: aioredis.Redis, procs: harness.Procs, per_role: int,
                       timeout_s: float = 240) -> None:
    """Until `per_role` live snapshots of each serving role report the published model."""
    want = await srv.serving_pointer(s, client)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.check()
        counts = collections.Counter()
        for role in ("retrieval", "ranking"):
            async for key in client.scan_iter(match=f"{s.redis_namespace}metrics:{role}:*"):
                pid = int(key.decode().rsplit(":", 1)[1])
                raw = await client.get(key)
                if raw and pid in procs.pids().values() and orjson.loads(raw).get("model_version") == want \
                        and time.time() - orjson.loads(raw)["ts"] < 5:
                    counts[role] += 1
        if counts["retrieval"] >= per_role and counts["ranking"] >= per_role:
            return
        await asyncio.sleep(1)
    raise RuntimeError(f"{per_role} agents of each role did not serve model {want} within {timeout_s} s")


async def ladder(port: int, traffic: srv.Traffic, cpu: srv.Cpu, client: aioredis.Redis, s: Settings,
                 rates: list[float], seconds: float, label: str) -> dict:
    """Fixed-rate runs, ascending, until two fail in a row; the highest passing rate."""
    out, fails, best = [], 0, 0.0
    for rate in rates:
        await unlink_matching(client, f"{s.redis_namespace}homecache:*")
        r = await srv.run_load(port, traffic, rate, seconds, cpu)
        sm = r.summary()
        ok = srv.passes(sm)
        sm["passes"] = ok
        sm["agent_answered_qps"] = down(sm["requests"] * (1 - sm["fallback_share"]) / seconds, 1)
        out.append(sm)
        log(f"  {label} {rate:g} QPS: p50 {sm['p50_ms']} p99 {sm['p99_ms']} ms, non-200 {sm['errors_non200']}, "
            f"fallback {sm['fallback_share']}, answered by agents {sm['agent_answered_qps']}/s: "
            f"{'pass' if ok else 'fail'}; cores {sm['cpu_cores']}")
        if ok:
            best, fails = max(best, rate), 0
        else:
            fails += 1
            if fails == 2:
                break
    return {"max_qps_passing": best, "runs": out}


# -- 3. rebalance under load ---------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    t: float
    status: int | str
    fallback: bool
    latency_ms: float


async def timed_load(port: int, traffic: srv.Traffic, rate: float, seconds: float) -> list[Outcome]:
    """Open loop at `rate` for `seconds`, every request's outcome with its start time (monotonic)."""
    http = srv.Http(port)
    outcomes: list[Outcome] = []
    tasks: set[asyncio.Task] = set()

    async def one(sched: float, path: str) -> None:
        t = time.monotonic()
        try:
            status, body = await asyncio.wait_for(http.request("GET", path), srv.REQUEST_TIMEOUT_S)
        except Exception as exc:
            outcomes.append(Outcome(t, type(exc).__name__, False, (time.perf_counter() - sched) * 1000))
            return
        fb = status == 200 and bool(orjson.loads(body).get("fallback"))
        outcomes.append(Outcome(t, status, fb, (time.perf_counter() - sched) * 1000))

    t0 = time.perf_counter() + 0.05
    for i in range(int(rate * seconds)):
        sched = t0 + i / rate
        delay = sched - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(sched, traffic.next()[1]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    http.close()
    return outcomes


def window(outcomes: list[Outcome], a: float, b: float) -> dict:
    xs = [o for o in outcomes if a <= o.t < b]
    errors = [o for o in xs if o.status != 200]
    return {"requests": len(xs), "errors": len(errors),
            "error_kinds": dict(collections.Counter(str(o.status) for o in errors)),
            "fallbacks": sum(o.fallback for o in xs), "p50_ms": down(pct([o.latency_ms for o in xs], 0.5)),
            "p99_ms": down(pct([o.latency_ms for o in xs], 0.99))}


async def rebalance_phase(args: argparse.Namespace, base: Settings, s: Settings, procs: harness.Procs, port: int,
                          traffic: srv.Traffic, events: list[Event], logdir: Path, client: aioredis.Redis) -> dict:
    fs = ingest.fresh(base, f"{uuid.uuid4().hex[:8]}rb", home_dir=logdir / "home-rb")
    await ensure_topics(fs, [spec(fs, "clickstream"), spec(fs, "catalogue"), spec(fs, "deadletter")])
    n = int(args.rebalance_events_per_s * args.rebalance_seconds)
    sent_events = (events * (n // len(events) + 1))[:n]
    sent_events = [dataclasses.replace(e, event_id=f"rb{i}-{e.event_id}"[:64]) for i, e in enumerate(sent_events)]
    fw = {"fw1": ingest.start(fs, ingest.worker_argv(), logdir / "rb-fw1.log")}
    fclient = aioredis.from_url(fs.redis_url)
    pids = lambda: {**{k: p.pid for k, p in fw.items() if p.poll() is None}, **procs.pids(),  # noqa: E731
                    **ingest.service_pids(base), "bench": os.getpid()}
    marks: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 120
        while await split(fclient, fs, [fw["fw1"].pid]) is None:
            harness.check_alive(fw["fw1"], logdir / "rb-fw1.log")
            if time.monotonic() > deadline:
                raise RuntimeError("rebalance: the first feature worker did not take the topic within 120 s")
            await asyncio.sleep(0.3)
        producer = create_producer(fs)
        await producer.start()
        T = args.rebalance_seconds
        log(f"rebalance: {args.rebalance_events_per_s:g} events/s and {args.rebalance_qps:g} QPS for {T:g} s; "
            f"join at {T / 6:.0f} s, SIGTERM at {7 * T / 12:.0f} s")
        cpu0 = ingest.cpu_mark(pids())

        async def choreography() -> None:
            t0 = time.monotonic()
            marks["start"] = t0
            await asyncio.sleep(T / 6)
            marks["join"] = time.monotonic()
            fw["fw2"] = ingest.start(fs, ingest.worker_argv(), logdir / "rb-fw2.log")
            procs.start("retrieval-2", ["worker", "retrieval"])
            procs.start("ranking-2", ["worker", "ranking"])
            log(f"  t={time.monotonic() - t0:.1f} s: second feature worker and second retrieval + ranking started")
            await asyncio.sleep(max(0.0, t0 + 7 * T / 12 - time.monotonic()))
            parts = await split(fclient, fs, [fw["fw1"].pid, fw["fw2"].pid])
            marks["split_before_leave"] = parts and [sorted(x) for x in parts]
            marks["leave"] = time.monotonic()
            fw["fw1"].send_signal(signal.SIGTERM)
            for name in ("retrieval", "ranking"):
                procs.procs[name].send_signal(signal.SIGTERM)
            log(f"  t={time.monotonic() - t0:.1f} s: SIGTERM to the first feature worker, retrieval and ranking "
                f"(feature partitions before: {marks['split_before_leave']})")
            for name in ("retrieval", "ranking"):
                marks[f"{name}_exit"] = await asyncio.to_thread(procs.procs[name].wait, 60)
                procs.procs.pop(name)
            marks["fw1_exit"] = await asyncio.to_thread(fw["fw1"].wait, 60)

        chore = asyncio.create_task(choreography())
        sender = asyncio.create_task(publish(producer, fs.topic("clickstream"), sent_events,
                                             rate_per_s=args.rebalance_events_per_s, progress=False))
        outcomes = await timed_load(port, traffic, args.rebalance_qps, T)
        await chore
        sent = await sender
        cpu1 = ingest.cpu_mark(pids())
        await producer.stop()
        log(f"  load done: {len(outcomes)} requests; {sent.acked:,} events acknowledged in {sent.seconds:.1f} s")
        # exactly once: every partition applied to its last offset, each user's events counted once
        store = open_store(fs, fclient)
        ends = await end_offsets(fs)
        deadline = time.monotonic() + 180
        while (applied := await store.applied_offsets(ends)) != {p: e - 1 for p, e in ends.items()}:
            harness.check_alive(fw["fw2"], logdir / "rb-fw2.log")
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        per_user = collections.Counter(e.user_id for e in sent_events)
        pipe = fclient.pipeline(transaction=False)
        for u in per_user:
            pipe.hget(fs.redis_namespace + keys.user_features(u), "events")
        got = dict(zip(per_user, await pipe.execute()))
        wrong = {u: (int(v or 0), per_user[u]) for u, v in got.items() if int(v or 0) != per_user[u]}
        parts_after = await split(fclient, fs, [fw["fw2"].pid])
    finally:
        for p in fw.values():
            harness.stop_process(p)
        await fclient.aclose()
        await ingest.cleanup(base, [fs.topic_prefix], [fs.app_id], [fs.redis_namespace])
    # the serving stack back to one pair under the original names, for whatever runs next
    procs.procs["retrieval"], procs.procs["ranking"] = procs.procs.pop("retrieval-2"), procs.procs.pop("ranking-2")
    t0 = marks["start"]
    out = {
        "events_per_s": args.rebalance_events_per_s, "qps": args.rebalance_qps, "seconds": args.rebalance_seconds,
        "join_at_s": down(marks["join"] - t0, 1), "leave_at_s": down(marks["leave"] - t0, 1),
        "feature_partitions_before_leave": marks["split_before_leave"],
        "feature_partitions_after": parts_after and [sorted(x) for x in parts_after],
        "exit_codes": {"feature_worker_1": marks["fw1_exit"], "retrieval_1": marks["retrieval_exit"],
                       "ranking_1": marks["ranking_exit"]},
        "events_sent": sent.acked, "applied_equals_last_offset": applied == {p: e - 1 for p, e in ends.items()},
        "applied_offsets": applied, "end_offsets": ends, "users": len(per_user), "users_events_wrong": len(wrong),
        "users_events_wrong_sample": dict(list(wrong.items())[:5]),
        "all": window(outcomes, 0, float("inf")),
        "before_join": window(outcomes, t0, marks["join"]),
        "join_to_leave": window(outcomes, marks["join"], marks["leave"]),
        "after_leave": window(outcomes, marks["leave"], float("inf")),
        "fallbacks_by_second": fallbacks_by_second(outcomes, t0),
        "cpu_cores": srv.Cpu.cores(cpu0, cpu1),
    }
    return out


def fallbacks_by_second(outcomes: list[Outcome], t0: float) -> dict[str, int]:
    c = collections.Counter(int(o.t - t0) for o in outcomes if o.fallback or o.status != 200)
    return {str(k): v for k, v in sorted(c.items())}


async def end_offsets(s: Settings) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(s.topic("clickstream"), p) for p in range(s.clickstream_partitions)]
        return {tp.partition: off for tp, off in (await consumer.end_offsets(parts)).items()}
    finally:
        await consumer.stop()


async def serving_phases(args: argparse.Namespace, base: Settings, events: list[Event], logdir: Path) -> dict:
    s = serving_settings(args)
    client = aioredis.from_url(s.redis_url)
    procs = srv.procs_for(s, logdir)
    out: dict = {}
    try:
        await ensure_topics(s)
        info = await srv.setup(s, args, procs, client)
        out["setup"] = {k: info.get(k) for k in ("done_at", "events", "products", "users", "version", "cached",
                                                 "setup_s")}
        traffic = srv.traffic_of(info)
        port = harness.free_port()
        await srv.start_serving(s, procs, client, port)
        for pairs in (1, 2):
            if pairs == 2:
                procs.start("retrieval-2", ["worker", "retrieval"])
                procs.start("ranking-2", ["worker", "ranking"])
            await agents_ready(s, client, procs, pairs)
            await asyncio.sleep(8)   # the groups' rebalance settles (heartbeats every 3 s)
            cpu = srv.Cpu({**procs.pids(), **ingest.service_pids(base)})
            warm = await srv.run_load(port, traffic, 50, 10, cpu)
            wm = warm.summary()
            log(f"{pairs} pair(s): warm-up p99 {wm['p99_ms']} ms, fallback {wm['fallback_share']}")
            out[f"pairs_{pairs}"] = await ladder(port, traffic, cpu, client, s, args.rates, args.step_seconds,
                                                 f"{pairs} pair(s)")
        for name in ("retrieval-2", "ranking-2"):
            procs.stop(name)
        await asyncio.sleep(8)
        out["rebalance"] = await rebalance_phase(args, base, s, procs, port, traffic, events, logdir, client)
    finally:
        procs.stop_all()
        await client.aclose()
    return out


# -- the run ------------------------------------------------------------------------------------------

def figures_of(details: dict) -> dict:
    f: dict = {}
    if "features" in details:
        runs, check = details["features"]["runs"], details["features"]["state_check"]
        f["feature_workers_1_events_per_s"] = runs["1"]["events_per_s"]
        f["feature_workers_2_events_per_s"] = runs["2"]["events_per_s"]
        f["feature_workers_2_state_equal_users"] = check["users_features_equal_between_runs"]
        f["feature_workers_state_users"] = check["users"]
        f["feature_workers_pop_counts_equal_events"] = check["pop_counts_equal_events"]
    if "serving" in details:
        sv = details["serving"]
        for pairs in (1, 2):
            f[f"serving_workers_{pairs}_qps"] = sv[f"pairs_{pairs}"]["max_qps_passing"]
            runs = sv[f"pairs_{pairs}"]["runs"]
            best = [r for r in runs if r["passes"] and r["rate_qps"] == f[f"serving_workers_{pairs}_qps"]]
            if best:
                f[f"serving_workers_{pairs}_p50_ms"] = best[0]["p50_ms"]
                f[f"serving_workers_{pairs}_p99_ms"] = best[0]["p99_ms"]
        rb = sv["rebalance"]
        f["rebalance_errors"] = rb["all"]["errors"]
        f["rebalance_fallbacks"] = rb["all"]["fallbacks"]
        f["rebalance_requests"] = rb["all"]["requests"]
        f["rebalance_events_applied_exactly_once"] = rb["applied_equals_last_offset"] and rb["users_events_wrong"] == 0
    return f


def print_table(details: dict, figures: dict) -> None:
    if "features" in details:
        print("\nfeature workers on a preloaded 8-partition topic (cores over the timed window)")
        print(f"{'workers':>7} {'events':>9} {'seconds':>8} {'events/s':>9}  cores per process")
        for k, r in details["features"]["runs"].items():
            print(f"{k:>7} {r['events']:>9,} {r['seconds']:>8} {r['events_per_s']:>9,}  {r['cpu_cores']}")
    if "serving" in details:
        print("\nserving: rate ladder (p99 <= 50 ms, all 200, fallback <= 1% to pass)")
        for pairs in (1, 2):
            for r in details["serving"][f"pairs_{pairs}"]["runs"]:
                print(f"  {pairs}+{pairs} {r['rate_qps']:>6g} QPS p50 {r['p50_ms']:>7} p99 {r['p99_ms']:>7} ms "
                      f"fallback {r['fallback_share']:<7} non-200 {r['errors_non200']} "
                      f"{'pass' if r['passes'] else 'fail'}  cores {r['cpu_cores']}")
        rb = details["serving"]["rebalance"]
        print(f"\nrebalance: {rb['all']}; join {rb['join_to_leave']}; after leave {rb['after_leave']}")
    print("\n" + json.dumps(figures, indent=1))


def write(out: Path, details: dict, figures: dict, command: str) -> None:
    """Merge into scale.json: figures beside other parts' (bench/index_scale.py), details under our name."""
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault("name", "scale")
    data.setdefault("figures", {}).update(figures)
    date = harness.now_iso()
    part = data.setdefault("scale_workers", {})   # a run of some phases keeps the others' details
    part.update({"date": date, "command": command, "machine": harness.machine(), "loadavg_end": os.getloadavg(),
                 **{k: ({**v, "date": date, "command": command} if k in ("features", "serving") else v)
                    for k, v in details.items()}})
    commands = data.setdefault("commands", {})
    if "index_scale" in data:
        commands.setdefault("index_scale", data["index_scale"].get("command"))
    for phase in ("features", "serving"):
        if phase in details:
            commands[f"scale_workers:{phase}"] = command
    for key, value in (("date", date), ("machine", harness.machine()), ("command", command)):
        data.setdefault(key, value)   # the record's own fields: kept if another part wrote them
    harness.write_json(out, data)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--events", type=int, default=200_000, help="events preloaded for the feature phase (count)")
    p.add_argument("--users", type=int, default=6000, help="shoppers of the feature phase's shop (count)")
    p.add_argument("--products", type=int, default=100_000, help="serving catalogue size (count); the feature "
                   "phase's shop has --feature-products")
    p.add_argument("--feature-products", type=int, default=5000)
    p.add_argument("--serving-users", type=int, default=5000)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--ranker-trees", type=int, default=200)
    p.add_argument("--ranker-target-sample", type=float, default=0.02)
    p.add_argument("--cap-seconds", type=float, default=120.0, help="a drain stops after this long (seconds)")
    p.add_argument("--rates", type=lambda x: [float(r) for r in x.split(",")],
                   default=[60.0, 80.0, 100.0, 120.0, 140.0, 160.0], help="QPS ladder, ascending (comma-separated)")
    p.add_argument("--step-seconds", type=float, default=20.0)
    p.add_argument("--rebalance-events-per-s", type=float, default=1000.0)
    p.add_argument("--rebalance-qps", type=float, default=50.0)
    p.add_argument("--rebalance-seconds", type=float, default=60.0)
    p.add_argument("--phases", type=lambda x: set(x.split(",")), default={"features", "serving"})
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    feature_args = argparse.Namespace(**{**vars(args), "products": args.feature_products})
    serving_args = argparse.Namespace(**{**vars(args), "users": args.serving_users})
    import uvloop

    details = uvloop.run(_run(args, feature_args, serving_args))
    figures = figures_of(details)
    print_table(details, figures)
    command = harness.command_line()
    write(args.out, details, figures, command)
    print(f"\nwrote {args.out}")
    return 0


async def _run(args, feature_args, serving_args) -> dict:
    base = load()
    logdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    log(f"logs in {logdir}")
    events = ingest.shop_events(feature_args)[:args.events]
    details: dict = {"logs": str(logdir), "parameters": vars(args)}
    if "features" in args.phases:
        details["features"] = await feature_phase(args, base, events, logdir)
    if "serving" in args.phases:
        details["serving"] = await serving_phases(serving_args, base, events, logdir)
    return details


if __name__ == "__main__":
    sys.exit(main())
