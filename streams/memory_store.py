"""The online store in process memory (dicts, no Redis), for fast tests of the agents and the API.

Same keys (recstream/features/keys.py, no namespace: the store is the process's own) and the same
semantics as RedisStore: a batch's writes (writes.lua's ZINCRBY, EXPIREAT, trim, SET with TTL,
HSET + EXPIRE) apply with the partition offsets exactly once (apply_batch.lua's conflict), and
every read answers what the Redis one answers, ties in the order ZREVRANGE gives (score, then member,
descending). Expiry follows `clock` (Unix seconds): a key past its time reads as absent. One caller at
a time, like the tests that use it; no round trip, so no batching to mirror.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import orjson

from recstream.candidates import Read
from recstream.features import keys, popularity
from recstream.features.plan import RedisOps
from recstream.features.session import UserState, decode_features, decode_state, features_key, session_key
from schemas import Product
from streams.store import BatchFold, OffsetConflict, RankingReads, RetrievalReads, decode_vector, item_fields


def _best(z: dict[str, float], n: int) -> list[tuple[str, float]]:
    """ZREVRANGE 0 n-1 WITHSCORES: by score, then member, both descending."""
    return sorted(z.items(), key=lambda x: (x[1], x[0]), reverse=True)[:max(n, 0)]


class MemoryStore(BatchFold):
    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.strings: dict[str, bytes] = {}
        self.hashes: dict[str, dict[str, str]] = {}
        self.zsets: dict[str, dict[str, float]] = {}
        self.sets: dict[str, set[str]] = {}
        self.expires: dict[str, float] = {}     # key -> Unix s
        self.applied: dict[int, int] = {}       # partition -> highest offset applied

    # -- the keyspace ------------------------------------------------------------------------------
    def _live(self, key: str) -> None:
        if key in self.expires and self.clock() >= self.expires[key]:
            self._delete(key)

    def _delete(self, key: str) -> None:
        for space in (self.strings, self.hashes, self.zsets, self.sets, self.expires):
            space.pop(key, None)

    def _exists(self, key: str) -> bool:
        self._live(key)
        return key in self.strings or key in self.hashes or key in self.zsets or key in self.sets

    def _get(self, key: str) -> bytes | None:
        self._live(key)
        return self.strings.get(key)

    def _hash(self, key: str) -> dict[str, str]:
        self._live(key)
        return self.hashes.get(key, {})

    def _zset(self, key: str) -> dict[str, float]:
        self._live(key)
        return self.zsets.get(key, {})

    def _set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._delete(key)   # SET replaces the value and its expiry
        self.strings[key] = value
        if ttl_s is not None:
            self.expires[key] = self.clock() + ttl_s

    def _expire_at(self, key: str, at: float) -> None:
        if self._exists(key):
            self.expires[key] = at
            self._live(key)

    # -- writes ------------------------------------------------------------------------------------
    async def apply(self, ops: RedisOps) -> None:
        """A batch's writes with its offsets, as apply_batch.lua: refused whole if a partition's applied
        offset is at or past the batch's lowest offset of it."""
        for p, (lo, _) in ops.offsets.items():
            if (cur := self.applied.get(p, -1)) >= lo:
                raise OffsetConflict(f"partition {p} already applied up to {cur}")
        self._write(ops)
        for p, (_, hi) in ops.offsets.items():
            self.applied[p] = hi

    def _write(self, ops: RedisOps) -> None:
        """writes.lua, in its order."""
        for (key, member), delta in ops.incr.items():
            self._live(key)
            z = self.zsets.setdefault(key, {})
            z[member] = z.get(member, 0.0) + delta
        for key, at in ops.expire_at.items():
            self._expire_at(key, at)
        for key, n in ops.trim.items():
            z = self._zset(key)
            if len(z) > 2 * n:
                self.zsets[key] = dict(_best(z, n))
        for key, (value, ttl_s) in ops.set.items():
            self._set(key, value, ttl_s)
        for key, (fields, ttl_s) in ops.hset.items():
            self._live(key)
            self.hashes.setdefault(key, {}).update(fields)
            self.expires[key] = self.clock() + ttl_s

    async def applied_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        return {p: self.applied.get(p, -1) for p in sorted(set(partitions))}

    async def write_items(self, products: Iterable[Product]) -> int:
        n = 0
        for p in products:
            self._live(keys.item_features(p.product_id))
            self.hashes.setdefault(keys.item_features(p.product_id), {}).update(item_fields(p))
            oos = self.sets.setdefault(keys.OOS, set())
            if p.in_stock:
                oos.discard(p.product_id)
            else:
                oos.add(p.product_id)
            self.zsets.setdefault(keys.brand(str(p.brand)), {})[p.product_id] = p.rating or 0.0
            n += 1
        return n

    # -- the trainer's publication ------------------------------------------------------------------
    async def write_version(self, version: str, vectors: Iterable[tuple[str, str, bytes]],
                            offline: Iterable[tuple[str, str, dict[str, str]]]) -> int:
        n = 0
        for kind, entity, value in vectors:
            self._set(keys.embedding(kind, version, entity), value)
            n += 1
        for kind, entity, fields in offline:
            key = (keys.user_offline if kind == "user" else keys.item_offline)(version, entity)
            self._live(key)
            self.hashes.setdefault(key, {}).update(fields)
            n += 1
        return n

    async def set_model_pointer(self, pointer: dict[str, Any]) -> None:
        self._set(keys.MODEL_CURRENT, orjson.dumps(pointer))

    def _published(self) -> list[tuple[str, str]]:
        """(key, version) of every published key but the pointer."""
        names = [*self.strings, *self.hashes]
        return [(k, v) for k in names if (v := keys.published_version(k)) is not None]

    async def remove_version(self, version: str) -> None:
        for key, v in self._published():
            if v == version:
                self._delete(key)

    async def remove_versions_except(self, keep: set[str | None]) -> list[str]:
        gone = [(key, v) for key, v in self._published() if v not in keep]
        for key, _ in gone:
            self._delete(key)
        return sorted({v for _, v in gone})

    # -- erasure -----------------------------------------------------------------------------------
    async def mark_erased(self, user_ids: Sequence[str]) -> int:
        erased = self.sets.setdefault(keys.ERASED, set())
        new = set(user_ids) - erased
        erased |= new
        return len(new)

    async def erased(self, user_ids: Iterable[str]) -> set[str]:
        return set(user_ids) & self.sets.get(keys.ERASED, set())

    async def erased_users(self) -> set[str]:
        return set(self.sets.get(keys.ERASED, set()))

    async def forget_users(self, user_ids: Sequence[str]) -> int:
        """As RedisStore.forget_users: the fixed per-user keys."""
        return self._delete_existing({k for u in set(user_ids) for k in keys.user_keys(u)})

    async def erase_users(self, user_ids: Sequence[str], share: float = 1.0) -> int:
        """As RedisStore.erase_users: the fixed per-user keys, and the keys of keys.user_patterns whose
        hash tag is one of the users (`share`: nothing to pace here)."""
        users = set(user_ids)
        prefixes = tuple(p.rstrip("*") for p in keys.user_patterns())
        names = {k for u in users for k in keys.user_keys(u)}
        names |= {k for space in (self.strings, self.hashes, self.zsets, self.sets) for k in space
                  if k.startswith(prefixes) and keys.hash_tag(k) in users}
        return self._delete_existing(names)

    def _delete_existing(self, names: set[str]) -> int:
        gone = [k for k in names if self._exists(k)]
        for k in gone:
            self._delete(k)
        return len(gone)

    # -- reads -------------------------------------------------------------------------------------
    async def categories(self, product_ids: Iterable[str]) -> dict[str, str]:
        found = {pid: self._hash(keys.item_features(pid)).get("category") for pid in sorted(set(product_ids))}
        return {pid: c for pid, c in found.items() if c}

    async def user_states(self, user_ids: Sequence[str]) -> dict[str, UserState]:
        found = {u: decode_state(self._get(keys.user_state(u))) for u in user_ids}
        return {u: st for u, st in found.items() if st is not None}

    async def user_session(self, user_id: str) -> list[str]:
        raw = self._get(session_key(user_id))
        return orjson.loads(raw) if raw else []

    async def user_features(self, user_id: str) -> dict[str, Any] | None:
        raw: dict[bytes | str, bytes | str] = {k: v for k, v in self._hash(features_key(user_id)).items()}
        return decode_features(raw) if raw else None

    async def item_features(self, product_id: str) -> dict[str, str]:
        return dict(self._hash(keys.item_features(product_id)))

    async def neighbours(self, kind: str, product_id: str, n: int = 20) -> list[tuple[str, float]]:
        return _best(self._zset(keys.neighbours(kind, product_id)), n)

    async def popularity(self, event_type: str, now: float, window_days: int,
                         product_ids: list[str]) -> dict[str, float]:
        totals = dict.fromkeys(product_ids, 0.0)
        for d in popularity.window_days(now, window_days):
            z = self._zset(popularity.count_key(event_type, d))
            for pid in product_ids:
                totals[pid] += z.get(pid, 0.0)
        return totals

    def _trend(self, now: float, half_life_s: float, n: int, depth: int,
               category: str | None) -> list[tuple[str, float]]:
        """The landmarks' lists, each `depth` deep, decayed to `now` and summed; the best n."""
        return popularity.merge_trend([(w, _best(self._zset(popularity.trend_key(lm, category)), depth))
                                       for lm, w in popularity.trend_read_weights(now, half_life_s).items()], n)

    async def trending(self, now: float, half_life_s: float, n: int = 20,
                       category: str | None = None) -> list[tuple[str, float]]:
        return self._trend(now, half_life_s, n, 4 * n, category)

    async def candidate_reads(self, reads: Sequence[Read], now: float,
                              half_life_s: float) -> list[list[tuple[str, float]]]:
        out = []
        for rd in reads:
            if rd.table == "trend":
                out.append(self._trend(now, half_life_s, rd.n, 2 * rd.n, rd.key))
            else:
                name = str(rd.key)   # (a list read always names its key)
                key = keys.brand(name) if rd.table == "brand" else keys.neighbours(rd.table, name)
                out.append(_best(self._zset(key), rd.n))
        return out

    async def in_stock(self, product_ids: Sequence[str]) -> list[bool]:
        oos = self.sets.get(keys.OOS, set())
        return [pid not in oos for pid in product_ids]

    async def item_rows(self, product_ids: list[str], fields: Sequence[str]) -> list[list[str | None]]:
        return [[self._hash(keys.item_features(pid)).get(f) for f in fields] for pid in product_ids]

    async def existing_items(self, product_ids: Sequence[str]) -> set[str]:
        return {pid for pid in product_ids if self._exists(keys.item_features(pid))}

    def _stats(self, product_ids: list[str], now: float, window_days: int,
               half_life_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """candidate_stats.lua: views and clicks, purchases over the window; trending decayed to `now`."""
        cols = np.zeros((3, len(product_ids)))
        reads = [(popularity.count_key(kind, d), col, 1.0) for kind, col in (("view", 0), ("click", 0), ("purchase", 1))
                 for d in popularity.window_days(now, window_days)]
        reads += [(popularity.trend_key(lm), 2, w) for lm, w in popularity.trend_read_weights(now, half_life_s).items()]
        for key, col, w in reads:
            z = self._zset(key)
            cols[col] += [z.get(pid, 0.0) * w for pid in product_ids]
        return cols[0], cols[1], cols[2]

    async def ranking_reads(self, product_ids: list[str], item_misses: list[str], fields: Sequence[str],
                            stat_misses: list[str], user_id: str | None, version: str | None, now: float,
                            window_days: int, half_life_s: float) -> RankingReads:
        rows = await self.item_rows(item_misses, fields)
        pop, bought, trend = (self._stats(stat_misses, now, window_days, half_life_s) if stat_misses
                              else (np.zeros(0),) * 3)
        out = RankingReads(rows, await self.in_stock(product_ids), pop, bought, trend)
        if user_id:
            out.features = await self.user_features(user_id)
            out.recent = await self.user_session(user_id)
            offline = self._hash(keys.user_offline(str(version), user_id))
            out.affinity = orjson.loads(offline.get("category_affinity", "{}"))
            out.median_price = float(offline["median_price"]) if offline.get("median_price") else None
        return out

    async def retrieval_reads(self, user_id: str | None, anchors: Sequence[str],
                              version: str | None) -> RetrievalReads:
        out = RetrievalReads()
        if user_id:
            out.user_vector = decode_vector(self._get(keys.embedding("user", str(version), user_id)))
            out.session = await self.user_session(user_id)
            out.features = await self.user_features(user_id)
        out.anchor_vectors = await self.embeddings("item", str(version), anchors)
        out.anchor_items = [await self.item_features(a) for a in anchors]
        return out

    async def embeddings(self, kind: str, version: str, ids: Sequence[str]) -> list[np.ndarray | None]:
        return [decode_vector(self._get(keys.embedding(kind, version, x))) for x in ids]

    # -- the serving path --------------------------------------------------------------------------
    async def model_pointer(self) -> dict[str, Any] | None:
        raw = self._get(keys.MODEL_CURRENT)
        return orjson.loads(raw) if raw else None

    async def serving_path(self, forget_after_s: float,
                           now: float) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
        agents = self._hash(keys.AGENTS)
        reports = {k: orjson.loads(v) for k, v in agents.items()}
        for k, rep in reports.items():
            if now - float(rep.get("ts") or 0.0) > forget_after_s:
                await self.forget_agent(k)
        return reports, await self.model_pointer()

    async def report_agent(self, name: str, ts: float, model_version: str | None) -> None:
        self._live(keys.AGENTS)
        report = orjson.dumps({"ts": ts, "model_version": model_version}).decode()
        self.hashes.setdefault(keys.AGENTS, {})[name] = report

    async def forget_agent(self, name: str) -> None:
        agents = self._hash(keys.AGENTS)
        agents.pop(name, None)
        if not agents:   # Redis drops a hash with its last field
            self._delete(keys.AGENTS)

    async def publish_metrics(self, key: str, index: str | None, snapshot: dict[str, Any], ttl_s: int) -> None:
        self._set(key, orjson.dumps(snapshot), ttl_s)
        if index:
            self._live(index)
            self.zsets.setdefault(index, {})[key] = self.clock()
            self.expires[index] = self.clock() + ttl_s

    def homepage_key(self, user_id: str, variants: str, count: int, device: str, page: str) -> str:
        return keys.homecache(user_id, variants, count, device, page)

    async def homepage_cached(self, key: str, user_id: str) -> tuple[bytes | None, str]:
        """Valid while the user's event count and the published model version are what they were."""
        pointer = await self.model_pointer()
        events = self._hash(features_key(user_id)).get("events") or "0"
        tag = f"{events}@{pointer.get('version', '') if pointer else ''}"
        if cached := self._get(key):
            stored_tag, _, reply = cached.partition(b"|")
            if stored_tag.decode() == tag:
                return reply, tag
        return None, tag

    async def cache_homepage(self, key: str, tag: str, reply: bytes, ttl_s: int) -> None:
        self._set(key, tag.encode() + b"|" + reply, ttl_s)
