"""Prometheus metrics: one CollectorRegistry per process (never prometheus_client's global one).

Workers (features, archive, retrieval, ranking, attribution) already build a JSON snapshot of their
counters every 2 s for Redis (agents/worker.py); `SnapshotCollector` turns the latest snapshot into
Prometheus metrics at scrape time, so a scrape touches no hot path and no event loop object.
`serve_metrics` starts prometheus_client's HTTP server on `metrics_port` (0: off).

The API's own metrics (requests, stage latency, fallbacks, cache, experiments, model, consumer lag)
are in `ApiMetrics`; the lag sampler that fills the lag gauges is `LagSampler`.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from recstream.stats import BUCKETS, bucket_upper_s
from schemas import RecommendationReply

log = logging.getLogger(__name__)

# Prometheus bucket bounds (seconds) the fine log-spaced recstream.stats histograms are folded into
METRICS_EVERY_S = 2.0   # a worker publishes its snapshot (Redis, Prometheus) this often
METRICS_TTL_S = 30      # ... which expires this long after its last publish

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0, 30.0, 60.0, 300.0)
_UPPERS = np.array([bucket_upper_s(i) for i in range(BUCKETS)])


def fold_histogram(counts: Iterable[int], bounds: tuple[float, ...] = LATENCY_BUCKETS_S
                   ) -> tuple[list[tuple[str, float]], float]:
    """recstream.stats counts per fine bucket -> ([(le, cumulative count)...,("+Inf", total)], sum in
    seconds). A fine bucket is counted under the first bound at or above its upper edge (so never
    too early); the sum uses the buckets' upper edges (at most 5% high)."""
    c = np.asarray(list(counts), dtype=np.int64)
    if c.size == 0:
        c = np.zeros(BUCKETS, dtype=np.int64)
    uppers = _UPPERS[: c.size]
    cumulative = np.cumsum(c)
    out: list[tuple[str, float]] = []
    for b in bounds:
        n = int(np.searchsorted(uppers, b * (1 + 1e-9), side="right"))   # fine buckets entirely <= b
        out.append((_le(b), float(cumulative[n - 1]) if n else 0.0))
    total = float(cumulative[-1])
    out.append(("+Inf", total))
    return out, float((c * uppers).sum())


def _le(b: float) -> str:
    return repr(float(b))


# (snapshot key, Prometheus counter, what it counts): the counters a worker's snapshot may carry
COUNTERS = (
    ("archived", "recstream_events_processed", "records processed (events/s: rate() of it)"),
    ("handled", "recstream_requests_handled", "serving requests answered by the agent"),
    ("expired", "recstream_requests_expired", "serving requests dropped past (or too near) their deadline"),
    ("errors", "recstream_request_errors", "serving requests whose batch failed"),
    ("dead_letters", "recstream_dead_letters", "records sent to the dead-letter topic"),
    ("duplicates", "recstream_duplicates", "repeated events dropped by event_id"),
    ("refilled", "recstream_refilled_records", "records the consumer skipped, read again from Kafka"),
    ("rerouted", "recstream_rerouted_records",
     "clickstream records on another partition than their shopper's (another partitioner), copied there"),
    ("recovered_states", "recstream_recovered_states",
     "users whose session-table row was behind Redis' copy (a table write lost in a rebalance)"),
    ("erased_dropped", "recstream_erased_dropped",
     "records of erased shoppers dropped, not folded, archived or counted (README \"Personal data\")"),
    ("erasures", "recstream_erasures", "erased shoppers whose data this worker deleted"),
    ("batches", "recstream_batches", "batches handled"),
    ("files", "recstream_archive_files", "Parquet files written"),
    ("commit_failures", "recstream_commit_failures", "offset commits that failed"),
    ("gather_partial", "recstream_gather_partial", "sharded requests ranked without every shard's answer"),
    ("gather_late", "recstream_gather_late", "shard answers that came after their request was ranked"),
)


