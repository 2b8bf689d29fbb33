"""On-call: GET /dashboard (one self-contained HTML page, charts drawn by hand on <canvas>, kept in
serving/static/dashboard.html and installed as package data) and GET /api/v1/ops/summary (the JSON
it polls every 2 s), from the API process itself.

`OpsMonitor` lives in the API process. Every `ops_sample_s` it snapshots its own request latency
histogram and fallback counters, reads the feature workers' Redis snapshots (event-to-feature
latency), the published model pointer and the A/B totals; every `lag_sample_s` it samples the
committed lag of every consumer group (records and seconds, streams/metrics.py LagSampler).
Samples go into ring buffers covering `ops_history_s` (15 min by default).

Alert (red banner, `alert.active` in the JSON): the feature group, the real-time consumer, is more
than `alert_lag_s` (10 s) behind, or serving p99 over the last minute passes `alert_p99_ms` (50 ms).
The pure parts (Ring, window_percentiles, alerts) are unit-tested in tests/unit/test_ops.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from importlib.resources import files
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from recstream.features import keys
from recstream.features.keys import MODEL_CURRENT
from recstream.settings import Settings
from recstream.stats import BUCKETS, LatencyHistogram, percentiles_ms
from streams.metrics import METRICS_TTL_S, ApiMetrics, LagSample, LagSampler, cancelling, sample_forever
from streams.redisconn import is_cluster

log = logging.getLogger(__name__)

SERIES_WINDOW_S = 10.0   # each chart point: percentiles / rates over the last 10 s
ALERT_WINDOW_S = 60.0    # the p99 alert: the last minute


# -- pure parts ------------------------------------------------------------------------------------

class Ring:
    """(time, value) samples no older than `max_age_s` behind the newest."""

    def __init__(self, max_age_s: float):
        self.max_age_s = max_age_s
        self._items: deque[tuple[float, Any]] = deque()

    def append(self, t: float, value: Any) -> None:
        self._items.append((t, value))
        while self._items and self._items[0][0] < t - self.max_age_s:
            self._items.popleft()

    def items(self) -> list[tuple[float, Any]]:
        return list(self._items)

    def latest(self) -> tuple[float, Any] | None:
        return self._items[-1] if self._items else None

    def at_or_before(self, t: float) -> tuple[float, Any] | None:
        """The newest sample taken at or before `t` (None: all are newer)."""
        found = None
        for item in self._items:
            if item[0] > t:
                break
            found = item
        return found

    def __len__(self) -> int:
        return len(self._items)


def window_counts(ring: Ring, now: float, window_s: float) -> np.ndarray | None:
    """Histogram counts of the last `window_s`: the newest cumulative counts minus those of the newest
    sample at or before now - window_s (none that old: the oldest sample, so a short history gives a
    shorter window; a source's counts from before the first sample never count). None with fewer
    than two samples. A reset source (counts went down: a restarted worker) gives the newest counts."""
    items = ring.items()
    if len(items) < 2:
        return None
    newest = np.asarray(items[-1][1], dtype=np.int64)
    base = ring.at_or_before(now - window_s) or items[0]
    if base is items[-1]:
        return None
    diff = newest - np.asarray(base[1], dtype=np.int64)
    return newest if (diff < 0).any() else diff


def window_percentiles(ring: Ring, now: float, window_s: float, qs: tuple[float, ...] = (50, 99)) -> dict[str, float]:
    """Percentiles (ms) of the last `window_s` from a ring of cumulative histogram counts; NaN when empty."""
    counts = window_counts(ring, now, window_s)
    if counts is None:
        return {f"p{q:g}": math.nan for q in qs}
    return percentiles_ms(counts, qs)


def window_rate(ring: Ring, now: float, window_s: float) -> float:
    """From a ring of cumulative (numerator, denominator): the ratio of their increase over the
    window; NaN when the denominator did not move."""
    latest = ring.latest()
    if latest is None:
        return math.nan
    base = ring.at_or_before(now - window_s)
    num, den = latest[1]
    if base is not None and base[1][1] <= den:
        num, den = num - base[1][0], den - base[1][1]
    return num / den if den > 0 else math.nan


def alerts(feature_lag_s: float | None, p99_ms: float | None, lag_threshold_s: float,
           p99_threshold_ms: float) -> list[str]:
    """The alert's reasons (empty: no alert). Unknown values (None, NaN) raise nothing."""
    reasons = []
    if feature_lag_s is not None and not math.isnan(feature_lag_s) and feature_lag_s > lag_threshold_s:
        reasons.append(f"real-time feature consumer {feature_lag_s:.1f} s behind (threshold {lag_threshold_s:g} s)")
    if p99_ms is not None and not math.isnan(p99_ms) and p99_ms > p99_threshold_ms:
        reasons.append(f"serving p99 {p99_ms:.1f} ms over the last minute (threshold {p99_threshold_ms:g} ms)")
    return reasons


def group_totals(samples: Iterable[LagSample]) -> dict[str, tuple[int, float]]:
    """group -> (records summed over its topics and partitions, seconds: the worst partition)."""
    out: dict[str, tuple[int, float]] = {}
    for s in samples:
        r, sec = out.get(s.group, (0, 0.0))
        out[s.group] = (r + s.records, max(sec, s.seconds))
    return out


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))) else round(float(x), 3)


