"""The on-call dashboard's pure parts (serving/ops.py) and the Prometheus conversions (streams/metrics.py)."""
from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import numpy as np
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():   # the venv pins httpx, which this starlette still supports but warns about
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

from recstream.settings import Settings
from recstream.stats import LatencyHistogram
from serving.ops import OpsMonitor, Ring, alerts, dashboard_html, group_totals, ops_routes, window_percentiles, window_rate
from streams.metrics import ApiMetrics, LagSample, fold_histogram, worker_registry


def test_ring_drops_samples_older_than_its_span():
    ring = Ring(10)
    for t in range(25):
        ring.append(float(t), t)
    assert [t for t, _ in ring.items()] == list(range(14, 25))
    assert ring.latest() == (24.0, 24)
    assert ring.at_or_before(16.5) == (16.0, 16)
    assert ring.at_or_before(3) is None


def _cumulative(ring: Ring, t: float, hist: LatencyHistogram, seconds: list[float]) -> None:
    hist.extend(seconds)
    ring.append(t, hist.counts.copy())


def test_window_percentiles_cover_only_the_window():
    ring, hist = Ring(900), LatencyHistogram()
    _cumulative(ring, -50, hist, [5.0] * 100)        # before the first sample (a worker's history): never counted
    _cumulative(ring, 0, hist, [1.0] * 100)          # slow, long ago
    _cumulative(ring, 100, hist, [0.010] * 100)      # fast, recent
    recent = window_percentiles(ring, 100, 60)
    assert 10 <= recent["p50"] <= 10.5 and 10 <= recent["p99"] <= 10.5
    everything = window_percentiles(ring, 100, 300)   # older than every sample: since the first one
    assert everything["p99"] >= 1000 and everything["p99"] < 5000
    single = Ring(900)
    single.append(0, np.ones(3, dtype=np.int64))
    assert all(math.isnan(v) for v in window_percentiles(single, 0, 60).values())   # one sample: no window


def test_window_percentiles_empty_and_reset():
    assert all(math.isnan(v) for v in window_percentiles(Ring(60), 0, 60).values())
    ring, hist = Ring(900), LatencyHistogram()
    _cumulative(ring, -1, hist, [])
    _cumulative(ring, 0, hist, [0.5] * 10)
    _cumulative(ring, 10, hist, [])                   # nothing new in the window
    assert all(math.isnan(v) for v in window_percentiles(ring, 10, 5).values())
    restarted = LatencyHistogram()
    _cumulative(ring, 20, restarted, [0.002] * 5)    # a restarted worker: counts went down
    assert window_percentiles(ring, 20, 5)["p50"] < 3


def test_window_rate():
    ring = Ring(900)
    ring.append(0, (0, 0))
    ring.append(30, (10, 100))
    ring.append(60, (10, 200))
    assert window_rate(ring, 60, 30) == 0.0
    assert window_rate(ring, 60, 60) == 0.05
    assert math.isnan(window_rate(Ring(5), 0, 5))


def test_alert_rules():
    assert alerts(10.0, 50.0, 10, 50) == []           # at the thresholds: not yet
    assert len(alerts(12.0, 20.0, 10, 50)) == 1 and "behind" in alerts(12.0, 20.0, 10, 50)[0]
    assert len(alerts(0.0, 51.0, 10, 50)) == 1 and "p99" in alerts(0.0, 51.0, 10, 50)[0]
    assert len(alerts(11.0, 60.0, 10, 50)) == 2
    assert alerts(None, math.nan, 10, 50) == []       # unknown: no alert


def test_group_totals_sum_records_and_take_worst_seconds():
    a = LagSample("g", "t1", {0: (5, 2.0), 1: (0, 0.0)})
    b = LagSample("g", "t2", {0: (7, 12.5)})
    c = LagSample("h", "t1", {0: (0, 0.0)})
    assert group_totals([a, b, c]) == {"g": (12, 12.5), "h": (0, 0.0)}


