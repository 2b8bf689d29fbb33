"""Benchmark: POST /api/v1/events (real uvicorn server) against a bare aiokafka producer loop.

Run from the repository root, with Kafka up (`recstream services up`):

    .venv/bin/python bench/http_ingest.py

For each batch size (1 and 100 events per request) it sends a bounded number of requests (or stops
after --max-seconds) from --concurrency concurrent httpx clients, each waiting for its 202, and
measures events/s and p50/p99 request latency. Then it sends the same events in the same shape
(same batch size, same concurrency, each batch's acks awaited) straight from an aiokafka producer
made by streams.producer.create_producer: the reference, what Kafka costs without HTTP.
Topics get a fresh prefix and are deleted afterwards. Results: bench/results/http_ingest.json.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import orjson
import uvloop
from aiokafka.admin import AIOKafkaAdminClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench import harness  # noqa: E402
from recstream.settings import Settings, load  # noqa: E402
from schemas import Event  # noqa: E402
from streams.producer import create_producer  # noqa: E402
from streams.topics import ensure_topics, specs  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "http_ingest.json"
WARMUP_REQUESTS = 50


@dataclasses.dataclass
class Run:
    path: str
    batch: int
    requests: int
    events: int
    seconds: float
    latencies_ms: list[float]
    errors: int
    own_cpu_s: float = 0.0             # this process: the httpx clients, or the bare producer
    server_cpu_s: float | None = None  # the uvicorn process (http runs only)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return harness.pct(self.latencies_ms, q)


def make_batches(tag: str, batch: int, requests: int) -> list[list[Event]]:
    now = time.time()
    return [[Event(event_id=f"{tag}-{r}-{i}", user_id=f"u{(r * batch + i) % 5000}", session_id=f"s{r % 997}",
                   product_id=f"p{(r * 31 + i) % 20000}", event_type="view", timestamp=now, device="mobile",
                   page="product", price=19.9) for i in range(batch)] for r in range(requests)]


async def drive(path: str, batch: int, items: list, send, concurrency: int, max_seconds: float,
                server_pid: int | None = None) -> Run:
    """Run `send(item)` for each item from `concurrency` workers; stop early after max_seconds."""
    latencies: list[float] = []
    errors = 0
    next_item = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal next_item, errors
        while next_item < len(items) and time.perf_counter() < deadline:
            item = items[next_item]
            next_item += 1
            t0 = time.perf_counter()
            ok = await send(item)
            latencies.append((time.perf_counter() - t0) * 1000)
            errors += not ok

    cpu0, server_cpu0 = time.process_time(), harness.cpu_s(server_pid) if server_pid else 0.0
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    server_cpu = harness.cpu_s(server_pid) - server_cpu0 if server_pid else None
    done = len(latencies)
    return Run(path, batch, done, (done - errors) * batch, seconds, latencies, errors,
               time.process_time() - cpu0, server_cpu)


async def http_case(base_url: str, server_pid: int, batch: int, requests: int, concurrency: int,
                    max_seconds: float) -> Run:
    batches = make_batches(f"h{batch}", batch, requests + WARMUP_REQUESTS)
    bodies = [orjson.dumps(b[0].to_dict()) if batch == 1 else orjson.dumps([e.to_dict() for e in b]) for b in batches]
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
        async def send(body: bytes) -> bool:
            return (await client.post("/api/v1/events", content=body, headers=headers)).status_code == 202

        await drive("http", batch, bodies[:WARMUP_REQUESTS], send, concurrency, max_seconds)
        return await drive("http", batch, bodies[WARMUP_REQUESTS:], send, concurrency, max_seconds, server_pid)


async def bare_case(s: Settings, batch: int, requests: int, concurrency: int, max_seconds: float) -> Run:
    """The same events in the same shape from a bare producer loop: send the batch, await its acks."""
    batches = make_batches(f"k{batch}", batch, requests + WARMUP_REQUESTS)
    topic = s.topic("clickstream")
    producer = create_producer(s)
    await producer.start()
    try:
        async def send(events: list[Event]) -> bool:
            acks = [await producer.send(topic, e.to_json(), key=e.key) for e in events]
            await asyncio.gather(*acks)
            return True

        await drive("bare producer", batch, batches[:WARMUP_REQUESTS], send, concurrency, max_seconds)
        return await drive("bare producer", batch, batches[WARMUP_REQUESTS:], send, concurrency, max_seconds)
    finally:
        await producer.stop()


def start_server(s: Settings, port: int, log_path: Path) -> subprocess.Popen:
    code = f"from recstream.settings import load; from serving.app import serve; serve(load(), '127.0.0.1', {port})"
    return harness.start_process(["-c", code], log_path, env={**os.environ, "RECSTREAM_TOPIC_PREFIX": s.topic_prefix})


async def wait_healthy(base_url: str, server: subprocess.Popen, log_path: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base_url, timeout=2) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode}:\n{log_path.read_text()}")
            try:
                if (await client.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout_s} s:\n{log_path.read_text()}")


def stop_server(server: subprocess.Popen) -> None:
    harness.stop_process(server, signal.SIGINT, 15)  # uvicorn shuts down gracefully: the lifespan flushes the producer


async def delete_topics(s: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([t.name for t in specs(s)])
    finally:
        await admin.close()


async def run(args: argparse.Namespace) -> dict:
    s = dataclasses.replace(load(), topic_prefix=f"bench{uuid.uuid4().hex[:8]}")
    await ensure_topics(s)
    port = harness.free_port()
    base_url = f"http://127.0.0.1:{port}"
    cases = [(1, args.requests_batch1), (100, args.requests_batch100)]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        server = start_server(s, port, log_path)
        try:
            await wait_healthy(base_url, server, log_path)
            for batch, requests in cases:
                runs.append(await http_case(base_url, server.pid, batch, requests, args.concurrency, args.max_seconds))
        finally:
            stop_server(server)
    for batch, requests in cases:
        runs.append(await bare_case(s, batch, requests, args.concurrency, args.max_seconds))
    await delete_topics(s)
    return report(args, s, runs)


def report(args: argparse.Namespace, s: Settings, runs: list[Run]) -> dict:
    print(f"\nPOST /api/v1/events vs bare producer; concurrency {args.concurrency}, "
          f"producer_linger_ms {s.producer_linger_ms}, acks=all\n")
    print(f"{'path':14} {'batch':>5} {'requests':>8} {'events':>8} {'errors':>6} {'events/s':>10} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'client cpu':>10} {'server cpu':>10}")
    for r in runs:
        server = f"{r.server_cpu_s / r.seconds:>10.0%}" if r.server_cpu_s is not None else f"{'-':>10}"
        print(f"{r.path:14} {r.batch:>5} {r.requests:>8} {r.events:>8} {r.errors:>6} {r.events_per_s:>10,.0f} "
              f"{r.pct(0.5):>8.2f} {r.pct(0.99):>8.2f} {r.own_cpu_s / r.seconds:>10.0%} {server}")
    print("\n(cpu: share of one core; 'client' is this process: the httpx clients, or the bare producer)")
    by = {(r.path, r.batch): r for r in runs}
    figures = {
        "http_events_per_s_batch1": round(by["http", 1].events_per_s, 1),
        "http_p99_ms_batch1": round(by["http", 1].pct(0.99), 2),
        "http_events_per_s_batch100": round(by["http", 100].events_per_s, 1),
        "http_p99_ms_batch100": round(by["http", 100].pct(0.99), 2),
        "bare_producer_events_per_s": round(by["bare producer", 100].events_per_s, 1),
        "http_p50_ms_batch1": round(by["http", 1].pct(0.5), 2),
        "http_p50_ms_batch100": round(by["http", 100].pct(0.5), 2),
        "bare_producer_events_per_s_batch1": round(by["bare producer", 1].events_per_s, 1),
        "bare_producer_p99_ms_batch1": round(by["bare producer", 1].pct(0.99), 2),
        "bare_producer_p99_ms_batch100": round(by["bare producer", 100].pct(0.99), 2),
        "http_server_cpu_us_per_event_batch1": round(by["http", 1].server_cpu_s / max(1, by["http", 1].events) * 1e6, 1),
        "http_server_cpu_us_per_event_batch100":
            round(by["http", 100].server_cpu_s / max(1, by["http", 100].events) * 1e6, 1),
        "http_client_cpu_share_batch1": round(by["http", 1].own_cpu_s / by["http", 1].seconds, 2),
    }
    return harness.result("http_ingest", figures, parameters={
        "concurrency": args.concurrency, "max_seconds_per_case": args.max_seconds,
        "requests_batch1": args.requests_batch1, "requests_batch100": args.requests_batch100,
        "producer_linger_ms": s.producer_linger_ms, "errors": sum(r.errors for r in runs),
        "bare_producer_events_per_s_is": "the batch-100 bare run"})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients (count)")
    p.add_argument("--requests-batch1", type=int, default=8000, help="requests of 1 event (count)")
    p.add_argument("--requests-batch100", type=int, default=800, help="requests of 100 events (count)")
    p.add_argument("--max-seconds", type=float, default=15.0, help="a case stops after this long (seconds)")
    args = p.parse_args()
    result = uvloop.run(run(args))
    harness.write_json(RESULTS, result)
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 1 if result["parameters"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
