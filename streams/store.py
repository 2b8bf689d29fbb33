"""The online store's interface: what the agents, the API, batch/publish and the command line call, the
values its reads return, and the batch fold that every implementation applying a batch in one step shares.

Implementations: streams/online_store.py RedisStore (one Redis), streams/cluster_store.py
RedisClusterStore (a Redis Cluster), streams/memory_store.py MemoryStore (dicts, for fast tests).
tests/unit/test_store_contract.py and tests/integration/test_online_store_contract.py run one contract
over the three (tests/store_contract.py).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson

from recstream.candidates import Read
from recstream.features.plan import BatchPlan, Incoming, Limits, RedisOps, plan
from recstream.features.session import FeatureConfig, UserState, newest
from schemas import Product


class OffsetConflict(Exception):
    """The store already holds increments at or past this batch's offsets (another worker, or a stale cache)."""


@dataclass
class RankingReads:
    item_rows: list[list[str | None]]     # for the item-cache misses, in their order
    in_stock: list[bool]                  # for every candidate
    popularity_7d: np.ndarray             # for the stats-cache misses, in their order
    purchases_7d: np.ndarray
    trending: np.ndarray
    features: dict[str, Any] | None = None
    recent: list[str] = field(default_factory=list)
    affinity: dict[str, float] = field(default_factory=dict)
    median_price: float | None = None


@dataclass
class RetrievalReads:
    """What retrieval reads for one request in one round trip (None or empty where nothing is stored)."""
    user_vector: np.ndarray | None = None
    session: list[str] = field(default_factory=list)
    features: dict[str, Any] | None = None
    anchor_vectors: list[np.ndarray | None] = field(default_factory=list)   # in the anchors' order
    anchor_items: list[dict[str, str]] = field(default_factory=list)        # item features, decoded


def decode_vector(raw: object) -> np.ndarray | None:
    """A published embedding's value: float32 bytes (batch/publish.py writes them); None if absent."""
    return np.frombuffer(raw, dtype=np.float32) if isinstance(raw, bytes) and raw else None


def item_fields(p: Product) -> dict[str, str]:
    """An item's features as the store keeps them (item_features:{p9}), every value a string."""
    return {
        "title": p.title, "category": p.category, "category_path": orjson.dumps(list(p.category_path)).decode(),
        "brand": p.brand, "price": repr(p.price), "in_stock": "1" if p.in_stock else "0",
        "rating": "" if p.rating is None else repr(p.rating),
        "seller_rating": "" if p.seller_rating is None else repr(p.seller_rating),
        "created_at": repr(p.created_at),
    }


class Store(Protocol):
    """The online store as its users see it (no key, client or pipeline shows through)."""

    # -- the feature agents' writes, exactly once per partition offset (agents/features.py, cli/evaluate.py)
    async def fold(self, batch: list[Incoming], states: Mapping[str, UserState], applied: dict[int, int],
                   cfg: FeatureConfig, limits: Limits, passed: Sequence[tuple[int, int]] = ()) -> BatchPlan: ...
    async def apply(self, ops: RedisOps) -> None: ...
    async def applied_offsets(self, partitions: Iterable[int]) -> dict[int, int]: ...
    async def fresher(self, states: Mapping[str, UserState], users: Iterable[str] = ()) -> dict[str, UserState]: ...
    async def write_items(self, products: Iterable[Product]) -> int: ...

    # -- serving reads (agents/retrieval.py, agents/ranking.py, serving/recommend.py)
    async def retrieval_reads(self, user_id: str | None, anchors: Sequence[str],
                              version: str | None) -> RetrievalReads: ...
    async def candidate_reads(self, reads: Sequence[Read], now: float,
                              half_life_s: float) -> list[list[tuple[str, float]]]: ...
    async def embeddings(self, kind: str, version: str, ids: Sequence[str]) -> list[np.ndarray | None]: ...
    async def ranking_reads(self, product_ids: list[str], item_misses: list[str], fields: Sequence[str],
                            stat_misses: list[str], user_id: str | None, version: str | None, now: float,
                            window_days: int, half_life_s: float) -> RankingReads: ...
    async def item_rows(self, product_ids: list[str], fields: Sequence[str]) -> list[list[str | None]]: ...
    async def in_stock(self, product_ids: Sequence[str]) -> list[bool]: ...
    async def categories(self, product_ids: Iterable[str]) -> dict[str, str]: ...
    async def existing_items(self, product_ids: Sequence[str]) -> set[str]: ...
    async def trending(self, now: float, half_life_s: float, n: int = 20,
                       category: str | None = None) -> list[tuple[str, float]]: ...
    def homepage_key(self, user_id: str, variants: str, count: int, device: str, page: str) -> str: ...
    async def homepage_cached(self, key: str, user_id: str) -> tuple[bytes | None, str]: ...
    async def cache_homepage(self, key: str, tag: str, reply: bytes, ttl_s: int) -> None: ...

    # -- the serving path: agents report, the API reads (agents/worker.py, serving/recommend.py)
    async def model_pointer(self) -> dict[str, Any] | None: ...
    async def serving_path(self, forget_after_s: float,
                           now: float) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]: ...
    async def report_agent(self, name: str, ts: float, model_version: str | None) -> None: ...
    async def forget_agent(self, name: str) -> None: ...
    async def publish_metrics(self, key: str, index: str | None, snapshot: dict[str, Any], ttl_s: int) -> None: ...

    # -- the trainer's publication (batch/publish.py): a version's keys, then the pointer, then the old ones go
    async def write_version(self, version: str, vectors: Iterable[tuple[str, str, bytes]],
                            offline: Iterable[tuple[str, str, dict[str, str]]]) -> int: ...
    async def set_model_pointer(self, pointer: dict[str, Any]) -> None: ...
    async def remove_version(self, version: str) -> None: ...
    async def remove_versions_except(self, keep: set[str | None]) -> list[str]: ...

    # -- erasure (streams/erasures.py): the erased set, and a shopper's per-user keys of every kind and version
    async def mark_erased(self, user_ids: Sequence[str]) -> int: ...
    async def erased(self, user_ids: Iterable[str]) -> set[str]: ...
    async def erased_users(self) -> set[str]: ...
    async def forget_users(self, user_ids: Sequence[str]) -> int: ...
    async def erase_users(self, user_ids: Sequence[str], share: float = 1.0) -> int: ...

    # -- read back: the demo (cli/demo.py) and the contract suite
    async def user_session(self, user_id: str) -> list[str]: ...
    async def user_features(self, user_id: str) -> dict[str, Any] | None: ...
    async def user_states(self, user_ids: Sequence[str]) -> dict[str, UserState]: ...
    async def item_features(self, product_id: str) -> dict[str, str]: ...
    async def neighbours(self, kind: str, product_id: str, n: int = 20) -> list[tuple[str, float]]: ...
    async def popularity(self, event_type: str, now: float, window_days: int,
                         product_ids: list[str]) -> dict[str, float]: ...


