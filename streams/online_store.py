"""The online feature store in Redis: atomic, offset-guarded batch writes and the reads serving needs.

Key layout (all written by the feature and catalogue agents; each behind the settings' namespace):
  user_session:{user}        string, JSON list of the session's last products, newest first; TTL = session idle
  user_features:{user}       hash (session_id, last_viewed, session_categories, cart_items, purchases, ...)
  item_features:{product}    hash (title, category, category_path, brand, price, in_stock, rating, ...)
  pop:{event_type}:{day}     zset product -> events that UTC day; expires when out of every window
  popcat:{category}:{day}    zset product -> weighted events that day within the category
  trend:{landmark}           zset product -> forward-decayed weight (see features/popularity.py)
  trend:cat:{cat}:{landmark} the same per category
  covis:{product}            zset product -> co-views in a session ("customers also viewed"), bounded
  cobuy:{product}            zset product -> co-purchases in a session ("frequently bought together"), bounded
  applied:{group}:{topic}:{partition}  highest clickstream offset whose increments are applied
  oos                        set of products out of stock (one SMISMEMBER answers a whole candidate list)
  brand:{brand}              zset product -> rating: "more from this brand"
  homecache:{user}:{variants}:{count}:{device}:{page}  a homepage reply, valid while the user's event count and the model version are unchanged
Written by the trainer (batch/publish.py): model:current, emb:user|item:{version}:{id}, uoff:, ioff:.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import orjson
import redis.asyncio as aioredis

from recstream.features import popularity
from recstream.features.plan import BatchPlan, Incoming, Limits, RedisOps, plan
from recstream.features.session import FeatureConfig, UserState, decode_features, features_key, session_key
from schemas import Product

# One round trip per batch: the Python client tops out near 70k commands/s, Redis runs this script
# at well over a million. Key names travel inside the payload, so this suits one Redis node (or a
# cluster only with hash tags per batch; see the scale-out issue).
APPLY_BATCH = """
local p = cjson.decode(ARGV[1])
local prefix = ARGV[2]
local ns = ARGV[3]
for _, o in ipairs(p.off) do
  local cur = tonumber(redis.call('GET', prefix .. o[1]) or '-1')
  if cur >= o[2] then return {'conflict', tostring(o[1]), tostring(cur)} end
end
for _, z in ipairs(p.z) do redis.call('ZINCRBY', ns .. z[1], z[3], z[2]) end
for _, x in ipairs(p.xat) do redis.call('EXPIREAT', ns .. x[1], x[2]) end
for _, t in ipairs(p.trim) do
  local k = ns .. t[1]
  if redis.call('ZCARD', k) > 2 * t[2] then redis.call('ZREMRANGEBYRANK', k, 0, -(t[2] + 1)) end
