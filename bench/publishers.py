"""Benchmark: end-to-end latency of events published by each Kafka client a shop may use, to the
feature agents' writes in Redis (issue 23: any partitioner works, at what cost).

Run from the repository root, with Kafka and Redis up (`recstream services up`):

    .venv/bin/python bench/publishers.py                  # bench/results/publishers.json

For each client: a fresh 8-partition clickstream (topic prefix, app id, Redis namespace of its own),
the feature agents in this process, 2 s of warm-up, then --events events over --users shoppers paced
at --rate, each stamped time.time() as it is handed to the client. The agents' event-time -> Redis
histogram (agents/features.py FeatureStats.event_latency) over that window gives p50/p99: the
client's send, the broker, the agent's batch and, for records on another partition than their
shopper's, the re-route hop (copy acked on the owner partition, then folded). Clients: aiokafka
(murmur2, recstream's own), confluent-kafka with librdkafka's default partitioner (consistent_random,
CRC32: 7 of 8 records re-routed) and with murmur2_random, and the Java client (kafka-clients,
examples/java/PublishEvents.java, fed through its stdin after the JVM started).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import redis.asyncio as aioredis
from faust.contrib.asgi import faust_app_running

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from agents import features  # noqa: E402
from bench import harness  # noqa: E402
from cli import services  # noqa: E402
from recstream.settings import load  # noqa: E402
from recstream.stats import percentiles_ms  # noqa: E402
from streams.app import create_app  # noqa: E402
from streams.online_store import unlink_matching  # noqa: E402
from streams.producer import create_producer  # noqa: E402
from streams.topics import delete_topics, ensure_topics, specs  # noqa: E402

CLIENTS = ("aiokafka", "librdkafka-default", "librdkafka-murmur2", "java")


def event(i: int, users: int) -> dict:
    u = f"shopper-{i % users}"
    return {"version": 1, "event_id": uuid.uuid4().hex, "user_id": u, "session_id": f"{u}-s", "product_id": f"p{i % 997}",
            "event_type": "view", "timestamp": time.time()}


async def paced(n: int, rate: float, send) -> None:
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(i)


async def publish(client: str, s, args) -> None:
    topic = s.topic("clickstream")
    if client == "aiokafka":
        producer = create_producer(s)
        await producer.start()
        try:
            futures = []

            async def send(i):
                e = event(i, args.users)
                futures.append(await producer.send(topic, orjson.dumps(e), key=e["user_id"].encode()))
            await paced(args.events, args.rate, send)
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
    elif client.startswith("librdkafka"):
        from confluent_kafka import Producer
        config = {"bootstrap.servers": s.kafka_bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5}
        if client == "librdkafka-murmur2":
            config["partitioner"] = "murmur2_random"
        producer = Producer(config)
        stop = threading.Event()
        poller = threading.Thread(target=lambda: [producer.poll(0.05) for _ in iter(stop.is_set, True)])
        poller.start()

        async def send(i):
            e = event(i, args.users)
            producer.produce(topic, key=e["user_id"].encode(), value=orjson.dumps(e))
        await paced(args.events, args.rate, send)
        stop.set()
        poller.join()
        assert await asyncio.to_thread(producer.flush, 30) == 0
    else:
        java = await asyncio.create_subprocess_exec(
            "java", "-cp", str(services.kafka_libs(load()).resolve() / "*"),
            str(ROOT / "examples" / "java" / "PublishEvents.java"), s.kafka_bootstrap, topic, "user_id",
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(6)   # the JVM compiles the example and connects before the clock starts

        async def send(i):
            java.stdin.write(orjson.dumps(event(i, args.users)) + b"\n")
            await java.stdin.drain()
        await paced(args.events, args.rate, send)
        java.stdin.close()
        assert await java.wait() == 0


async def measure(client: str, args) -> dict:
    tag = uuid.uuid4().hex[:8]
    home = Path(tempfile.mkdtemp(prefix="bench-publishers-"))
    s = dataclasses.replace(load(), topic_prefix=f"bench{tag}", app_id=f"bench-publishers-{tag}",
                            redis_namespace=f"bench{tag}:", clickstream_partitions=8, home_dir=home)
    await ensure_topics(s)
    client_redis = aioredis.from_url(s.redis_url)
    app = create_app(s)
    agents = features.register(app, s, client_redis)
    try:
        async with faust_app_running(app):
            await asyncio.sleep(2)
            warm = argparse.Namespace(**{**vars(args), "events": int(args.rate)})
            await publish("aiokafka", s, warm)   # warm-up: the agents' first batches, the topic's metadata
            while agents.stats.seen < warm.events:
                await asyncio.sleep(0.1)
            before, rerouted0 = agents.stats.event_latency.counts.copy(), agents.stats.rerouted
            t0 = time.monotonic()
            await publish(client, s, args)
            while agents.stats.seen < warm.events + args.events:
                if time.monotonic() - t0 > 120:
                    raise TimeoutError(f"{client}: {agents.stats.seen - warm.events} of {args.events} folded")
                await asyncio.sleep(0.05)
            window = agents.stats.event_latency.counts - before
            return {"client": client, "events": args.events, "rate": args.rate,
                    "rerouted": agents.stats.rerouted - rerouted0, **percentiles_ms(window, (50, 99)),
                    "count": int(np.sum(window))}
    finally:
        await unlink_matching(client_redis, f"{s.redis_namespace}*")
        await client_redis.aclose()
        await delete_topics(s, [t.name for t in specs(s)] + [f"{s.app_id}-user-sessions-changelog"])


async def main(args) -> dict:
    """Figures per client: end-to-end p50 and p99 (ms), records re-routed, events sent."""
    figures = {}
    for client in args.clients:
        row = await measure(client, args)
        print(f"{row['client']:20s} p50 {row['p50']:7.1f} ms  p99 {row['p99']:7.1f} ms  "
              f"re-routed {row['rerouted']} of {row['events']}", flush=True)
        figures[client] = {"p50_ms": row["p50"], "p99_ms": row["p99"], "rerouted": row["rerouted"],
                           "events": row["events"], "measured": row["count"]}
    return figures


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=3000)
    p.add_argument("--rate", type=float, default=500.0, help="events/s")
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=CLIENTS)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "publishers.json")
    a = p.parse_args()
    figures = asyncio.run(main(a))
    harness.write_result("publishers", figures, out=a.out, parameters={"events": a.events, "rate": a.rate,
                                                                          "users": a.users})
    print(f"wrote {a.out}")
