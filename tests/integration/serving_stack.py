"""The whole serving path as separate processes, for tests/integration/test_serving.py: the feature
worker, the retrieval and ranking agents and the HTTP API, each a `recstream` subprocess configured
by the RECSTREAM_* variables of one Settings object."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from recstream.data import Dataset, ShopConfig, shop_dataset
from recstream.settings import PREFIX, Settings
from streams.online_store import RedisStore

RECSTREAM = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "recstream"
REPO = Path(__file__).resolve().parents[2]


def settings_env(s: Settings) -> dict[str, str]:
    """os.environ without its RECSTREAM_* variables, plus every field of `s` as one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    for f in dataclasses.fields(Settings):
        env[PREFIX + f.name.upper()] = str(getattr(s, f.name))
    return env


def small_deployment(stack: Settings, home: Path, name: str, deadline_ms: int, **extra) -> Settings:
    """Settings of a test's own serving deployment: its topics, consumer group, Redis namespace and
    model name, a tiny ALS and ranker on local Spark, the test's serving deadline."""
    tag = uuid.uuid4().hex[:10]
    return dataclasses.replace(
        stack, topic_prefix=f"t{tag}", app_id=f"recstream-test-{tag}", clickstream_partitions=4,
        redis_namespace=f"t{tag}:", home_dir=home, model_name=f"test-{name}-{tag}", als_rank=8, als_iterations=3,
        ranker_trees=20, ranker_depth=4, spark_master="local[2]", spark_driver_memory="1g",
        serving_deadline_ms=deadline_ms, experiments_file=home / "experiments.toml", **extra)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Processes:
    """Named subprocesses with their logs; `stop_all` ends every one still running (SIGTERM, then SIGKILL)."""
    s: Settings
    logs: Path
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _files: list = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, name: str) -> list[str]:
        if name == "api":
            return [str(RECSTREAM), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        return [str(RECSTREAM), "worker", name]

    def start(self, name: str, role: str | None = None, **overrides) -> subprocess.Popen:
        """Start `name`, running `role` (the process kind: a worker role or "api"; by default the name
        itself), so several processes of one kind can run side by side ("features", "features-2"),
        with the deployment's settings less `overrides` (a retrieval shard: retrieval_shard=1)."""
        assert name not in self.procs or self.procs[name].poll() is not None, f"{name} is running"
        log = open(self.logs / f"{name}.log", "ab")
        self._files.append(log)
        env = settings_env(dataclasses.replace(self.s, **overrides))
        proc = subprocess.Popen(self.command(role or name), cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL: no goodbye to the consumer group, no flush."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def alive(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

    def tail(self, name: str, n: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def check_alive(self, *names: str) -> None:
        for name in names or tuple(self.procs):
            assert self.alive(name), f"{name} exited with {self.procs[name].poll()}:\n{self.tail(name)}"

    def stop_all(self, timeout_s: float = 20) -> None:
        running = [p for p in self.procs.values() if p.poll() is None]
        for p in running:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in running:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for f in self._files:
            f.close()
        self._files.clear()


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