class BatchFold(ABC):
    """The fold of a store that applies a batch in one atomic step guarded by the partition offsets (one
    Redis's script, the memory store): plan, apply, and on an OffsetConflict replan from the offsets and
    states the store holds now."""

    @abstractmethod
    async def apply(self, ops: RedisOps) -> None: ...

    @abstractmethod
    async def applied_offsets(self, partitions: Iterable[int]) -> dict[int, int]: ...

    @abstractmethod
    async def categories(self, product_ids: Iterable[str]) -> dict[str, str]: ...

    @abstractmethod
    async def user_states(self, user_ids: Sequence[str]) -> dict[str, UserState]: ...

    async def fold(self, batch: list[Incoming], states: Mapping[str, UserState], applied: dict[int, int],
                   cfg: FeatureConfig, limits: Limits, passed: Sequence[tuple[int, int]] = ()) -> BatchPlan:
        """Plan a batch over `states` and apply its writes. `applied` (partition -> highest offset whose
        increments the store holds) is filled in as needed, reloaded on a conflict, and advanced. A conflict
        means another process applied part of the batch meanwhile (the old owner of a partition, still
        folding in a rebalance): the states it wrote are read too, and the result's states are the
        newest of every user of the batch (what the session table should hold). `passed`: records
        re-routed to their owner partition, whose offsets the guard moves past (features/plan.py)."""
        partitions = {i.partition for i in batch} | {p for p, _ in passed}
        applied.update(await self.applied_offsets(partitions - applied.keys()))
        categories = await self.categories(i.event.product_id for i in batch if not i.event.category)
        result = await self._fold_planned(batch, states, applied, categories, cfg, limits, passed)
        for p, (_, hi) in result.ops.offsets.items():
            applied[p] = hi
        return result

    async def _fold_planned(self, batch: list[Incoming], states: Mapping[str, UserState], applied: dict[int, int],
                            categories: Mapping[str, str], cfg: FeatureConfig, limits: Limits,
                            passed: Sequence[tuple[int, int]] = ()) -> BatchPlan:
        reloaded = False
        for _ in range(3):
            result = plan(batch, states, applied, categories, cfg, limits, passed)
            try:
                await self.apply(result.ops)
                break
            except OffsetConflict:
                applied.update(await self.applied_offsets({i.partition for i in batch} | {p for p, _ in passed}))
                states, reloaded = await self.fresher(states, (i.event.user_id for i in batch)), True
        else:
            raise OffsetConflict("could not apply a batch after 3 reloads of the applied offsets")
        if reloaded:
            result.states = {**states, **result.states}
        return result

    async def fresher(self, states: Mapping[str, UserState], users: Iterable[str] = ()) -> dict[str, UserState]:
        """`states` (and `users`, absent from it: no state) with each user's stored copy (user_state)
        where that copy took in more of the partition."""
        wanted = sorted(set(states) | set(users))
        stored = await self.user_states(wanted)
        return {u: newest(states.get(u, UserState()), stored.get(u)) for u in wanted}
