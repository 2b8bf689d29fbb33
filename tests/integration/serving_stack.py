"""The whole serving path as separate processes, for tests/integration/test_serving.py: the feature
worker, the retrieval and ranking agents and the HTTP API, each a `recstream` subprocess configured
by the RECSTREAM_* variables of one Settings object (cli/processes.py starts them)."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from pathlib import Path

import httpx

from cli.processes import Processes, free_port  # noqa: F401  (the tests import them from here)
from recstream.data import Dataset, ShopConfig, shop_dataset
from recstream.settings import Settings
from streams.online_store import RedisStore
from tests.integration import namespaces


def small_deployment(stack: Settings, home: Path, name: str, deadline_ms: int, **extra) -> Settings:
    """Settings of a test's own serving deployment: its topics, consumer group, Redis namespace and
    model name, a tiny ALS and ranker on local Spark, the test's serving deadline. The namespace is
    removed at the end of the session (tests/integration/namespaces.py), or earlier by its fixture."""
    s = namespaces.make(
        stack, clickstream_partitions=4, home_dir=home, als_rank=8, als_iterations=3, ranker_trees=20, ranker_depth=4,
        spark_master="local[2]", spark_driver_memory="1g", serving_deadline_ms=deadline_ms,
        experiments_file=home / "experiments.toml", **extra)
    return dataclasses.replace(s, model_name=f"test-{name}-{s.topic_prefix[1:]}")   # the namespace's tag


async def wait_for(cond, timeout_s: float, what: str, interval_s: float = 0.1, check=None):
    """Poll the async `cond` until it returns something truthy; fail naming `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = await cond()
        if got:
            return got
        if check:
            check()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def get_json(client: httpx.AsyncClient, path: str, **params) -> tuple[httpx.Response, dict, float]:
    """GET path?params: the response, its JSON body and the seconds it took."""
    t = time.perf_counter()
    r = await client.get(path, params=params)
    return r, r.json(), time.perf_counter() - t


async def trained_shop(s: Settings, cfg: ShopConfig, procs: Processes, store: RedisStore):
    """A generated shop through a feature worker (`procs`' "features") while a model trains on the same
    shop; returns (the dataset, the training report) once the model is published and every event is
    applied in Redis."""
    from batch.publish import current
    from batch.train import Source, train_once
    from streams.replay import publish_dataset

    data = shop_dataset(cfg)
    procs.start("features")
    training = asyncio.ensure_future(asyncio.to_thread(train_once, s, Source(dataset="shop", shop=cfg),
                                                       lambda _: None))
    try:
        await publish_dataset(s, data, progress=False)
        report = await training
    finally:
        if not training.done():   # a thread cannot be cancelled: let it end before the stack goes
            await asyncio.wait([training])
    assert (await current(s))["version"] == report.version

    async def all_in():
        applied = await store.applied_offsets(range(s.clickstream_partitions))
        return sum(v + 1 for v in applied.values()) == len(data.events)
    await wait_for(all_in, 120, "the shop's events in Redis", check=lambda: procs.check_alive("features"))
    return data, report


def request_cases(data: Dataset) -> list[tuple[str, dict, set[str]]]:
    """(API path, parameters, products that must not be recommended) over a shop: 20 users' homepages
    and an anonymous one, similar and also-viewed for the 6 most viewed products, carts of bestsellers."""
    views = Counter(e.product_id for e in data.events if e.event_type == "view")
    bought = [p for p, _ in Counter(e.product_id for e in data.events if e.event_type == "purchase").most_common(6)]
    users = sorted({e.user_id for e in data.events})
    top = [p for p, _ in views.most_common(6)]
    cases = [("homepage", {"user_id": u}, set()) for u in users[:20]] + [("homepage", {}, set())]
    cases += [(kind, {"product_id": p}, {p}) for p in top for kind in ("similar", "also-viewed")]
    cases += [("cart", {"cart_items": f"{a},{b}"}, {a, b}) for a, b in zip(bought[::2], bought[1::2])]
    return cases
