"""`recstream lag`: consumer lag of every group, and each worker's published metrics, whatever kind."""
from streams import lag
from streams.attribution_store import AttributionStore
from streams.online_store import open_store
from streams.redisconn import connect
from streams.topics import ensure_topics


async def test_lag_lists_every_group_and_every_kind_of_worker_metrics(fresh, capsys):
    s = fresh()
    await ensure_topics(s)
    client = connect(s)
    ns = s.redis_namespace
    try:
        store = open_store(s, client)   # as the workers publish: the snapshot and its agent's index
        await store.publish_metrics(f"{ns}metrics:features:h:1", f"{ns}metrics-index:features",
                                    {"lag_total": 3, "event_latency_ms": {"p50": None, "p99": None},
                                     "processed": {"view": 2}}, 30)
        await store.publish_metrics(f"{ns}metrics:ranking:h:2", f"{ns}metrics-index:ranking",
                                    {"agent": "ranking", "model_version": "7", "handled": 5, "expired": 1, "errors": 0,
                                     "handle_latency_ms": {"p50": float("nan"), "p99": 2.5}}, 30)
        await AttributionStore(client, ns).publish_metrics(
            f"{ns}metrics:attribution:h:3", f"{ns}metrics-index:attribution",
            {"agent": "attribution", "lag_total": 4, "processed": {"click": 6}, "held": 1}, 30)
        await client.set(f"{ns}metrics:ranking:h:9", b"{}", ex=30)   # in no index: a process of before, not listed
        assert await lag.report(s) == 0
    finally:
        await client.aclose()
    out = capsys.readouterr().out
    for group in (s.app_id, f"{s.app_id}-archive", f"{s.app_id}-retrieval", f"{s.app_id}-ranking"):
        assert f"{group} " in out
    assert "metrics:features:h:1" in out and "lag       3  event->feature p50 - p99 -  processed 2" in out
    assert "lag       4  processed 6  held 1" in out
    assert "model 7  handled 5  expired 1  errors 0  batch p50 - p99 2.5 ms" in out
    assert "h:9" not in out