class SnapshotCollector(Collector):
    """Metrics of one worker from the latest snapshot dict its loop published (see module docstring)."""

    def __init__(self, worker: str, snapshot: Callable[[], dict[str, Any] | None]):
        self.worker = worker
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot() or {}
        w = self.worker
        labels = ["worker"]
        up = GaugeMetricFamily("recstream_worker_up", "1 while the worker publishes its snapshot", labels=labels)
        up.add_metric([w], 1.0 if snap else 0.0)
        yield up
        processed = snap.get("processed")
        if isinstance(processed, dict):
            fam = CounterMetricFamily("recstream_events_processed", "records processed (events/s: rate() of it)",
                                      labels=["worker", "kind"])
            for kind, n in processed.items():
                fam.add_metric([w, str(kind)], float(n))
            fam.add_metric([w, "all"], float(sum(processed.values())))
            yield fam
        for key, name, doc in COUNTERS:
            if isinstance(snap.get(key), (int, float)):
                fam = CounterMetricFamily(name, doc, labels=["worker", "kind"] if key == "archived" else labels)
                fam.add_metric([w, "all"] if key == "archived" else [w], float(snap[key]))
                yield fam
        lag = snap.get("lag")
        if isinstance(lag, dict):
            gauge = GaugeMetricFamily("recstream_worker_lag_records", "records behind the partition's end, as the "
                                      "worker sees its own assignment", labels=["worker", "partition"])
            for p, n in lag.items():
                if n is not None:
                    gauge.add_metric([w, str(p)], float(n))
            yield gauge
        if isinstance(snap.get("batch_window_s"), (int, float)):
            gauge = GaugeMetricFamily("recstream_feature_batch_window_seconds", "how long the feature agent gathered "
                                      "its latest batch: short while it keeps up, longer while behind", labels=labels)
            gauge.add_metric([w], float(snap["batch_window_s"]))
            yield gauge
        for key, name, doc in (
                ("event_latency_counts", "recstream_event_to_feature_seconds", "event time to features written in Redis"),
                ("ingest_latency_counts", "recstream_ingest_to_feature_seconds", "Kafka append time to features written"),
                ("handle_latency_counts", "recstream_serving_batch_seconds", "serving batch in to replies queued")):
            if key in snap:
                buckets, total = fold_histogram(snap[key])
                hist = HistogramMetricFamily(name, doc, labels=labels)
                hist.add_metric([w], buckets, total)
                yield hist
        if snap.get("model_version") is not None:
            info = GaugeMetricFamily("recstream_model_info", "model version loaded (value 1)",
                                     labels=["worker", "version"])
            info.add_metric([w, str(snap["model_version"])], 1.0)
            yield info


class SnapshotHolder:
    """Where a worker loop leaves its latest snapshot for the collector (a scrape runs in another thread)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] | None = None

    def __call__(self) -> dict[str, Any] | None:
        return self.snapshot


def worker_registry(worker: str, snapshot: Callable[[], dict[str, Any] | None]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(worker, snapshot))
    return registry


def serve_metrics(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> bool:
    """prometheus_client's HTTP server on `port` (a daemon thread) for this registry; 0: off.
    A port already taken is logged, never fatal: metrics must not stop a worker."""
    if not port:
        return False
    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        log.warning("metrics server not started on port %d: %r", port, exc)
        return False
    log.info("metrics on http://%s:%d/metrics", addr, port)
    return True


def start_worker_metrics(port: int, worker: str) -> SnapshotHolder:
    """The usual worker set-up: a holder for the loop to fill, served on `port` when it is not 0."""
    holder = SnapshotHolder()
    serve_metrics(port, worker_registry(worker, holder))
    return holder


# -- the API ---------------------------------------------------------------------------------------

REQUEST_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0)


@dataclass
class LagSample:
    """One consumer group's lag at one time: per partition (records, seconds)."""
    group: str
    topic: str
    partitions: dict[int, tuple[int, float]] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return sum(r for r, _ in self.partitions.values())

    @property
    def seconds(self) -> float:
        return max((sec for _, sec in self.partitions.values()), default=0.0)