end
for _, s in ipairs(p.set) do redis.call('SET', ns .. s[1], s[2], 'EX', s[3]) end
for _, h in ipairs(p.hset) do
  local args = {}
  for f, v in pairs(h[2]) do args[#args + 1] = f; args[#args + 1] = v end
  redis.call('HSET', ns .. h[1], unpack(args))
  redis.call('EXPIRE', ns .. h[1], h[3])
end
for _, o in ipairs(p.off) do redis.call('SET', prefix .. o[1], o[3]) end
return {'ok'}
"""


# Serving reads for a whole candidate list in one call, answered as one JSON string: parsing a
# pipeline's thousands of replies in Python cost ~5 ms per request, this ~0.1 ms.
CANDIDATE_STATS = """
local ids = cjson.decode(ARGV[1])
local reads = cjson.decode(ARGV[2])
local out = {{}, {}, {}}
for i = 1, #ids do out[1][i] = 0; out[2][i] = 0; out[3][i] = 0 end
for _, r in ipairs(reads) do
  local s = redis.call('ZMSCORE', r[1], unpack(ids))
  local col, w = out[r[2]], r[3]
  for i = 1, #ids do
    if s[i] then col[i] = col[i] + tonumber(s[i]) * w end
  end
end
return cjson.encode(out)
"""

ITEM_ROWS = """
local ids = cjson.decode(ARGV[1])
local fields = cjson.decode(ARGV[2])
local prefix = ARGV[3]
local out = {}
for i, id in ipairs(ids) do
  local v = redis.call('HMGET', prefix .. id, unpack(fields))
  local row = {}
  for j = 1, #fields do row[j] = v[j] or cjson.null end
  out[i] = row
end
return cjson.encode(out)
"""


@dataclass
class RankingReads:
    item_rows: list[list[str | None]]     # for the item-cache misses, in their order
    in_stock: list[bool]                  # for every candidate
    popularity_7d: np.ndarray             # for the stats-cache misses, in their order
    purchases_7d: np.ndarray
    trending: np.ndarray
    features: dict | None = None
    recent: list[str] = field(default_factory=list)
    affinity: dict[str, float] = field(default_factory=dict)
    median_price: float | None = None


class OffsetConflict(Exception):
    """Redis already holds increments at or past this batch's offsets (another worker, or a stale cache)."""


def item_fields(p: Product) -> dict[str, str]:
    return {
        "title": p.title, "category": p.category, "category_path": orjson.dumps(list(p.category_path)).decode(),
        "brand": p.brand, "price": repr(p.price), "in_stock": "1" if p.in_stock else "0",
        "rating": "" if p.rating is None else repr(p.rating),
        "seller_rating": "" if p.seller_rating is None else repr(p.seller_rating),
        "created_at": repr(p.created_at),
    }


class OnlineStore:
    def __init__(self, client: aioredis.Redis, namespace: str, group: str, topic: str):
        self.redis = client
        self.ns = namespace
        self.offsets_prefix = f"{namespace}applied:{group}:{topic}:"
        self._apply = client.register_script(APPLY_BATCH)
        self._stats = client.register_script(CANDIDATE_STATS)
        self._item_rows = client.register_script(ITEM_ROWS)

    # -- writes ----------------------------------------------------------------------------------
    async def apply(self, ops: RedisOps) -> None:
        result = await self._apply(args=[orjson.dumps(ops.as_payload()), self.offsets_prefix, self.ns])
        if result[0] == b"conflict":
            raise OffsetConflict(f"partition {result[1].decode()} already applied up to {result[2].decode()}")

    async def fold(self, batch: list[Incoming], states: Mapping[str, UserState], applied: dict[int, int],
                   cfg: FeatureConfig, limits: Limits) -> BatchPlan:
        """Plan a batch over `states` and apply its writes. `applied` (partition -> highest offset whose
        increments Redis holds) is filled in as needed, reloaded on a conflict, and advanced."""
        applied.update(await self.applied_offsets({i.partition for i in batch if i.partition not in applied}))
        categories = await self.categories(i.event.product_id for i in batch if not i.event.category)
        for _ in range(3):
            result = plan(batch, states, applied, categories, cfg, limits)
            try:
                await self.apply(result.ops)
                break
            except OffsetConflict:
                applied.update(await self.applied_offsets({i.partition for i in batch}))
        else:
            raise OffsetConflict("could not apply a batch after 3 reloads of the applied offsets")
        for p, (_, hi) in result.ops.offsets.items():
            applied[p] = hi
        return result

    async def applied_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        parts = sorted(set(partitions))
        values = await self.redis.mget([self.offsets_prefix + str(p) for p in parts]) if parts else []
        return {p: int(v) if v is not None else -1 for p, v in zip(parts, values)}

    async def write_items(self, products: Iterable[Product]) -> int:
        pipe = self.redis.pipeline(transaction=False)
        n = 0
        for p in products:
            pipe.hset(f"{self.ns}item_features:{p.product_id}", mapping=item_fields(p))
            if p.in_stock:
                pipe.srem(f"{self.ns}oos", p.product_id)
            else:
                pipe.sadd(f"{self.ns}oos", p.product_id)
            pipe.zadd(f"{self.ns}brand:{p.brand}", {p.product_id: p.rating or 0.0})
            n += 1
        await pipe.execute()
        return n

    # -- reads -----------------------------------------------------------------------------------
    async def categories(self, product_ids: Iterable[str]) -> dict[str, str]:
        ids = sorted(set(product_ids))
        if not ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for pid in ids:
            pipe.hget(f"{self.ns}item_features:{pid}", "category")
        return {pid: c.decode() for pid, c in zip(ids, await pipe.execute()) if c}

    async def user_session(self, user_id: str) -> list[str]:
        raw = await self.redis.get(self.ns + session_key(user_id))
        return orjson.loads(raw) if raw else []

    async def user_features(self, user_id: str) -> dict | None:
        raw = await self.redis.hgetall(self.ns + features_key(user_id))
        return decode_features(raw) if raw else None

    async def item_features(self, product_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(f"{self.ns}item_features:{product_id}")
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def neighbours(self, kind: str, product_id: str, n: int = 20) -> list[tuple[str, float]]:
        """kind 'covis' (also viewed) or 'cobuy' (bought together): best first."""
        rows = await self.redis.zrevrange(f"{self.ns}{kind}:{product_id}", 0, n - 1, withscores=True)
        return [(m.decode(), s) for m, s in rows]

    async def popularity(self, event_type: str, now: float, window_days: int, product_ids: list[str]) -> dict[str, float]:
        """Windowed counts per product (sum of the window's days), before log scaling."""
        pipe = self.redis.pipeline(transaction=False)
        days = popularity.window_days(now, window_days)
        for d in days:
            pipe.zmscore(self.ns + popularity.count_key(event_type, d), product_ids)
        totals = dict.fromkeys(product_ids, 0.0)
        for scores in await pipe.execute():
            for pid, s in zip(product_ids, scores or []):
                totals[pid] += s or 0.0
        return totals

    async def trending(self, now: float, half_life_s: float, n: int = 20, category: str | None = None) -> list[tuple[str, float]]:
        """Top products by decayed weight at `now`, merging the current and previous landmark."""
        weights = popularity.trend_read_weights(now, half_life_s)
        scores: dict[str, float] = {}
        for lm, w in weights.items():
            for m, s in await self.redis.zrevrange(self.ns + popularity.trend_key(lm, category), 0, 4 * n - 1,
                                                  withscores=True):
                scores[m.decode()] = scores.get(m.decode(), 0.0) + s * w
        return sorted(scores.items(), key=lambda x: -x[1])[:n]

    # -- serving reads -----------------------------------------------------------------------------
    async def in_stock(self, product_ids: Sequence[str]) -> list[bool]:
        if not product_ids:
            return []
        return [not x for x in await self.redis.smismember(f"{self.ns}oos", list(product_ids))]

    def _stats_args(self, product_ids: list[str], now: float, window_days: int, half_life_s: float) -> list[bytes]:
        reads = []
        for kind, col in (("view", 1), ("click", 1), ("purchase", 2)):
            reads += [[self.ns + popularity.count_key(kind, d), col, 1.0] for d in popularity.window_days(now, window_days)]
        reads += [[self.ns + popularity.trend_key(lm), 3, w]
                  for lm, w in popularity.trend_read_weights(now, half_life_s).items()]
        return [orjson.dumps(product_ids), orjson.dumps(reads)]

    @staticmethod
    def _stats_result(raw: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pop, bought, trend = (np.asarray(c if isinstance(c, list) else [], np.float64) for c in orjson.loads(raw))
        return pop, bought, trend

    def _item_args(self, product_ids: list[str], fields: Sequence[str]) -> list:
        return [orjson.dumps(product_ids), orjson.dumps(list(fields)), f"{self.ns}item_features:"]

    @staticmethod
    def _item_result(raw: bytes, n_fields: int) -> list[list[str | None]]:
        return [r if isinstance(r, list) else [None] * n_fields for r in orjson.loads(raw)]

    async def item_rows(self, product_ids: list[str], fields: Sequence[str]) -> list[list[str | None]]:
        """HMGET of `fields` for each product's item_features, in one round trip."""
        if not product_ids:
            return []
        return self._item_result(await self._item_rows(args=self._item_args(product_ids, fields)), len(fields))

    async def ranking_reads(self, product_ids: list[str], item_misses: list[str], fields: Sequence[str],
                            stat_misses: list[str], user_id: str | None, version: str | None, now: float,
                            window_days: int, half_life_s: float) -> "RankingReads":
        """Everything the ranking agent reads for one candidate set, in one round trip: stock of every
        candidate; catalogue fields and popularity counts of those its caches miss; the user's state."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.scripts.update((self._item_rows, self._stats))   # loaded first if Redis lost them (restart)
        if item_misses:
            pipe.evalsha(self._item_rows.sha, 0, *self._item_args(item_misses, fields))
        if product_ids:   # (SMISMEMBER needs at least one member: an empty candidate set reads no stock)
            pipe.smismember(f"{self.ns}oos", product_ids)
        if stat_misses:
            pipe.evalsha(self._stats.sha, 0, *self._stats_args(stat_misses, now, window_days, half_life_s))
        if user_id:
            pipe.hgetall(self.ns + features_key(user_id))
            pipe.get(self.ns + session_key(user_id))
            pipe.hgetall(f"{self.ns}uoff:{version}:{user_id}")
        res = await pipe.execute()
        rows = self._item_result(res.pop(0), len(fields)) if item_misses else []
        in_stock = [not x for x in res.pop(0)] if product_ids else []
        pop, bought, trend = self._stats_result(res.pop(0)) if stat_misses else (np.zeros(0),) * 3
        out = RankingReads(rows, in_stock, pop, bought, trend)
        if user_id:
            feats, session, offline = res[:3]
            out.features = decode_features(feats) if feats else None
            out.recent = orjson.loads(session) if session else []
            d = {k.decode(): v.decode() for k, v in offline.items()}
            out.affinity = orjson.loads(d.get("category_affinity", "{}"))
            out.median_price = float(d["median_price"]) if d.get("median_price") else None
        return out

    async def model_pointer(self) -> dict | None:
        raw = await self.redis.get(f"{self.ns}model:current")
        return orjson.loads(raw) if raw else None

    async def embeddings(self, kind: str, version: str, ids: Sequence[str]) -> list[np.ndarray | None]:
        """kind 'user' or 'item': the published vectors of `version` (None where there is none)."""
        if not ids:
            return []
        raw = await self.redis.mget([f"{self.ns}emb:{kind}:{version}:{x}" for x in ids])
        return [np.frombuffer(r, dtype=np.float32) if r else None for r in raw]

    def homepage_key(self, user_id: str, variants: str, count: int, device: str, page: str) -> str:
        return f"{self.ns}homecache:{user_id}:{variants}:{count}:{device}:{page}"

    async def homepage_cached(self, key: str, user_id: str) -> tuple[bytes | None, str]:
        """(the cached reply if still valid, its tag now: the user's event count and the published
        model version). A reply is valid while both are what they were when it was computed: any
        new event of the user, or a new model (a training run, an A/B promotion), invalidates it."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(key)
        pipe.hget(self.ns + features_key(user_id), "events")
        pipe.get(self.ns + "model:current")
        cached, events, pointer = await pipe.execute()
        version = orjson.loads(pointer).get("version", "") if pointer else ""
        tag = f"{events.decode() if events else '0'}@{version}"
        if cached:
            stored_tag, _, reply = cached.partition(b"|")
            if stored_tag.decode() == tag:
                return reply, tag
        return None, tag

    async def cache_homepage(self, key: str, tag: str, reply: bytes, ttl_s: int) -> None:
        await self.redis.set(key, tag.encode() + b"|" + reply, ex=ttl_s)


async def unlink_matching(client: aioredis.Redis, pattern: str, chunk: int = 2000) -> int:
    """Delete every key matching `pattern` (SCAN, then UNLINK in chunks: no KEYS, no long block); the count."""
    n, keys = 0, []
    async for key in client.scan_iter(match=pattern, count=chunk):
        keys.append(key)
        if len(keys) >= chunk:
            n += await client.unlink(*keys)
            keys.clear()
    if keys:
        n += await client.unlink(*keys)
    return n