class LoopLag:
    """How far behind the API's event loop runs. A timer due every `every_s` fires late by however long
    the loop was busy with other work, and a request that arrived meanwhile waited as long before its
    handler's clock started (uvicorn reads and parses it on the same loop): under load that wait is
    most of what a client sees. `current`: the worst lateness of the last `window_s` (the gauge);
    `latest`: the last firing's (what a request arriving now waits, roughly); `sustained`: the least of
    the window's, at least two firings (late all along: an overload, not one pause of the loop)."""

    def __init__(self, every_s: float = 0.02, window_s: float = 0.5):
        self.every_s, self.window_s = every_s, window_s
        self.samples: deque[tuple[float, float]] = deque()

    def observe(self, now: float, late_s: float) -> None:
        self.samples.append((now, max(0.0, late_s)))
        while self.samples and self.samples[0][0] < now - self.window_s:
            self.samples.popleft()

    def current(self, now: float) -> float:
        return max((late for t, late in self.samples if t >= now - self.window_s), default=0.0)

    def latest(self) -> float:
        return self.samples[-1][1] if self.samples else 0.0

    def sustained(self, now: float) -> float:
        recent = [late for t, late in self.samples if t >= now - self.window_s]
        return min(recent) if len(recent) >= 2 else 0.0

    async def run(self) -> None:
        while True:
            due = time.perf_counter() + self.every_s
            await asyncio.sleep(self.every_s)
            now = time.perf_counter()
            self.observe(now, now - due)


# -- the monitor -----------------------------------------------------------------------------------