class ApiMetrics:
    """The API process's registry. Counters are updated per request; lag, model and the counters kept
    elsewhere (late replies, exposures lost) are read at scrape time by a collector."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("recstream_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("recstream_http_request_duration_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], buckets=REQUEST_BUCKETS_S, registry=r)
        self.stage = Histogram("recstream_serving_stage_seconds", "time per serving stage (replies' timings; "
                               "'total' when a reply carries none)", ["endpoint", "stage"],
                               buckets=REQUEST_BUCKETS_S, registry=r)
        self.served = Counter("recstream_recommendations", "recommendation replies by how they were served "
                              "(ok, cached, fallback_deadline, fallback_error)", ["endpoint", "status"], registry=r)
        self.fallbacks = Counter("recstream_fallbacks", "replies from the fallback by reason", ["reason"], registry=r)
        self.cache = Counter("recstream_homepage_cache", "homepage cache look-ups (user requests)", ["result"],
                             registry=r)
        self.experiment = Counter("recstream_experiment_requests", "requests served per experiment and variant",
                                  ["experiment", "variant"], registry=r)
        for reason in ("deadline", "error"):
            self.fallbacks.labels(reason)
        for result in ("hit", "miss"):
            self.cache.labels(result)
        self.lag: dict[str, LagSample] = {}
        self.model: dict[str, Any] | None = None
        self.ctr: dict[str, dict[str, dict[str, Any]]] = {}   # experiment -> variant -> {ctr, impressions, clicked}
        self.late_replies: Callable[[], int] = lambda: 0
        self.exposures_lost: Callable[[], int] = lambda: 0
        self.exposures_logged: Callable[[], int] = lambda: 0
        self.exposures_deferred: Callable[[], int] = lambda: 0
        self.exposures_resent: Callable[[], int] = lambda: 0
        self.loop_lag: Callable[[], float] = lambda: 0.0
        r.register(_ApiStateCollector(self))

    def observe_reply(self, endpoint: str, status: str, reply: RecommendationReply, seconds: float) -> None:
        """One recommendation reply: how it was served, stage times, cache, experiments."""
        self.served.labels(endpoint, status).inc()
        if status.startswith("fallback_"):
            self.fallbacks.labels(status[len("fallback_"):]).inc()
        timings = reply.timings_ms or {}
        stages = {k: v for k, v in timings.items() if k != "total"}
        for stage, ms in stages.items():
            self.stage.labels(endpoint, stage).observe(max(0.0, ms) / 1000)
        self.stage.labels(endpoint, "total").observe(seconds)
        for exp, variant in (reply.experiments or {}).items():
            self.experiment.labels(exp, variant).inc()

    def observe_cache(self, hit: bool) -> None:
        self.cache.labels("hit" if hit else "miss").inc()


class _ApiStateCollector(Collector):
    def __init__(self, m: ApiMetrics):
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m = self.m
        late = CounterMetricFamily("recstream_late_replies", "agent replies that came after their deadline")
        late.add_metric([], float(m.late_replies()))
        yield late
        loop = GaugeMetricFamily("recstream_event_loop_lag_seconds", "how late the API's event loop runs (the "
                                 "worst of the last 0.5 s): the wait of a request before its handler")
        loop.add_metric([], float(m.loop_lag()))
        yield loop
        exposures = CounterMetricFamily("recstream_exposures", "exposure records: logged (acknowledged by Kafka), "
                                        "deferred (not acknowledged, kept in the journal), resent (from the "
                                        "journal) or lost (neither acknowledged nor journaled)", labels=["outcome"])
        exposures.add_metric(["logged"], float(m.exposures_logged()))
        exposures.add_metric(["lost"], float(m.exposures_lost()))
        exposures.add_metric(["deferred"], float(m.exposures_deferred()))
        exposures.add_metric(["resent"], float(m.exposures_resent()))
        yield exposures
        records = GaugeMetricFamily("recstream_consumer_lag_records", "committed lag per consumer group and "
                                    "partition (records)", labels=["group", "topic", "partition"])
        seconds = GaugeMetricFamily("recstream_consumer_lag_seconds", "age of the oldest unconsumed record per "
                                    "group and partition (0: caught up)", labels=["group", "topic", "partition"])
        for sample in list(m.lag.values()):
            for p, (n, sec) in sorted(sample.partitions.items()):
                records.add_metric([sample.group, sample.topic, str(p)], float(n))
                seconds.add_metric([sample.group, sample.topic, str(p)], float(sec))
        yield records
        yield seconds
        impressions = GaugeMetricFamily("recstream_experiment_impressions", "attributed impressions per experiment "
                                        "and variant (A/B totals in Redis)", labels=["experiment", "variant"])
        clicked = GaugeMetricFamily("recstream_experiment_clicked", "impressions clicked per experiment and variant",
                                    labels=["experiment", "variant"])
        for exp, variants in list(m.ctr.items()):
            for variant, t in variants.items():
                impressions.add_metric([exp, variant], float(t.get("impressions") or 0))
                clicked.add_metric([exp, variant], float(t.get("clicked") or 0))
        yield impressions
        yield clicked
        if m.model:
            info = GaugeMetricFamily("recstream_model_info", "published model (value 1)", labels=["name", "version"])
            info.add_metric([str(m.model.get("name", "")), str(m.model.get("version", ""))], 1.0)
            yield info
            age = GaugeMetricFamily("recstream_model_age_seconds", "now - the model's published_at")
            age.add_metric([], max(0.0, time.time() - float(m.model.get("published_at") or time.time())))
            yield age


class LagSampler:
    """Committed lag of consumer groups, in records and in seconds, sampled in the background.

    Seconds: for a partition with lag, now minus the timestamp of the record at the committed offset
    (the oldest one the group has not consumed); 0 when caught up. One admin client and one
    group-less consumer live as long as the sampler."""

    def __init__(self, bootstrap: str, groups: list[tuple[str, str]]):
        self.bootstrap = bootstrap
        self.groups = groups   # (group, topic)
        # aiokafka clients, made by start() (aiokafka ships no types)
        self._admin: Any = None
        self._consumer: Any = None   # offsets and metadata only: never assigned (that narrows its metadata)
        self._fetcher: Any = None    # reads the oldest unconsumed records

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                          fetch_max_wait_ms=50, max_partition_fetch_bytes=64 * 1024,
                                          request_timeout_ms=5000)
        self._fetcher = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                         fetch_max_wait_ms=50, max_partition_fetch_bytes=64 * 1024,
                                         request_timeout_ms=5000)
        await self._admin.start()
        await self._consumer.start()
        await self._fetcher.start()

    async def stop(self) -> None:
        for c in (self._fetcher, self._consumer, self._admin):
            if c is None:
                continue
            try:
                await (c.close() if c is self._admin else c.stop())
            except Exception as exc:
                log.debug("lag sampler close: %r", exc)

    async def sample(self) -> list[LagSample]:
        from aiokafka import TopicPartition

        out = []
        consumer = self._consumer
        now = time.time()
        # topic -> (partitions, ends, begins): once per topic
        offsets: dict[str, tuple[list[Any], dict[Any, int], dict[Any, int]]] = {}
        for group, topic in self.groups:
            if topic not in offsets:
                parts = sorted(consumer.partitions_for_topic(topic) or ())
                if not parts:
                    await consumer._client.force_metadata_update()
                    parts = sorted(consumer.partitions_for_topic(topic) or ())
                tps = [TopicPartition(topic, p) for p in parts]
                if tps:
                    offsets[topic] = (tps, await consumer.end_offsets(tps), await consumer.beginning_offsets(tps))
            if topic not in offsets:
                continue
            tps, ends, begins = offsets[topic]
            committed = await self._admin.list_consumer_group_offsets(group, partitions=tps)
            sample = LagSample(group, topic)
            behind = {}
            for tp in tps:
                meta = committed.get(tp)
                c = meta.offset if meta is not None and meta.offset >= 0 else begins[tp]
                c = max(c, begins[tp])
                n = max(0, ends[tp] - c)
                sample.partitions[tp.partition] = (n, 0.0)
                if n:
                    behind[tp] = c
            if behind:
                stamps = await self._oldest_timestamps(behind)
                for tp, ts in stamps.items():
                    n, _ = sample.partitions[tp.partition]
                    sample.partitions[tp.partition] = (n, max(0.0, now - ts / 1000))
            out.append(sample)
        return out

    async def _oldest_timestamps(self, offsets: dict[Any, int]) -> dict[Any, int]:
        """tp -> timestamp (ms) of the first record at or after `offset`."""
        consumer = self._fetcher
        consumer.assign(list(offsets))
        for tp, off in offsets.items():
            consumer.seek(tp, off)
        found: dict[Any, int] = {}
        deadline = time.monotonic() + 2.0
        while len(found) < len(offsets) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=len(offsets) * 4)
            for tp, records in batch.items():
                if tp not in found and records:
                    found[tp] = records[0].timestamp
                    consumer.pause(tp)
        consumer.pause(*consumer.assignment())   # no fetching between samples
        return found


async def sample_forever(sampler: LagSampler, into: dict[str, LagSample], every_s: float,
                         on_sample: Callable[[list[LagSample]], None] | None = None) -> None:
    """Fill `into` ("group topic" -> LagSample) every `every_s` seconds until cancelled; failures are
    logged. aiokafka may turn a cancellation into another exception: the task's cancelling() decides."""
    started = False
    try:
        while True:
            try:
                if not started:
                    await sampler.start()
                    started = True
                samples = await asyncio.wait_for(sampler.sample(), max(10.0, every_s * 3))
                for s in samples:
                    into[f"{s.group} {s.topic}"] = s
                if on_sample:
                    on_sample(samples)
            except Exception as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc
                log.info("consumer lag not sampled: %r", exc)
            await asyncio.sleep(every_s)
    finally:
        await asyncio.shield(sampler.stop())


def cancelling() -> bool:
    """True when the current task is being cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
