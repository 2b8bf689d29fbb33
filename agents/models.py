"""The serving agents' model: loaded from the MLflow registry, swapped whole when a new version is announced.

A `ServingModel` is immutable. Each batch of requests takes the current one once, at its start, and
finishes on it; a new version is downloaded and loaded in a thread while the old one keeps
serving, then one assignment makes it current (blue-green within the process). The version before
stays loaded, so candidates retrieved on it are ranked on it too (publish keeps its Redis keys).

Start-up: the version the model pointer in Redis (`model:{g}:current`) names (what the trainer last published). Then
every message on the model-updates topic. Until a model loads (none trained yet, MLflow down), the
agents serve with rules only and retry every `model_retry_s`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import xgboost as xgb
from aiokafka import AIOKafkaConsumer, TopicPartition

from models import booster
from models.artifacts import neighbour_columns
from models.content import ContentModel
from models.index import RetrievalIndex, ShardedIndex, load_index
from recstream.candidates import ItemLists
from recstream.ranking import FEATURE_NAMES
from recstream.settings import Settings

log = logging.getLogger(__name__)
ALIAS_TTL_S = 60.0      # an A/B variant's ranker alias is resolved again after this long (and a failed load retried)
MAX_EXTRA_MODELS = 2    # A/B rankers kept loaded besides the current and previous version


@dataclass(frozen=True)
class ServingModel:
    version: str
    index: RetrievalIndex | ShardedIndex | None = None   # retrieval: FAISS over item vectors (ALS + content
    #                                                      cold start); this worker's shard, when sharded
    content: ContentModel | None = None        # retrieval: embeddings of products newer than the model
    knn: ItemLists | None = None               # retrieval: item kNN lists (the "knn" source)
    booster: xgb.Booster | None = None         # ranking
    item_row: dict[str, int] | None = None     # ranking: ALS item id -> row of item_vectors
    item_vectors: np.ndarray | None = None     # ranking: ALS item vectors, what the ranker trained on
    item_popularity: np.ndarray | None = None  # ranking: weighted events over the training window, by row
    orderings: Mapping[str, str] = field(default_factory=dict)   # ranking: task -> ordering (recstream.ordering)
    task_boosters: Mapping[str, xgb.Booster] = field(default_factory=dict)   # ranking: a task's own ranker

    def booster_for(self, task: str) -> xgb.Booster | None:
        """The ranker of a task (recstream.ordering): its own where the version has one, else the general one."""
        return self.task_boosters.get(task, self.booster)

    def item_embeddings(self, ids: list[str]) -> np.ndarray | None:
        """(len(ids), rank) float32 with NaN rows for items without an ALS vector."""
        if self.item_vectors is None or self.item_row is None:
            return None
        get = self.item_row.get
        rows = np.fromiter((get(x, -1) for x in ids), np.int64, len(ids))
        out = self.item_vectors[np.maximum(rows, 0)]          # a copy (fancy indexing)
        out[rows < 0] = np.nan
        return out

    def window_popularity(self, ids: list[str]) -> np.ndarray | None:
        """Weighted events over the training window per item (0 for an item the window did not see);
        None for a version trained before it was carried."""
        if self.item_popularity is None or self.item_row is None:
            return None
        get = self.item_row.get
        rows = np.fromiter((get(x, -1) for x in ids), np.int64, len(ids))
        return np.where(rows < 0, 0.0, self.item_popularity[np.maximum(rows, 0)])


def load_bundle(folder: Path, version: str, role: str, threads: int, shard: int = 0, shards: int = 1) -> ServingModel:
    """role 'retrieval' loads the index (the shard it serves of `shards`, models.index.load_index) and the
    content model; 'ranking' the booster and ALS item vectors."""
    if role == "retrieval":
        content = folder / "content.npz"
        return ServingModel(version, index=load_index(folder, shard, shards),
                            content=ContentModel.from_bytes(content.read_bytes()) if content.exists() else None,
                            knn=ItemLists.from_columns(*neighbour_columns(folder / "batch", "knn")) if shard == 0 else None)
    names = json.loads((folder / "features.json").read_text())
    if names != list(FEATURE_NAMES):
        raise ValueError(f"version {version} was trained on other features than this code builds "
                         f"({len(names)} vs {len(FEATURE_NAMES)}); deploy the code it was trained with")
    ids = json.loads((folder / "batch" / "items.ids.json").read_text())
    chosen = folder / "orderings.json"   # absent in versions trained before per-task orderings: the ranker serves all
    popular = folder / "batch" / "items.popularity.npy"
    return ServingModel(version, booster=booster.load((folder / "ranker.ubj").read_bytes(), threads),
                        item_row={x: i for i, x in enumerate(ids)},
                        item_vectors=np.load(folder / "batch" / "items.npy"),
                        item_popularity=np.load(popular) if popular.exists() else None,
                        orderings=json.loads(chosen.read_text()) if chosen.exists() else {},
                        task_boosters={f.stem.split("-", 1)[1]: booster.load(f.read_bytes(), threads)
                                       for f in folder.glob("ranker-*.ubj")})


def _lowest_priority() -> None:
    """Nice 19 for the calling thread (Linux schedules threads individually)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class ModelHolder:
    """The current and previous model of one agent, kept up to date from the registry."""

    def __init__(self, s: Settings, role: str, on_swap: Callable[[ServingModel], None] | None = None):
        self.s, self.role, self.on_swap = s, role, on_swap
        self.current: ServingModel | None = None
        self.previous: ServingModel | None = None
        self._tasks: list[asyncio.Task] = []
        self._loading: str | None = None
        # loads run in a thread of their own at the lowest CPU priority, so serving keeps the cores
        self._loader = ThreadPoolExecutor(1, thread_name_prefix=f"{role}-model-loader", initializer=_lowest_priority)
        self.swaps = 0
        self._extra: dict[str, ServingModel] = {}                 # A/B rankers, by version
        self._aliases: dict[str, tuple[str | None, float]] = {}   # ref -> (version, resolved at, monotonic)
        self._resolving: set[str] = set()

    def get(self, version: str | None) -> ServingModel | None:
        """The loaded model of `version` (current, previous or one an A/B variant asked for), else None."""
        for m in (self.current, self.previous, *self._extra.values()):
            if m is not None and m.version == version:
                return m
        return None

    def ranker(self, ref: str) -> ServingModel | None:
        """The model an A/B variant names by MLflow version number or alias, if loaded; else None,
        and it is resolved and loaded in the background (the request is ranked as production).
        Aliases are resolved again every ALIAS_TTL_S, so a moved alias is followed."""
        version, checked_at = self._aliases.get(ref, (None, -math.inf))
        version = ref if ref.isdigit() else version
        model = self.get(version) if version else None
        if (model is None or not ref.isdigit()) and time.monotonic() - checked_at > ALIAS_TTL_S:
            self._resolve_later(ref)   # also after a failure, but not before ALIAS_TTL_S: MLflow is not hammered
        return model

    def _resolve_later(self, ref: str) -> None:
        if ref in self._resolving:
            return
        self._resolving.add(ref)
        task = asyncio.create_task(self._resolve(ref), name=f"{self.role}-resolve-{ref}")
        self._tasks.append(task)
        task.add_done_callback(lambda _: self._tasks.remove(task) if task in self._tasks else None)

    async def _resolve(self, ref: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            version = ref if ref.isdigit() else await loop.run_in_executor(self._loader, self._alias_version, ref)
            if self.get(version) is None:
                model = await loop.run_in_executor(self._loader, self._download_and_load, version)
                self._extra[version] = model
                while len(self._extra) > MAX_EXTRA_MODELS:   # the oldest asked-for goes first
                    self._extra.pop(next(iter(self._extra)))
                log.info("%s: loaded version %s for A/B ranker %r", self.role, version, ref)
            self._aliases[ref] = (version, time.monotonic())
        except Exception as exc:   # unknown alias, MLflow down: production ranks; tried again later
            log.warning("%s: A/B ranker %r not loaded: %r", self.role, ref, exc)
            self._aliases[ref] = (self._aliases.get(ref, (None, 0.0))[0], time.monotonic())
        finally:
            self._resolving.discard(ref)

    def _alias_version(self, alias: str) -> str:
        from models.registry import Registry

        return Registry(self.s.mlflow_tracking_uri, self.s.model_name).alias_version(alias)

    async def start(self, read_pointer: Callable[[], Awaitable[dict | None]]) -> None:
        """Follow the model-updates topic from its end, then load the published version: in this
        order, so a version announced while we start is not missed."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.s.kafka_bootstrap, enable_auto_commit=False)
        await consumer.start()
        tp = TopicPartition(self.s.topic("model.updates"), 0)   # one partition (streams/topics.py)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)
        self._tasks = [asyncio.create_task(self._follow_updates(consumer), name=f"{self.role}-model-updates"),
                       asyncio.create_task(self._retry(read_pointer), name=f"{self.role}-model-retry")]
        await self._load_pointer(await read_pointer())

    async def _load_pointer(self, pointer: dict | None) -> None:
        if pointer and pointer.get("name") == self.s.model_name and "version" in pointer:
            await self.load(str(pointer["version"]))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._loader.shutdown(wait=False, cancel_futures=True)

    async def load(self, version: str) -> bool:
        if self.current is not None and self.current.version == version or self._loading == version:
            return False
        self._loading = version
        try:
            model = await asyncio.get_running_loop().run_in_executor(self._loader, self._download_and_load, version)
        except Exception as exc:  # a bad version must not take the serving agent down
            log.error("%s: could not load model version %s: %r; keeping %s", self.role, version, exc,
                      self.current.version if self.current else "none")
            return False
        finally:
            self._loading = None
        self.previous, self.current = self.current, model   # the swap: one assignment
        self.swaps += 1
        log.info("%s: now serving model version %s", self.role, version)
        if self.on_swap:
            self.on_swap(model)
        return True

    def _download_and_load(self, version: str) -> ServingModel:
        from models.registry import Registry  # mlflow is slow to import: only when a model is loaded

        with tempfile.TemporaryDirectory(prefix=f"recstream-{self.role}-") as tmp:
            folder = Registry(self.s.mlflow_tracking_uri, self.s.model_name).download(version, Path(tmp))
            return load_bundle(folder, version, self.role, self.s.serving_threads, self.s.retrieval_shard,
                               self.s.retrieval_shards)

    async def _follow_updates(self, consumer: AIOKafkaConsumer) -> None:
        try:
            async for msg in consumer:
                try:
                    pointer = orjson.loads(msg.value)
                except orjson.JSONDecodeError:
                    log.warning("model-updates: not JSON at offset %d, ignored", msg.offset)
                    continue
                await self._load_pointer(pointer)
        finally:
            await consumer.stop()

    async def _retry(self, read_pointer: Callable[[], Awaitable[dict | None]]) -> None:
        """Without a model (MLflow was down, nothing trained yet), look again now and then."""
        while True:
            await asyncio.sleep(self.s.model_retry_s)
            if self.current is None:
                try:
                    await self._load_pointer(await read_pointer())
                except Exception as exc:
                    if asyncio.current_task().cancelling():   # stopping: a library may have wrapped the cancel
                        raise
                    log.warning("%s: model retry failed: %r", self.role, exc)
