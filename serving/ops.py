"""On-call: GET /dashboard (one self-contained HTML page, charts drawn by hand on <canvas>) and
GET /api/v1/ops/summary (the JSON it polls every 2 s), from the API process itself.

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
from typing import Any, Callable, Iterable

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from recstream.features import keys
from recstream.features.keys import MODEL_CURRENT
from streams.metrics import METRICS_TTL_S, ApiMetrics, LagSample, LagSampler, cancelling, sample_forever
from streams.redisconn import is_cluster
from recstream.settings import Settings
from recstream.stats import BUCKETS, LatencyHistogram, percentiles_ms

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
        self._tasks: list[asyncio.Task] = []
        self.started_at = time.time()

    def groups(self) -> list[tuple[str, str]]:
        return self.s.consumer_groups()

    # -- recording (called per request) --
    def observe_request(self, endpoint: str, code: int, seconds: float) -> None:
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
        self.lag_series.append(time.time(), group_totals(self.lag.values()))

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
        from streams.attribution import read_totals

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


def ops_routes(monitor: OpsMonitor) -> list[Route]:
    async def summary(request: Request) -> Response:
        return Response(orjson.dumps(monitor.summary()), media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    async def dashboard(request: Request) -> Response:
        return HTMLResponse(DASHBOARD_HTML, headers={"Cache-Control": "no-store"})

    return [Route("/api/v1/ops/summary", summary, methods=["GET"]), Route("/dashboard", dashboard, methods=["GET"])]


DASHBOARD_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>recstream on-call</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>
body{font:14px system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{padding:10px 16px;background:#1f2937;color:#fff;display:flex;justify-content:space-between;align-items:center}
#alert{padding:10px 16px;font-weight:600;background:#1f9d55;color:#fff}
#alert.on{background:#d32f2f}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:12px;padding:12px}
section{background:#fff;border-radius:6px;padding:10px 12px;box-shadow:0 1px 2px #0002}
h2{font-size:14px;margin:0 0 6px}
.value{font-size:13px;color:#555;min-height:18px}
canvas{width:100%;height:180px;display:block}
.big{font-size:26px;font-weight:600}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:2px 6px;border-bottom:1px solid #eee}
.legend span{display:inline-block;margin-right:10px;font-size:12px}
</style></head><body>
<header><span><b>recstream</b> on-call</span><span id="updated">waiting for data</span></header>
<div id="alert" data-active="unknown">alert state: waiting for data</div>
<main>
<section><h2>Consumer lag per group (records)</h2><div class="value" id="lag-records-value"></div>
<canvas id="lag-records" data-points="0"></canvas><div class="legend" id="lag-records-legend"></div></section>
<section><h2>Consumer lag per group (seconds)</h2><div class="value" id="lag-seconds-value"></div>
<canvas id="lag-seconds" data-points="0"></canvas><div class="legend" id="lag-seconds-legend"></div></section>
<section><h2>Event-to-feature latency (ms, p50 / p99)</h2><div class="value" id="feature-latency-value"></div>
<canvas id="feature-latency" data-points="0"></canvas></section>
<section><h2>Serving latency (ms, p50 / p99)</h2><div class="value" id="serving-latency-value"></div>
<canvas id="serving-latency" data-points="0"></canvas></section>
<section><h2>Fallback rate (%)</h2><div class="value" id="fallback-value"></div>
<canvas id="fallback" data-points="0"></canvas></section>
<section><h2>Model</h2><div class="big" id="model-version">-</div><div class="value" id="model-age"></div>
<h2 style="margin-top:14px">CTR by variant</h2><div id="ctr"><div class="value">no experiment data</div></div></section>
</main>
<script>
"use strict";
const COLORS = ["#2563eb","#dc2626","#16a34a","#9333ea","#ea580c","#0891b2","#4b5563"];
window.__ops = {summary: null, polls: 0, errors: 0};
function fmt(v, d){ return (v === null || v === undefined) ? "-" : Number(v).toFixed(d === undefined ? 1 : d); }
function draw(id, series, opts){
  // series: [{name, points: [[t, v], ...]}]; nulls are gaps; opts.threshold draws a dashed red line
  const c = document.getElementById(id), dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth, h = c.clientHeight; c.width = w * dpr; c.height = h * dpr;
  const g = c.getContext("2d"); g.scale(dpr, dpr); g.clearRect(0, 0, w, h);
  const pad = {l: 52, r: 8, t: 8, b: 20};
  let t0 = Infinity, t1 = -Infinity, vmax = 0, n = 0;
  for (const s of series) for (const [t, v] of s.points) { if (v === null) continue;
    t0 = Math.min(t0, t); t1 = Math.max(t1, t); vmax = Math.max(vmax, v); n++; }
  // the threshold line is drawn when within reach of the data (a far one would flatten the chart)
  const limit = (opts && opts.threshold && opts.threshold <= Math.max(vmax * 5, 100)) ? opts.threshold : null;
  if (limit !== null) vmax = Math.max(vmax, limit * 1.2);
  c.dataset.points = String(n);
  g.strokeStyle = "#ccc"; g.lineWidth = 1; g.strokeRect(pad.l, pad.t, w - pad.l - pad.r, h - pad.t - pad.b);
  if (!n) { g.fillStyle = "#999"; g.fillText("no data yet", pad.l + 10, pad.t + 20); return; }
  if (vmax <= 0) vmax = 1;
  if (t1 === t0) t0 = t1 - 1;
  const x = t => pad.l + (t - t0) / (t1 - t0) * (w - pad.l - pad.r);
  const y = v => h - pad.b - v / vmax * (h - pad.t - pad.b);
  g.fillStyle = "#666"; g.font = "11px system-ui";
  for (let i = 0; i <= 4; i++) { const v = vmax * i / 4; g.fillText(fmt(v, vmax < 10 ? 2 : 0), 4, y(v) + 4);
    g.strokeStyle = "#f0f0f0"; g.beginPath(); g.moveTo(pad.l, y(v)); g.lineTo(w - pad.r, y(v)); g.stroke(); }
  g.fillText(new Date(t0 * 1000).toLocaleTimeString(), pad.l, h - 5);
  g.fillText(new Date(t1 * 1000).toLocaleTimeString(), w - pad.r - 60, h - 5);
  if (limit !== null) { g.strokeStyle = "#d32f2f"; g.setLineDash([5, 4]); g.beginPath();
    g.moveTo(pad.l, y(limit)); g.lineTo(w - pad.r, y(limit)); g.stroke(); g.setLineDash([]); }
  series.forEach((s, i) => { g.strokeStyle = s.color || COLORS[i % COLORS.length]; g.lineWidth = 2; g.beginPath();
    let pen = false; for (const [t, v] of s.points) { if (v === null) { pen = false; continue; }
      if (pen) g.lineTo(x(t), y(v)); else { g.moveTo(x(t), y(v)); pen = true; } }
    g.stroke();
    g.fillStyle = g.strokeStyle; for (const [t, v] of s.points) if (v !== null) g.fillRect(x(t) - 1.5, y(v) - 1.5, 3, 3); });
}
function legend(id, names){ document.getElementById(id).innerHTML = names.map((n, i) =>
  `<span style="color:${COLORS[i % COLORS.length]}">&#9632; ${n}</span>`).join(""); }
function render(s){
  const a = document.getElementById("alert");
  a.className = s.alert.active ? "on" : ""; a.dataset.active = String(s.alert.active);
  a.textContent = s.alert.active ? "ALERT: " + s.alert.reasons.join("; ")
    : `OK: feature consumer under ${s.thresholds.lag_s} s behind, serving p99 under ${s.thresholds.p99_ms} ms`;
  const groups = Object.keys(s.lag.series).sort();
  draw("lag-records", groups.map(g => ({name: g, points: s.lag.series[g].map(p => [p[0], p[1]])})));
  draw("lag-seconds", groups.map(g => ({name: g, points: s.lag.series[g].map(p => [p[0], p[2]])})),
       {threshold: s.thresholds.lag_s});
  legend("lag-records-legend", groups); legend("lag-seconds-legend", groups);
  const fg = s.lag.groups[s.lag.feature_group];
  document.getElementById("lag-records-value").textContent = Object.entries(s.lag.groups)
    .map(([g, v]) => `${g}: ${v.records}`).join("  ") || "no sample yet";
  document.getElementById("lag-seconds-value").textContent = fg
    ? `feature group ${s.lag.feature_group}: ${fmt(fg.seconds)} s behind (${fg.records} records)` : "no sample yet";
  const fl = s.feature_latency;
  draw("feature-latency", [{name: "p50", points: fl.series.map(p => [p[0], p[1]])},
                           {name: "p99", points: fl.series.map(p => [p[0], p[2]])}]);
  document.getElementById("feature-latency-value").textContent =
    `last minute p50 ${fmt(fl.p50_ms)} ms, p99 ${fmt(fl.p99_ms)} ms (${fl.workers} worker(s))`;
  const sv = s.serving;
  draw("serving-latency", [{name: "p50", points: sv.series.map(p => [p[0], p[1]])},
                           {name: "p99", points: sv.series.map(p => [p[0], p[2]])}], {threshold: s.thresholds.p99_ms});
  document.getElementById("serving-latency-value").textContent =
    `last minute p50 ${fmt(sv.p50_ms)} ms, p99 ${fmt(sv.p99_ms)} ms; ${sv.requests} requests`;
  draw("fallback", [{name: "fallback %", points: sv.fallback_series.map(p => [p[0], p[1] === null ? null : p[1] * 100])}]);
  document.getElementById("fallback-value").textContent = sv.fallback_rate === null ? "no requests in the last minute"
    : `last minute ${fmt(sv.fallback_rate * 100, 2)} % (${sv.fallbacks} fallbacks in ${sv.requests} requests)`;
  const m = s.model;
  document.getElementById("model-version").textContent = m ? `${m.name} v${m.version}` : "no model published";
  document.getElementById("model-age").textContent = m ? `age ${fmt(m.age_s, 0)} s (published ${new Date(m.published_at * 1000).toLocaleString()})` : "";
  const rows = [];
  for (const [exp, variants] of Object.entries(s.ctr)) for (const [v, t] of Object.entries(variants))
    rows.push(`<tr><td>${exp}</td><td>${v}</td><td>${t.ctr === null ? "-" : (t.ctr * 100).toFixed(2) + " %"}</td><td>${t.impressions}</td></tr>`);
  document.getElementById("ctr").innerHTML = rows.length
    ? `<table><tr><th>experiment</th><th>variant</th><th>CTR</th><th>impressions</th></tr>${rows.join("")}</table>`
    : `<div class="value">no experiment data</div>`;
  document.getElementById("updated").textContent = "updated " + new Date(s.ts * 1000).toLocaleTimeString();
}
async function poll(){
  try { const r = await fetch("/api/v1/ops/summary", {cache: "no-store"}); const s = await r.json();
        window.__ops.summary = s; window.__ops.polls++; render(s); }
  catch (e) { window.__ops.errors++; document.getElementById("updated").textContent = "update failed: " + e; }
}
poll(); setInterval(poll, 2000);
</script></body></html>
"""
