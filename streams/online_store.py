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
"""
from __future__ import annotations

from typing import Iterable, Mapping

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
