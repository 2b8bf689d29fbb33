"""The on-call dashboard in a real browser: Debian's headless Chromium driven by Playwright opens
GET /dashboard of a running stack (feature worker, retrieval and ranking agents, API, trained model:
test_serving's `served` fixture) while requests and events flow, waits until every chart has drawn
points from live data, checks the panels' values, saves a screenshot (the test's tmp dir; also to the
path in DASHBOARD_SCREENSHOT when set, e.g. bench/results/dashboard.png to re-record it: a plain test
run leaves the checkout as it was), then stops the feature worker while events keep coming and checks the
alert banner turns on once the real-time consumer is more than 10 s behind.

No browser is downloaded: a missing /usr/bin/chromium fails the test (never skips)."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest

from recstream.settings import Settings
from tests.integration.serving_stack import Processes, free_port, wait_for
from tests.integration.test_serving import API, AUTH, _experiment, served  # noqa: F401  (the stack fixture)

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = os.environ.get("DASHBOARD_SCREENSHOT")   # where else to keep the screenshot (re-recording it)
CHARTS = ("lag-records", "lag-seconds", "feature-latency", "serving-latency", "fallback")
EXPERIMENT = "dash-ctr"


@pytest.fixture(scope="module")
def stack(stack: Settings) -> Settings:
    """The session's stack with fast dashboard sampling. The p99 rule is set out of reach: serving on
    this 2-core box shares the cores with Kafka, Redis and the test, so the banner must turn on for
    the lag rule alone (the p99 rule is unit-tested in tests/unit/test_ops.py)."""
    return dataclasses.replace(stack, ops_sample_s=1.0, lag_sample_s=1.0, alert_p99_ms=60_000.0, alert_lag_s=10.0)


async def _traffic(srv, stop: asyncio.Event, counts: dict) -> None:
    """Recommendations and clickstream events, a few per second, until `stop`; a third of the homepage
    lists get a click on their first item, citing the request (attributed to the experiment's variant)."""
    rng = random.Random(7)
    users = sorted({e.user_id for e in srv.data.events})
    products = [p.product_id for p in srv.data.products]
    async with httpx.AsyncClient(base_url=srv.procs.base_url, timeout=10) as http:
        while not stop.is_set():
            user, product = rng.choice(users), rng.choice(products)
            try:
                home = (await http.get(f"{API}/homepage", params={"user_id": user})).json()
                await http.get(f"{API}/similar", params={"product_id": product})
                events = [{"event_id": uuid.uuid4().hex, "user_id": user, "session_id": f"dash-{user}",
                           "product_id": product, "event_type": "view", "timestamp": time.time()}]
                if home.get("items") and rng.random() < 0.33:
                    events.append({"event_id": uuid.uuid4().hex, "user_id": user, "session_id": f"dash-{user}",
                                   "product_id": home["items"][0]["product_id"], "event_type": "click",
                                   "timestamp": time.time(), "rec_request_id": home["request_id"]})
                r = await http.post("/api/v1/events", json=events)
                counts["events"] += len(events) if r.status_code == 202 else 0
                counts["requests"] += 2
            except httpx.TransportError:
                counts["errors"] += 1
            await asyncio.sleep(0.2)


@pytest.mark.timeout(900)
async def test_dashboard_draws_live_charts_and_raises_the_lag_alert(served, tmp_path):  # noqa: F811
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: install Debian's chromium package (no browser downloads)"
    from playwright.async_api import TimeoutError as PlaywrightTimeout
    from playwright.async_api import async_playwright

    srv = served
    # a running experiment and the attribution worker: the CTR panel shows its variants
    r = await srv.http.put(f"/api/v1/admin/experiments/{EXPERIMENT}", headers=AUTH,
                           json=_experiment(EXPERIMENT, "rules", strict={"max_per_category": 1}))
    assert r.status_code == 201, r.text
    srv.procs.start("attribution")
    stop = asyncio.Event()
    counts = {"events": 0, "requests": 0, "errors": 0}
    traffic = asyncio.create_task(_traffic(srv, stop, counts))
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                await page.goto(f"{srv.procs.base_url}/dashboard")
                # every chart drawn from live data (points, not "no data yet"), the model known
                try:
                    await page.wait_for_function(
                        """charts => window.__ops.summary !== null && window.__ops.summary.model !== null
                           && charts.every(id => Number(document.getElementById(id).dataset.points) >= 3)""",
                        arg=list(CHARTS), timeout=90_000, polling=500)
                except PlaywrightTimeout:
                    drawn = {c: await page.get_attribute(f"#{c}", "data-points") for c in CHARTS}
                    last = await page.evaluate("JSON.stringify(window.__ops.summary)")
                    raise AssertionError(f"charts not drawn from live data: {drawn}\nsummary: {(last or '')[:3000]}") from None
                summary = await page.evaluate("window.__ops.summary")
                points = {c: int(await page.get_attribute(f"#{c}", "data-points")) for c in CHARTS}
                assert all(n >= 3 for n in points.values()), points
                # lag: the feature group is sampled, in records and seconds, and keeps up
                group = srv.s.app_id
                assert group in summary["lag"]["groups"] and group in summary["lag"]["series"]
                assert summary["lag"]["groups"][group]["seconds"] < 10
                assert len(summary["lag"]["partitions"][group]) == srv.s.clickstream_partitions
                # event-to-feature latency from the feature worker's snapshots
                assert summary["feature_latency"]["workers"] == 1
                # of the events posted now (the replayed shop's old event times are before the window)
                assert 0 < summary["feature_latency"]["p50_ms"] < 5000, summary["feature_latency"]
                # serving latency and fallback rate from the API's own histograms
                assert summary["serving"]["requests"] > 0 and summary["serving"]["p99_ms"] > 0
                assert summary["serving"]["fallback_rate"] is not None and 0 <= summary["serving"]["fallback_rate"] <= 1
                # the model panel names the trained version and its age
                assert summary["model"]["version"] == srv.version and summary["model"]["age_s"] >= 0
                assert srv.version in await page.inner_text("#model-version")
                assert "age" in await page.inner_text("#model-age")
                assert "p99" in await page.inner_text("#serving-latency-value")
                assert "%" in await page.inner_text("#fallback-value")
                assert await page.get_attribute("#alert", "data-active") == "false"
                assert summary["alert"] == {"active": False, "reasons": []}
                # CTR by variant of the running experiment, attributed from the clicks
                try:
                    await page.wait_for_function(
                        """e => { const v = (window.__ops.summary.ctr || {})[e] || {};
                                  return Object.values(v).filter(t => t.impressions > 0).length === 2
                                         && Object.values(v).some(t => t.ctr > 0); }""",
                        arg=EXPERIMENT, timeout=60_000, polling=500)
                except PlaywrightTimeout:
                    last = await page.evaluate("JSON.stringify(window.__ops.summary.ctr)")
                    raise AssertionError(f"no CTR by variant for {EXPERIMENT}: {last}\n{srv.procs.tail('attribution')}") from None
                ctr_text = await page.inner_text("#ctr")
                assert EXPERIMENT in ctr_text and "control" in ctr_text and "strict" in ctr_text, ctr_text
                # the charts refresh live: more points a few polls later
                before = points["serving-latency"]
                await page.wait_for_function(
                    "n => Number(document.getElementById('serving-latency').dataset.points) > n",
                    arg=before, timeout=15_000)
                shot = tmp_path / "dashboard.png"
                await page.screenshot(path=str(shot), full_page=True)
                if SCREENSHOT:
                    Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(shot, SCREENSHOT)
                assert shot.stat().st_size > 10_000

                # the real condition: the real-time consumer stops while events keep coming
                srv.procs.procs["features"].terminate()
                srv.procs.procs["features"].wait(timeout=30)
                stopped = time.monotonic()
                await page.wait_for_function("document.getElementById('alert').dataset.active === 'true'",
                                             timeout=45_000, polling=500)
                waited = time.monotonic() - stopped
                assert waited >= 8, f"alert after {waited:.1f} s: before the feature group could be 10 s behind"
                text = await page.inner_text("#alert")
                assert "ALERT" in text and "behind" in text, text
                assert "on" in (await page.get_attribute("#alert", "class") or "")
                summary = await page.evaluate("window.__ops.summary")
                assert summary["alert"]["active"] and summary["lag"]["groups"][group]["seconds"] > 10
                await page.screenshot(path=str(tmp_path / "dashboard-alert.png"), full_page=True)

                # back to normal once the worker is back and has caught up
                srv.procs.start("features")
                await page.wait_for_function("document.getElementById('alert').dataset.active === 'false'",
                                             timeout=120_000, polling=1000)
            finally:
                await browser.close()
    finally:
        stop.set()
        await traffic
        if not srv.procs.alive("features"):
            srv.procs.start("features")
        if srv.procs.alive("attribution"):   # one per deployment: the worker test below starts its own
            srv.procs.procs["attribution"].terminate()
            srv.procs.procs["attribution"].wait(timeout=30)
        await srv.http.delete(f"/api/v1/admin/experiments/{EXPERIMENT}", headers=AUTH)
    assert counts["events"] > 0 and counts["errors"] == 0, counts


async def test_prometheus_metrics_of_the_api(served):  # noqa: F811
    """GET /metrics: the API's request, fallback, lag and model metrics in Prometheus text format."""
    srv = served
    await srv.ask("homepage", user_id=srv.user)

    async def lag_sampled():
        r = await srv.http.get("/metrics")
        return r if 'recstream_consumer_lag_seconds{group="' + srv.s.app_id + '"' in r.text else None
    r = await wait_for(lag_sampled, 30, "consumer lag in /metrics", interval_s=0.5)
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("recstream_http_requests_total", "recstream_http_request_duration_seconds_bucket",
                 "recstream_serving_stage_seconds_bucket", "recstream_fallbacks_total", "recstream_homepage_cache_total",
                 "recstream_late_replies_total", "recstream_exposures_total", "recstream_consumer_lag_records",
                 f'recstream_model_info{{name="{srv.s.model_name}",version="{srv.version}"}}',
                 "recstream_model_age_seconds"):
        assert name in text, name
    assert 'recstream_http_requests_total{endpoint="homepage",status="200"}' in text


@pytest.mark.parametrize("worker", ["archive", "attribution"])
async def test_worker_serves_prometheus_metrics_on_its_port(served, worker, tmp_path):  # noqa: F811
    """RECSTREAM_METRICS_PORT: a worker serves /metrics from its own registry."""
    port = free_port()
    procs = Processes(dataclasses.replace(served.s, metrics_port=port), tmp_path)
    procs.start(worker)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            async def scraped():
                try:
                    r = await http.get(f"http://127.0.0.1:{port}/metrics")
                except httpx.TransportError:
                    return None
                return r if f'recstream_worker_up{{worker="{worker}"}} 1.0' in r.text else None
            r = await wait_for(scraped, 60, f"{worker} /metrics", interval_s=0.5, check=lambda: procs.check_alive(worker))
        assert f'recstream_events_processed_total{{kind="all",worker="{worker}"}}' in r.text
        assert f'recstream_dead_letters_total{{worker="{worker}"}}' in r.text
    finally:
        procs.stop_all()