def test_summary_alerts_on_feature_lag_and_serving_p99():
    s = Settings(app_id="app", alert_lag_s=10, alert_p99_ms=50)
    ops = OpsMonitor(s)
    ops.lag["app t"] = LagSample("app", "t", {0: (3, 1.0)})
    ops.lag["app-archive t"] = LagSample("app-archive", "t", {0: (300, 99.0)})   # not the real-time group
    ops.tick(1000.0)
    summary = ops.summary(1000.0)
    assert summary["alert"] == {"active": False, "reasons": []}
    ops.lag["app t"] = LagSample("app", "t", {0: (30, 12.0)})
    assert ops.summary(1000.0)["alert"]["active"]
    ops.lag["app t"] = LagSample("app", "t", {0: (0, 0.0)})
    for _ in range(100):
        ops.observe_request("homepage", 200, 0.080)
    ops.tick(1010.0)
    summary = ops.summary(1010.0)
    assert summary["alert"]["active"] and "p99" in summary["alert"]["reasons"][0]
    assert summary["serving"]["p99_ms"] >= 80 and len(summary["serving"]["series"]) == 2


def test_api_metrics_exposition():
    m = ApiMetrics()
    reply = SimpleNamespace(timings_ms={"retrieval_in": 2.0, "total": 9.0}, experiments={"exp1": "b"})
    m.observe_reply("homepage", "fallback_deadline", reply, 0.05)
    m.observe_cache(True)
    m.requests.labels("homepage", "200").inc()
    m.lag["g t"] = LagSample("g", "t", {3: (42, 7.5)})
    m.model = {"name": "recstream", "version": "7", "published_at": 1.0}
    text = generate_latest(m.registry).decode()
    assert 'recstream_fallbacks_total{reason="deadline"} 1.0' in text
    assert 'recstream_homepage_cache_total{result="hit"} 1.0' in text
    assert 'recstream_experiment_requests_total{experiment="exp1",variant="b"} 1.0' in text
    assert 'recstream_serving_stage_seconds_count{endpoint="homepage",stage="retrieval_in"} 1.0' in text
    assert 'recstream_consumer_lag_records{group="g",partition="3",topic="t"} 42.0' in text
    assert 'recstream_consumer_lag_seconds{group="g",partition="3",topic="t"} 7.5' in text
    assert 'recstream_model_info{name="recstream",version="7"} 1.0' in text
    assert "recstream_model_age_seconds" in text


def test_fold_histogram_is_cumulative_and_never_early():
    h = LatencyHistogram()
    h.extend([0.004] * 3 + [0.030] * 2 + [5000.0])
    buckets, total = fold_histogram(h.counts)
    le = dict(buckets)
    assert le["0.005"] == 3 and le["0.04"] == 5 and le["+Inf"] == 6
    counts = [c for _, c in buckets]
    assert counts == sorted(counts)
    assert total >= 0.004 * 3 + 0.03 * 2


def test_worker_registry_from_snapshot():
    h = LatencyHistogram()
    h.extend([0.02] * 4)
    snap = {"processed": {"view": 5, "click": 2}, "dead_letters": 1, "duplicates": 3, "lag": {"0": 4, "1": 0},
            "event_latency_counts": h.counts.tolist(), "model_version": None, "batch_window_s": 0.25}
    text = generate_latest(worker_registry("features", lambda: snap)).decode()
    assert 'recstream_events_processed_total{kind="all",worker="features"} 7.0' in text
    assert 'recstream_dead_letters_total{worker="features"} 1.0' in text
    assert 'recstream_worker_lag_records{partition="0",worker="features"} 4.0' in text
    assert 'recstream_event_to_feature_seconds_count{worker="features"} 4.0' in text
    assert 'recstream_worker_up{worker="features"} 1.0' in text
    assert 'recstream_feature_batch_window_seconds{worker="features"} 0.25' in text
    empty = generate_latest(worker_registry("archive", lambda: None)).decode()
    assert 'recstream_worker_up{worker="archive"} 0.0' in empty
    assert np.asarray(h.counts).sum() == 4


def test_dashboard_page_is_package_data_served_as_is():
    page = dashboard_html()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    ops = OpsMonitor(Settings())
    with TestClient(Starlette(routes=ops_routes(ops))) as client:
        r = client.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["cache-control"] == "no-store" and r.text == page
