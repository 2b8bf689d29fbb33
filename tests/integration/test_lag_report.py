"""`recstream lag`: consumer lag of every group, and each worker's published metrics, whatever kind."""
import orjson
import redis.asyncio as aioredis

from streams import lag
from streams.topics import ensure_topics


async def test_lag_lists_every_group_and_both_kinds_of_worker_metrics(fresh, capsys):
    s = fresh()
    await ensure_topics(s)
    client = aioredis.from_url(s.redis_url)
    try:
        await client.set(f"{s.redis_namespace}metrics:features:h:1", orjson.dumps(
            {"lag_total": 3, "event_latency_ms": {"p50": None, "p99": None}, "processed": {"view": 2}}), ex=30)
        await client.set(f"{s.redis_namespace}metrics:ranking:h:2", orjson.dumps(
            {"agent": "ranking", "model_version": "7", "handled": 5, "expired": 1, "errors": 0,
             "handle_latency_ms": {"p50": float("nan"), "p99": 2.5}}), ex=30)
        assert await lag.report(s) == 0
    finally:
        await client.aclose()
    out = capsys.readouterr().out
    for group in (s.app_id, f"{s.app_id}-archive", f"{s.app_id}-retrieval", f"{s.app_id}-ranking"):
        assert f"{group} " in out
    assert "lag       3  event->feature p50 - p99 -  processed 2" in out       # nothing measured yet: "-"
    assert "model 7  handled 5  expired 1  errors 0  batch p50 - p99 2.5 ms" in out
