"""Worker processes: run the feature agents until SIGTERM, publishing lag and latency for on-call."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from faust.contrib.asgi import faust_app_running

from agents import features
from recstream.features import keys
from recstream.settings import Settings
from recstream.stats import StallWatch
from streams import lag
from streams.app import create_app
from streams.metrics import METRICS_EVERY_S, METRICS_TTL_S, start_worker_metrics, stop_on_signals
from streams.online_store import open_store
from streams.redisconn import connect
from streams.store import Store
from streams.topics import ensure_topics

if TYPE_CHECKING:   # loaded by the serving processes only: a feature worker needs no model code
    from agents.models import ModelHolder
    from agents.runner import RequestAgent

log = logging.getLogger(__name__)
WATCH_EVERY_S = 10.0


def metrics_key(s: Settings, agent: str) -> str:
    return s.redis_namespace + keys.metrics(agent, socket.gethostname(), os.getpid())


def metrics_index(s: Settings, agent: str) -> str:
    return s.redis_namespace + keys.metrics_index(agent)


def snapshot(app, s: Settings, agents: features.FeatureAgents) -> dict:
    """What on-call reads: consumer lag per partition and event-to-feature latency."""
    st = agents.stats
    topic = s.topic("clickstream")
    lag = {}
    for tp in app.consumer.assignment():
        if tp.topic == topic:
            high = app.consumer.highwater(tp) or 0
            lag[str(tp.partition)] = max(0, high - (st.last_offset.get(tp.partition, -1) + 1)) if high else 0
    return {
        "agent": "update_session_features", "ts": time.time(), "processed": dict(st.processed),
        "duplicates": st.duplicates, "dead_letters": st.dead_letters, "refilled": st.refilled,
        "rerouted": st.rerouted, "recovered_states": st.recovered_states, "batches": st.batches,
        "batch_window_s": st.window_s,
        "erased_dropped": st.erased_dropped, "erasures": st.erasures,
        "items": st.items, "lag": lag, "lag_total": sum(lag.values()),
        "event_latency_ms": st.event_latency.percentiles_ms(), "ingest_latency_ms": st.ingest_latency.percentiles_ms(),
        # cumulative histograms (recstream.stats): subtract two snapshots for a window's percentiles
        "event_latency_counts": st.event_latency.counts.tolist(),
        "ingest_latency_counts": st.ingest_latency.counts.tolist(),
    }


def _collect_less() -> None:
    """A worker's long-lived objects (the app, its tables and clients; a serving model's 100k-item tables)
    move to the permanent generation, and young objects are collected less often: each batch or request
    allocates many short-lived containers, and the default thresholds then walk the whole heap again and
    again (a batch's 1.7M counter entries took 4x longer to lay out for Redis with them)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


STALLED = 3  # exit status of a worker that stopped committing: restart it
CRASHED = 4  # exit status of a worker whose Faust app crashed (it consumes nothing after): restart it


async def run_features(s: Settings, stop: asyncio.Event | None = None, ready: asyncio.Event | None = None) -> int:
    """Run until `stop` (SIGTERM, SIGINT); 0 on a clean stop, STALLED when commits stopped moving,
    CRASHED when the Faust app crashed: it has left its consumer group by then and would otherwise
    sit idle with a running process, its partitions served by others or by no one."""
    stop = stop or stop_on_signals()
    watch = StallWatch(s.worker_stall_timeout_s)
    next_watch = time.monotonic() + WATCH_EVERY_S
    await ensure_topics(s)
    client = connect(s)
    store = open_store(s, client)
    app = create_app(s)
    agents = features.register(app, s, client)
    key = metrics_key(s, "features")
    prom = start_worker_metrics(s.metrics_port, "features")   # Prometheus /metrics (metrics_port 0: off)
    try:
        async with faust_app_running(app):
            log.info("feature worker %s running", s.app_id)
            _collect_less()
            if ready:
                ready.set()
            while not stop.is_set():
                if app.crashed:
                    log.error("the Faust app crashed (%r): exiting for a restart", app.crash_reason)
                    return CRASHED
                try:
                    prom.snapshot = snap = snapshot(app, s, agents)
                    await store.publish_metrics(key, metrics_index(s, "features"), snap, METRICS_TTL_S)
                except Exception as exc:  # metrics must never stop the worker
                    log.warning("metrics not published: %r", exc)
                if time.monotonic() >= next_watch:
                    next_watch = time.monotonic() + WATCH_EVERY_S
                    if await _stalled(app, s, agents, watch):
                        return STALLED
                try:
                    await asyncio.wait_for(stop.wait(), METRICS_EVERY_S)
                except TimeoutError:
                    pass
        return 0
    finally:
        await client.aclose()


async def _stalled(app, s: Settings, agents: features.FeatureAgents, watch: StallWatch) -> bool:
    topic = s.topic("clickstream")
    owned = {tp.partition for tp in app.consumer.assignment() if tp.topic == topic}
    processed = {p: o for p, o in agents.stats.last_offset.items() if p in owned}
    try:
        committed = {x.partition: x.committed for x in await lag.group_lag(s, s.app_id, topic)}
    except Exception as exc:  # the watchdog must not stop the worker on a failed look-up
        log.warning("commit watchdog skipped: %r", exc)
        return False
    stalled = watch.check(committed, processed, time.monotonic())
    if stalled:
        log.error("partitions %s processed up to %s but committed offsets %s have not moved for %.0f s: "
                  "exiting for a restart (faust-streaming #216/#532); the restart reprocesses exactly",
                  stalled, {p: processed[p] for p in stalled}, {p: committed.get(p) for p in stalled},
                  s.worker_stall_timeout_s)
    return bool(stalled)


def _request_agent(s: Settings, role: str, store: Store, models: ModelHolder) -> tuple[str, Any, RequestAgent[Any]]:
    """(consumer group, handler, agent) of a retrieval or ranking process."""
    from agents.runner import RequestAgent
    from schemas import CandidateSet, RecommendationRequest

    if role == "retrieval":
        from agents.retrieval import Retrieval

        retrieval = Retrieval(s, store, models)
        # one consumer group per shard: every request reaches one process of each
        name = s.retrieval_agents()[s.retrieval_shard]
        return name, retrieval, RequestAgent(s, name, s.topic("rec.requests"), RecommendationRequest, retrieval.handle,
                                             lambda r: r.expired(time.time(), 2 * s.serving_reserve_ms),
                                             window_ms=s.retrieval_batch_window_ms)
    from agents.ranking import Ranking

    ranking = Ranking(s, store, models)
    agent = RequestAgent(s, role, s.topic("rec.candidates"), CandidateSet, ranking.handle,
                         lambda c: c.request.expired(time.time(), s.serving_reserve_ms))
    ranking.submit = agent.submit   # a sharded request's merge, after its gather wait
    return role, ranking, agent


async def run_serving(s: Settings, role: str, stop: asyncio.Event | None = None,
                      ready: asyncio.Event | None = None) -> int:
    """Run the retrieval or ranking agent until `stop`, publishing its metrics for on-call."""
    from agents.models import ModelHolder

    stop = stop or stop_on_signals()
    await ensure_topics(s)
    client = connect(s)
    store = open_store(s, client)
    swapped = asyncio.Event()   # a swap is reported at once, not at the next METRICS_EVERY_S
    models = ModelHolder(s, role, on_swap=lambda _: swapped.set())
    name, handler, agent = _request_agent(s, role, store, models)
    key = metrics_key(s, role)
    agent_field = f"{name}:{socket.gethostname()}:{os.getpid()}"
    prom = start_worker_metrics(s.metrics_port, role)   # Prometheus /metrics (metrics_port 0: off)
    await models.start(store.model_pointer)
    # The model and caches are long-lived objects: move what exists to the permanent generation and
    # collect young objects less often, so full collections do not walk 100k-item tables per request.
    _collect_less()
    task = asyncio.create_task(agent.run(stop, ready), name=f"{role}-agent")
    try:
        while not stop.is_set() and not task.done():
            swapped.clear()   # before the snapshot: a swap from here on brings the next one forward
            st = agent.stats
            now, version = time.time(), models.current.version if models.current else None
            snap = {"agent": role, "ts": now, "model_version": version,
                    "swaps": models.swaps, "received": st.received, "handled": st.handled, "expired": st.expired,
                    "dead_letters": st.dead_letters, "errors": st.errors, "batches": st.batches,
                    "handle_latency_ms": st.handle_latency.percentiles_ms(),
                    "handle_latency_counts": st.handle_latency.counts.tolist()}
            if role == "ranking":
                snap |= {"gather_partial": handler.gather.partial, "gather_late": handler.gather.late}
            prom.snapshot = snap
            try:
                await store.publish_metrics(key, metrics_index(s, role), snap, METRICS_TTL_S)
                # the API's readiness and fallback replies read who serves, and on which version
                await store.report_agent(agent_field, now, version)
            except Exception as exc:  # metrics must never stop the worker
                log.warning("metrics not published: %r", exc)
            waiter = asyncio.ensure_future(swapped.wait())
            await asyncio.wait([task, waiter], timeout=METRICS_EVERY_S, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        stop.set()
        await task
        return 0
    finally:
        with contextlib.suppress(Exception):   # a clean stop is gone at once, not after AGENT_FRESH_S
            await store.forget_agent(agent_field)
        handler.close()
        await models.stop()
        await client.aclose()
