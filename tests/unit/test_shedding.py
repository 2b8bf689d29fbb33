"""Load shedding in the API (issue 21, parts 2 and 5): while its event loop runs late, or the real-time
features are behind, a recommendation request is answered from the fallback at once, flagged and saying
why, and the latency metrics count the wait."""
import asyncio
import dataclasses
import time
import warnings

import pytest
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():   # (as tests/unit/test_admin_api.py)
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

import recstream.settings
from serving.ops import LoopLag


def test_loop_lag_is_the_worst_lateness_of_its_window():
    lag = LoopLag(every_s=0.02, window_s=0.5)
    assert lag.current(100.0) == 0.0
    lag.observe(100.0, 0.08)
    assert lag.sustained(100.0) == 0.0            # one firing: a pause, not yet an overload
    lag.observe(100.2, 0.01)
    lag.observe(100.3, -0.001)   # a timer cannot be early: no negative lateness
    assert lag.current(100.3) == 0.08 and lag.latest() == 0.0 and lag.sustained(100.3) == 0.0
    assert lag.current(100.6) == 0.01   # the 0.08 left the window
    lag.observe(101.0, 0.0)
    assert lag.current(101.0) == 0.0 and len(lag.samples) == 1
    lag.observe(101.2, 0.2)
    lag.observe(101.4, 0.15)
    assert lag.sustained(101.4) == 0.0            # (the on-time firing at 101.0 is still in the window)
    lag.observe(101.6, 0.12)
    assert lag.sustained(101.6) == 0.12 and lag.latest() == 0.12 and lag.current(101.6) == 0.2


async def test_loop_lag_sees_a_loop_blocked_by_other_work():
    lag = LoopLag(every_s=0.01, window_s=5.0)
    task = asyncio.create_task(lag.run())
    await asyncio.sleep(0.05)
    time.sleep(0.2)              # the loop busy elsewhere: the timer fires at least this late
    await asyncio.sleep(0.05)
    task.cancel()
    assert lag.current(time.perf_counter()) >= 0.15


def record_requests(app) -> list:
    """The requests that went on to the recommender (its product check, which then fails: a 500)."""
    asked = []

    async def check_products(req):
        asked.append(req)
        raise RuntimeError("the request went on to the recommender")
    app.state.recommender.check_products = check_products
    return asked


@pytest.fixture
def app(tmp_path):
    from serving.app import create_app

    return create_app(dataclasses.replace(recstream.settings.load({}), home_dir=tmp_path, serving_shed_loop_lag_ms=100))


def test_a_late_loop_sheds_requests_to_the_fallback_without_asking_redis_or_the_agents(app):
    asked = record_requests(app)
    client = TestClient(app, raise_server_exceptions=False)   # no lifespan: nothing connects

    now = time.perf_counter()
    app.state.ops.loop_lag.observe(now, 0.3)
    app.state.ops.loop_lag.observe(now, 0.3)      # late twice in a row: sustained
    r = client.get("/api/v1/recommendations/homepage", params={"user_id": "u1", "count": "5"})
    assert r.status_code == 200 and asked == []
    body = r.json()
    assert body["fallback"] is True and body["error"].startswith("overloaded: the API's event loop runs 300 ms late")
    metrics = client.get("/metrics").text
    assert 'recstream_recommendations_total{endpoint="homepage",status="fallback_error"} 1.0' in metrics
    assert "recstream_event_loop_lag_seconds 0.3" in metrics
    # the request's latency counts the wait before its handler: at least the loop's lag
    assert 'recstream_http_request_duration_seconds_bucket{endpoint="homepage",le="0.25"} 0.0' in metrics

    app.state.ops.loop_lag.samples.clear()   # on time again: the request goes on to the recommender
    assert client.get("/api/v1/recommendations/homepage", params={"user_id": "u1"}).status_code == 500
    assert [q.user_id for q in asked] == ["u1"]


def test_shedding_off_with_zero(tmp_path):
    from serving.app import create_app

    app = create_app(dataclasses.replace(recstream.settings.load({}), home_dir=tmp_path, serving_shed_loop_lag_ms=0))
    asked = record_requests(app)
    for _ in range(3):
        app.state.ops.loop_lag.observe(time.perf_counter(), 5.0)
    TestClient(app, raise_server_exceptions=False).get("/api/v1/recommendations/homepage", params={"user_id": "u1"})
    assert len(asked) == 1


def test_one_pause_of_the_loop_sheds_nothing(app):
    asked = record_requests(app)
    now = time.perf_counter()
    app.state.ops.loop_lag.observe(now, 0.5)       # a garbage collection, say: late once, then on time
    app.state.ops.loop_lag.observe(now, 0.0)
    TestClient(app, raise_server_exceptions=False).get("/api/v1/recommendations/homepage", params={"user_id": "u1"})
    assert len(asked) == 1


def test_features_behind_shed_requests_until_they_catch_up(app):
    asked = record_requests(app)
    client = TestClient(app, raise_server_exceptions=False)
    ops = app.state.ops
    assert ops.features_behind_s(time.time()) is None        # never sampled: nothing to go on, serve
    ops.feature_lag = (time.time(), 7.5)                       # the API's lag sampler saw the features 7.5 s behind
    r = client.get("/api/v1/recommendations/homepage", params={"user_id": "u1"})
    assert r.status_code == 200 and asked == []
    assert r.json()["fallback"] is True
    assert r.json()["error"] == "overloaded: the real-time features are 7.5 s behind (shedding above 5 s)"

    ops.feature_lag = (time.time(), 4.0)                       # caught up to under the threshold: served again
    assert client.get("/api/v1/recommendations/homepage", params={"user_id": "u2"}).status_code == 500
    ops.feature_lag = (time.time() - 3 * ops.s.lag_sample_s - 1, 60.0)   # an old sample (Kafka unreachable): served
    assert client.get("/api/v1/recommendations/homepage", params={"user_id": "u3"}).status_code == 500
    assert [q.user_id for q in asked] == ["u2", "u3"]


def test_shed_reason_names_the_first_cause_and_zero_turns_each_off():
    from serving.recommend import shed_reason

    s = dataclasses.replace(recstream.settings.load({}), serving_shed_loop_lag_ms=100, serving_shed_feature_lag_s=5)
    assert shed_reason(s, 0.0, None) is None and shed_reason(s, 0.1, 5.0) is None   # at the thresholds: served
    assert shed_reason(s, 0.25, 9.0).startswith("overloaded: the API's event loop runs 250 ms late")
    assert shed_reason(s, 0.0, 9.0).startswith("overloaded: the real-time features are 9.0 s behind")
    off = dataclasses.replace(s, serving_shed_loop_lag_ms=0, serving_shed_feature_lag_s=0)
    assert shed_reason(off, 5.0, 600.0) is None
    with pytest.raises(recstream.settings.SettingsError, match="SERVING_SHED_FEATURE_LAG_S"):
        recstream.settings.load({"RECSTREAM_SERVING_SHED_FEATURE_LAG_S": "-1"})