class OpsMonitor:
    def __init__(self, s: Settings, metrics: ApiMetrics | None = None, client=None,
                 running: Callable[[], set[str]] | None = None):
        self.s = s
        self.running = running or set   # ids of the experiments running now (the experiments file)
        self.metrics = metrics or ApiMetrics()
        self.client = client
        self.latency = LatencyHistogram()        # recommendation requests, for the windowed percentiles
        self.requests = 0
        self.fallbacks = 0
        h = s.ops_history_s
        self.latency_ring, self.fallback_ring, self.feature_ring = Ring(h), Ring(h), Ring(h)
        self.serving_series, self.fallback_series, self.feature_series, self.lag_series = Ring(h), Ring(h), Ring(h), Ring(h)
        self.lag: dict[str, LagSample] = self.metrics.lag
        self.feature_workers = 0
        self.model: dict | None = None
        self.ctr: dict[str, dict[str, dict]] = {}
        self.feature_group = s.app_id
        self.feature_lag: tuple[float, float] | None = None   # (sampled at, seconds behind) of the feature group
        self._tasks: list[asyncio.Task] = []
        self.started_at = time.time()
        self.loop_lag = LoopLag()
        self.metrics.loop_lag = lambda: self.loop_lag.current(time.perf_counter())

    def groups(self) -> list[tuple[str, str]]:
        return self.s.consumer_groups()

    # -- recording (called per request) --
    def observe_request(self, endpoint: str, code: int, seconds: float) -> None:
        """One request, `seconds` from its handler's start; the event loop's latest lateness is added: the
        wait it had before (LoopLag), so the histograms show what clients see, not only the handler."""
        seconds += self.loop_lag.latest()
        self.metrics.requests.labels(endpoint, str(code)).inc()
        self.metrics.latency.labels(endpoint).observe(seconds)
        if endpoint != "events" and endpoint != "other":
            self.latency.add(seconds)
            self.requests += 1

    def observe_reply(self, endpoint: str, status: str, reply, seconds: float) -> None:
        self.metrics.observe_reply(endpoint, status, reply, seconds)
        if status.startswith("fallback_"):
            self.fallbacks += 1

    # -- background sampling --
    async def start(self) -> None:
        self.tick(time.time())
        self._tasks = [asyncio.create_task(self._ticks(), name="ops-ticks"),
                       asyncio.create_task(self.loop_lag.run(), name="ops-loop-lag"),
                       asyncio.create_task(sample_forever(LagSampler(self.s.kafka_bootstrap, self.groups()), self.lag,
                                                          self.s.lag_sample_s, self._on_lag), name="ops-lag")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for t in self._tasks:
            if t.done() and not t.cancelled():
                with contextlib.suppress(BaseException):
                    t.exception()
        self._tasks = []

    def _on_lag(self, samples: list[LagSample]) -> None:
        totals = group_totals(self.lag.values())
        self.lag_series.append(time.time(), totals)
        if self.feature_group in totals:
            self.feature_lag = (time.time(), totals[self.feature_group][1])

    def features_behind_s(self, now: float) -> float | None:
        """The real-time feature consumer's committed lag in seconds, as last sampled; None when unknown or
        older than three sampling periods (the sampler cannot reach Kafka: no reason to shed on old news)."""
        if self.feature_lag is None or now - self.feature_lag[0] > 3 * self.s.lag_sample_s:
            return None
        return self.feature_lag[1]

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(self.s.ops_sample_s)
            try:
                await self.read_redis()
            except Exception as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc
                log.info("ops sample from Redis failed: %r", exc)
            self.tick(time.time())

    def tick(self, now: float) -> None:
        """Snapshot the API's own counters and derive the charts' points (pure but for the clock)."""
        self.latency_ring.append(now, self.latency.counts.copy())
        self.fallback_ring.append(now, (self.fallbacks, self.requests))
        lat = window_percentiles(self.latency_ring, now, SERIES_WINDOW_S)
        self.serving_series.append(now, (lat["p50"], lat["p99"]))
        self.fallback_series.append(now, window_rate(self.fallback_ring, now, SERIES_WINDOW_S))
        if len(self.feature_ring):
            f = window_percentiles(self.feature_ring, now, SERIES_WINDOW_S)
            self.feature_series.append(now, (f["p50"], f["p99"]))

    async def read_redis(self) -> None:
        if self.client is None:
            return
        ns = self.s.redis_namespace
        counts = np.zeros(BUCKETS, dtype=np.int64)
        workers = 0
        index = ns + keys.metrics_index("features")   # no keyspace scan
        await self.client.zremrangebyscore(index, "-inf", time.time() - METRICS_TTL_S)
        live = await self.client.zrange(index, 0, -1)
        mget = self.client.mget_nonatomic if is_cluster(self.client) else self.client.mget   # snapshots: many slots
        for raw in (await mget(live) if live else []):
            if not raw:
                continue
            snap = orjson.loads(raw)
            c = snap.get("event_latency_counts")
            if c:
                counts[: len(c)] += np.asarray(c[:BUCKETS], dtype=np.int64)
                workers += 1
        self.feature_workers = workers
        if workers:
            self.feature_ring.append(time.time(), counts)
        raw = await self.client.get(ns + MODEL_CURRENT)
        self.model = orjson.loads(raw) if raw else None
        self.metrics.model = self.model
        self.ctr = self.metrics.ctr = await self._read_ctr()

    async def _read_ctr(self) -> dict[str, dict[str, dict]]:
        from streams.attribution_store import read_totals

        ns = self.s.redis_namespace
        running = self.running()
        seen = {m.decode() if isinstance(m, bytes) else str(m) for m in await self.client.smembers(f"{ns}abx:experiments")}
        out = {}
        for exp in sorted(running or seen):   # running ones; without a file, every one attributed
            totals = await read_totals(self.client, ns, exp)
            out[exp] = {v: {"ctr": _num(t.rates()["ctr"]), "impressions": t.impressions, "clicked": t.clicked}
                        for v, t in totals.items() if v != "_all"}
        return out

    # -- the summary --
    def summary(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        s = self.s
        groups = group_totals(self.lag.values())
        partitions: dict[str, dict] = {}
        for sample in self.lag.values():
            g = partitions.setdefault(sample.group, {})
            for p, (n, sec) in sorted(sample.partitions.items()):
                g[f"{sample.topic}:{p}"] = {"records": n, "seconds": _num(sec)}
        lag_series: dict[str, list] = {}
        for t, totals in self.lag_series.items():
            for g, (n, sec) in totals.items():
                lag_series.setdefault(g, []).append([round(t, 3), n, _num(sec)])
        feature_lag = groups.get(self.feature_group, (None, None))[1]
        minute = window_percentiles(self.latency_ring, now, ALERT_WINDOW_S)
        reasons = alerts(feature_lag, minute["p99"], s.alert_lag_s, s.alert_p99_ms)
        feat = window_percentiles(self.feature_ring, now, ALERT_WINDOW_S) if len(self.feature_ring) else {}
        model = None
        if self.model:
            published = float(self.model.get("published_at") or 0)
            model = {"name": self.model.get("name"), "version": str(self.model.get("version")),
                     "published_at": published, "age_s": _num(max(0.0, now - published)) if published else None}
        return {
            "ts": now,
            "alert": {"active": bool(reasons), "reasons": reasons},
            "thresholds": {"lag_s": s.alert_lag_s, "p99_ms": s.alert_p99_ms},
            "lag": {"feature_group": self.feature_group,
                    "groups": {g: {"records": n, "seconds": _num(sec)} for g, (n, sec) in sorted(groups.items())},
                    "partitions": partitions, "series": lag_series},
            "feature_latency": {"workers": self.feature_workers, "p50_ms": _num(feat.get("p50")),
                                "p99_ms": _num(feat.get("p99")),
                                "series": [[round(t, 3), _num(a), _num(b)] for t, (a, b) in self.feature_series.items()]},
            "serving": {"requests": self.requests, "fallbacks": self.fallbacks,
                        "p50_ms": _num(minute["p50"]), "p99_ms": _num(minute["p99"]),
                        "fallback_rate": _num(window_rate(self.fallback_ring, now, ALERT_WINDOW_S)),
                        "series": [[round(t, 3), _num(a), _num(b)] for t, (a, b) in self.serving_series.items()],
                        "fallback_series": [[round(t, 3), _num(r)] for t, r in self.fallback_series.items()]},
            "ctr": self.ctr,
            "model": model,
        }


def dashboard_html() -> str:
    """The dashboard page, read from the package (serving/static/dashboard.html)."""
    return files("serving").joinpath("static", "dashboard.html").read_text(encoding="utf-8")


def ops_routes(monitor: OpsMonitor) -> list[Route]:
    page = dashboard_html()   # once per app: a missing file fails at start, not at the first visit

    async def summary(request: Request) -> Response:
        return Response(orjson.dumps(monitor.summary()), media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    async def dashboard(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    return [Route("/api/v1/ops/summary", summary, methods=["GET"]), Route("/dashboard", dashboard, methods=["GET"])]

