"""The online store on one Redis (RedisStore): atomic, offset-guarded batch writes and the reads serving
needs; open_store picks it or its Redis Cluster subclass (streams/cluster_store.py) for a client.

Key layout (built by recstream/features/keys.py, the single source; each behind the settings'
namespace). Braces are literal: they are Redis Cluster hash tags, so one user's keys share a slot,
one item's keys share a slot, and the global keys share the slot of {g}. One layout, single Redis or cluster.
  user_session:{u1}          string, JSON list of the session's last products, newest first; TTL = session idle
  user_features:{u1}         hash (session_id, last_viewed, session_categories, cart_items, purchases, ...)
  user_state:{u1}            string, JSON: the feature agents' whole session state (the session table's row)
  homecache:{u1}:{variants}:{count}:{device}:{page}  a homepage reply, valid while the user's event count
                             and the model version are unchanged
  item_features:{p9}         hash (title, category, category_path, brand, price, in_stock, rating, ...)
  covis:{p9}                 zset product -> co-views in a session ("customers also viewed"), bounded
  cobuy:{p9}                 zset product -> co-purchases in a session ("frequently bought together"), bounded
  pop:{g}:{event_type}:{day} zset product -> events that UTC day; expires when out of every window
  popcat:{g}:{category}:{day}  zset product -> weighted events that day within the category
  trend:{g}:{landmark}       zset product -> forward-decayed weight (see features/popularity.py)
  trend:{g}:cat:{cat}:{landmark}  the same per category
  oos:{g}                    set of products out of stock (one SMISMEMBER answers a whole candidate list)
  brand:{g}:{brand}          zset product -> rating: "more from this brand"
  applied:{g}:{group}:{topic}:{partition}  highest clickstream offset whose increments are all applied
  applied:{tag}              cluster only: hash group:topic:partition -> highest offset applied to that tag's keys
Written by the trainer (batch/publish.py): model:{g}:current, emb:user|item:{version}:{id}, uoff:{version}:{u1},
ioff:{version}:{p9} (each vector in its user's or item's slot).

Writes, exactly once: one script per batch checks and advances the partitions' applied offsets with
all the increments (apply_batch.lua). On a cluster a script may only touch one slot: RedisClusterStore
applies a batch per hash tag, each group under its own guard (streams/cluster_store.py).
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from recstream.candidates import Read
from recstream.features import keys, popularity
from recstream.features.plan import RedisOps
from recstream.features.session import UserState, decode_features, decode_state, features_key, session_key
from recstream.settings import Settings
from schemas import Product
from streams.redisconn import AnyRedis, is_cluster, scan, score_pairs
from streams.store import BatchFold, OffsetConflict, RankingReads, RetrievalReads, decode_vector, item_fields

__all__ = ["OffsetConflict", "RankingReads", "RedisStore", "RetrievalReads", "decode_vector", "item_fields",
           "open_store", "unlink_keys", "unlink_matching"]

LUA = Path(__file__).resolve().parent / "lua"
PUBLISH_CHUNK = 1000   # commands per round trip of a publish: small enough not to stall Redis for serving reads


def lua(name: str) -> str:
    """A script of streams/lua/, with writes.lua spliced in where it says "-- @writes"."""
    return (LUA / name).read_text().replace("-- @writes\n", (LUA / "writes.lua").read_text())


def open_store(s: Settings, client: AnyRedis, *, namespace: str | None = None, group: str | None = None,
               topic: str | None = None) -> RedisStore:
    """The store on `client`: RedisClusterStore on a cluster client, else RedisStore. Offsets are those of
    consumer group `group` (the app id) on `topic` (the clickstream); keys under `namespace` (the settings')."""
    from streams.cluster_store import RedisClusterStore  # (it subclasses RedisStore: imported here, not above)

    args = (s.redis_namespace if namespace is None else namespace, group or s.app_id, topic or s.topic("clickstream"))
    return RedisClusterStore(client, *args) if is_cluster(client) else RedisStore(client, *args)


class RedisStore(BatchFold):
    """The store on one Redis: a batch's writes and its partition offsets in one script (apply_batch.lua)."""

    def __init__(self, client: AnyRedis, namespace: str, group: str, topic: str):
        self.redis = client
        self.ns = namespace
        self.offsets_prefix = namespace + keys.applied_prefix(group, topic)
        self.oos = namespace + keys.OOS   # also the routing key of the global-slot scripts
        self._apply = client.register_script(lua("apply_batch.lua"))
        self._stats = client.register_script(lua("candidate_stats.lua"))
        self._item_rows = client.register_script(lua("item_rows.lua"))

    # -- writes ----------------------------------------------------------------------------------
    async def apply(self, ops: RedisOps) -> None:
        """A batch's writes, atomically with its offsets (one script)."""
        result = await self._apply(args=[orjson.dumps(ops.as_payload()), self.offsets_prefix, self.ns])
        if result[0] == b"conflict":
            raise OffsetConflict(f"partition {result[1].decode()} already applied up to {result[2].decode()}")

    async def user_states(self, user_ids: Sequence[str]) -> dict[str, UserState]:
        """The session states Redis holds (user_state), for the users that have one."""
        if not user_ids:
            return {}
        names = [self.ns + keys.user_state(u) for u in user_ids]
        raw = await self._mget(names)
        return {u: st for u, r in zip(user_ids, raw) if (st := decode_state(r)) is not None}

    async def _mget(self, names: list[str]) -> list[Any]:
        return await self.redis.mget(names)

    async def applied_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        parts = sorted(set(partitions))
        values = await self.redis.mget([self.offsets_prefix + str(p) for p in parts]) if parts else []
        return {p: int(v) if v is not None else -1 for p, v in zip(parts, values)}

    async def write_items(self, products: Iterable[Product]) -> int:
        pipe = self.redis.pipeline(transaction=False)
        n = 0
        for p in products:
            pipe.hset(self.ns + keys.item_features(p.product_id), mapping=item_fields(p))
            if p.in_stock:
                pipe.srem(self.oos, p.product_id)
            else:
                pipe.sadd(self.oos, p.product_id)
            pipe.zadd(self.ns + keys.brand(p.brand), {p.product_id: p.rating or 0.0})
            n += 1
        await pipe.execute()
        return n

    # -- the trainer's publication ------------------------------------------------------------------
    async def write_version(self, version: str, vectors: Iterable[tuple[str, str, bytes]],
                            offline: Iterable[tuple[str, str, dict[str, str]]]) -> int:
        """Every key of `version` but the pointer: `vectors` (kind 'user' or 'item', id, float32 bytes) and
        `offline` features (kind, id, hash fields); PUBLISH_CHUNK commands a round trip. The number written."""
        n = 0
        pipe = self.redis.pipeline(transaction=False)
        writes: Iterable[tuple[str, str, bytes | dict[str, str]]] = itertools.chain(vectors, offline)
        for kind, entity, value in writes:
            if isinstance(value, bytes):
                pipe.set(self.ns + keys.embedding(kind, version, entity), value)
            else:
                offline_key = keys.user_offline if kind == "user" else keys.item_offline
                pipe.hset(self.ns + offline_key(version, entity), mapping=value)
            n += 1
            if len(pipe) >= PUBLISH_CHUNK:
                await pipe.execute()
                pipe = self.redis.pipeline(transaction=False)
        await pipe.execute()
        return n

    async def set_model_pointer(self, pointer: dict[str, Any]) -> None:
        await self.redis.set(self.ns + keys.MODEL_CURRENT, orjson.dumps(pointer))

    async def remove_version(self, version: str) -> None:
        """Every key of `version` but the pointer (a publish that failed half way)."""
        for pattern in keys.published(version):
            await unlink_matching(self.redis, self.ns + pattern)

    async def remove_versions_except(self, keep: set[str | None]) -> list[str]:
        """The keys of every published version not in `keep`; the versions removed."""
        removed: set[str] = set()
        for pattern in keys.published():
            batch = []
            async for key in scan(self.redis, self.ns + pattern):
                version = keys.published_version(key.decode()[len(self.ns):])
                if version is not None and version not in keep:   # (every key the pattern matches has one)
                    batch.append(key)
                    removed.add(version)
                if len(batch) >= PUBLISH_CHUNK:
                    await unlink_keys(self.redis, batch)
                    batch = []
            await unlink_keys(self.redis, batch)
        return sorted(removed)

    # -- erasure ---------------------------------------------------------------------------------
    async def mark_erased(self, user_ids: Sequence[str]) -> int:
        """Add the ids to the erased set (keys.ERASED); how many were not in it."""
        return int(await self.redis.sadd(self.ns + keys.ERASED, *user_ids)) if user_ids else 0

    async def erased(self, user_ids: Iterable[str]) -> set[str]:
        """Those of `user_ids` that are erased (one SMISMEMBER)."""
        ids = sorted(set(user_ids))
        if not ids:
            return set()
        return {u for u, hit in zip(ids, await self.redis.smismember(self.ns + keys.ERASED, ids)) if hit}

    async def erased_users(self) -> set[str]:
        return {m.decode() if isinstance(m, bytes) else m for m in await self.redis.smembers(self.ns + keys.ERASED)}

    async def forget_users(self, user_ids: Sequence[str]) -> int:
        """Delete the per-user keys with a fixed name (keys.user_keys: what the feature agents write) of
        `user_ids`; the count deleted."""
        return await unlink_keys(self.redis, [self.ns + k for u in sorted(set(user_ids)) for k in keys.user_keys(u)])

    async def erase_users(self, user_ids: Sequence[str], share: float = 1.0) -> int:
        """Delete every per-user key of `user_ids`: the fixed ones by name (forget_users), then one SCAN
        per pattern of keys.user_patterns (the homepage cache, every version's vectors and offline
        features) keeping those whose hash tag is one of the users, each pass busy at most `share` of
        the time (redisconn.scan). The count deleted. One pass per pattern whatever the number of
        users, so erase many at once."""
        users = set(user_ids)
        if not users:
            return 0
        n = await self.forget_users(sorted(users))
        for pattern in keys.user_patterns():
            found = []
            async for key in scan(self.redis, self.ns + pattern, share=share):
                name = key.decode() if isinstance(key, bytes) else key
                if keys.hash_tag(name[len(self.ns):]) in users:
                    found.append(key)
            n += await unlink_keys(self.redis, found)
        return n

    # -- reads -----------------------------------------------------------------------------------
    async def categories(self, product_ids: Iterable[str]) -> dict[str, str]:
        ids = sorted(set(product_ids))
        if not ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for pid in ids:
            pipe.hget(self.ns + keys.item_features(pid), "category")
        return {pid: c.decode() for pid, c in zip(ids, await pipe.execute()) if c}

    async def user_session(self, user_id: str) -> list[str]:
        raw = await self.redis.get(self.ns + session_key(user_id))
        return orjson.loads(raw) if raw else []

    async def user_features(self, user_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hgetall(self.ns + features_key(user_id))
        return decode_features(raw) if raw else None

    async def item_features(self, product_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.ns + keys.item_features(product_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def neighbours(self, kind: str, product_id: str, n: int = 20) -> list[tuple[str, float]]:
        """kind 'covis' (also viewed) or 'cobuy' (bought together): best first."""
        rows = await self.redis.zrevrange(self.ns + keys.neighbours(kind, product_id), 0, n - 1, withscores=True)
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
        lists = [(w, score_pairs(await self.redis.execute_command(
                     "ZREVRANGE", self.ns + popularity.trend_key(lm, category), 0, 4 * n - 1, "WITHSCORES")))
                 for lm, w in popularity.trend_read_weights(now, half_life_s).items()]
        return popularity.merge_trend(lists, n)

    # -- serving reads -----------------------------------------------------------------------------
    async def candidate_reads(self, reads: Sequence[Read], now: float, half_life_s: float) -> list[list[tuple[str, float]]]:
        """The lists the candidate stage asked for (recstream.candidates.plan), in one round trip, each best
        first as ZREVRANGE gives it (ties: member descending). Trending sums the current and previous
        landmark's scores decayed to `now`, each read 2n deep, and keeps the best n."""
        pipe = self.redis.pipeline(transaction=False)
        weights = popularity.trend_read_weights(now, half_life_s)
        for rd in reads:   # (the raw command: redis-py's zrevrange(withscores=True) formats and parses every score)
            if rd.table == "trend":
                for lm in weights:
                    pipe.execute_command("ZREVRANGE", self.ns + popularity.trend_key(lm, rd.key), 0, 2 * rd.n - 1,
                                         "WITHSCORES")
            else:
                key = keys.brand(rd.key) if rd.table == "brand" else keys.neighbours(rd.table, rd.key)
                pipe.execute_command("ZREVRANGE", self.ns + key, 0, rd.n - 1, "WITHSCORES")
        res = iter(await pipe.execute() if reads else [])
        out = []
        for rd in reads:
            if rd.table == "trend":
                out.append(popularity.merge_trend([(w, score_pairs(next(res))) for w in weights.values()], rd.n))
            else:
                out.append(score_pairs(next(res)))
        return out

    async def in_stock(self, product_ids: Sequence[str]) -> list[bool]:
        if not product_ids:
            return []
        return [not x for x in await self.redis.smismember(self.oos, list(product_ids))]

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

    def _item_args(self, product_ids: list[str], fields: Sequence[str]) -> list[bytes | str]:
        prefix, suffix = keys.item_features("\0").split("\0")
        return [orjson.dumps(product_ids), orjson.dumps(list(fields)), self.ns + prefix, suffix]

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
                            window_days: int, half_life_s: float) -> RankingReads:
        """Everything the ranking agent reads for one candidate set, in one round trip: stock of every
        candidate; catalogue fields and popularity counts of those its caches miss; the user's state."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.scripts.update((self._item_rows, self._stats))   # loaded first if Redis lost them (restart)
        if item_misses:
            pipe.evalsha(self._item_rows.sha, 0, *self._item_args(item_misses, fields))
        if product_ids:   # (SMISMEMBER needs at least one member: an empty candidate set reads no stock)
            pipe.smismember(self.oos, product_ids)
        if stat_misses:
            pipe.evalsha(self._stats.sha, 1, self.oos, *self._stats_args(stat_misses, now, window_days, half_life_s))
        if user_id:
            self._queue_user_reads(pipe, user_id, version)
        res = await pipe.execute()
        rows = self._item_result(res.pop(0), len(fields)) if item_misses else []
        in_stock = [not x for x in res.pop(0)] if product_ids else []
        pop, bought, trend = self._stats_result(res.pop(0)) if stat_misses else (np.zeros(0),) * 3
        return self._with_user(RankingReads(rows, in_stock, pop, bought, trend), res if user_id else None)

    def _queue_user_reads(self, pipe: Any, user_id: str, version: str | None) -> None:
        pipe.hgetall(self.ns + features_key(user_id))
        pipe.get(self.ns + session_key(user_id))
        pipe.hgetall(self.ns + keys.user_offline(str(version), user_id))

    @staticmethod
    def _with_user(out: RankingReads, res: list[Any] | None) -> RankingReads:
        if res is None:
            return out
        feats, session, offline = res[:3]
        out.features = decode_features(feats) if feats else None
        out.recent = orjson.loads(session) if session else []
        d = {k.decode(): v.decode() for k, v in offline.items()}
        out.affinity = orjson.loads(d.get("category_affinity", "{}"))
        out.median_price = float(d["median_price"]) if d.get("median_price") else None
        return out

    async def retrieval_reads(self, user_id: str | None, anchors: Sequence[str], version: str | None) -> RetrievalReads:
        """The shopper's vector of `version`, session and features, and each anchor's vector and item
        features: one pipelined round trip (by node on a cluster)."""
        pipe = self.redis.pipeline(transaction=False)
        if user_id:
            pipe.get(self.ns + keys.embedding("user", str(version), user_id))
            pipe.get(self.ns + session_key(user_id))
            pipe.hgetall(self.ns + features_key(user_id))
        for a in anchors:
            pipe.get(self.ns + keys.embedding("item", str(version), a))
            pipe.hgetall(self.ns + keys.item_features(a))
        res = await pipe.execute()
        out = RetrievalReads()
        if user_id:
            raw_user, raw_session, raw_feats = res[:3]
            res = res[3:]
            out.user_vector = decode_vector(raw_user)
            out.session = orjson.loads(raw_session) if raw_session else []
            out.features = decode_features(raw_feats) if raw_feats else None
        out.anchor_vectors = [decode_vector(x) for x in res[0::2]]
        out.anchor_items = [{k.decode(): v.decode() for k, v in h.items()} for h in res[1::2]]
        return out

    async def serving_path(self, forget_after_s: float, now: float) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
        """The serving agents' reports (keys.AGENTS) and the model pointer, in one round trip; reports
        older than `forget_after_s` are removed."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.ns + keys.AGENTS)
        pipe.get(self.ns + keys.MODEL_CURRENT)
        raw, pointer = await pipe.execute()
        reports = {k.decode(): orjson.loads(v) for k, v in raw.items()}
        gone = [k for k, rep in reports.items() if now - float(rep.get("ts") or 0.0) > forget_after_s]
        if gone:
            await self.redis.hdel(self.ns + keys.AGENTS, *gone)
        return reports, orjson.loads(pointer) if pointer else None

    async def report_agent(self, name: str, ts: float, model_version: str | None) -> None:
        """A serving agent ("group:host:pid") is alive at `ts`, serving `model_version` (keys.AGENTS)."""
        await self.redis.hset(self.ns + keys.AGENTS, name, orjson.dumps({"ts": ts, "model_version": model_version}))

    async def forget_agent(self, name: str) -> None:
        await self.redis.hdel(self.ns + keys.AGENTS, name)

    async def existing_items(self, product_ids: Sequence[str]) -> set[str]:
        """The products that have item features (the catalogue knows them)."""
        pipe = self.redis.pipeline(transaction=False)
        for x in product_ids:
            pipe.exists(self.ns + keys.item_features(x))
        return {x for x, n in zip(product_ids, await pipe.execute()) if n}

    async def publish_metrics(self, key: str, index: str | None, snapshot: dict[str, Any], ttl_s: int) -> None:
        """A worker's metrics snapshot under `key` (expiring), listed in the sorted set `index` if given."""
        await publish_snapshot(self.redis, key, index, snapshot, ttl_s)

    async def model_pointer(self) -> dict[str, Any] | None:
        raw = await self.redis.get(self.ns + keys.MODEL_CURRENT)
        return orjson.loads(raw) if raw else None

    async def embeddings(self, kind: str, version: str, ids: Sequence[str]) -> list[np.ndarray | None]:
        """kind 'user' or 'item': the published vectors of `version` (None where there is none)."""
        if not ids:
            return []
        names = [self.ns + keys.embedding(kind, version, x) for x in ids]
        raw = await self._mget(names)
        return [decode_vector(r) for r in raw]

    def homepage_key(self, user_id: str, variants: str, count: int, device: str, page: str) -> str:
        return self.ns + keys.homecache(user_id, variants, count, device, page)

    async def homepage_cached(self, key: str, user_id: str) -> tuple[bytes | None, str]:
        """(the cached reply if still valid, its tag now: the user's event count and the published
        model version). A reply is valid while both are what they were when it was computed: any
        new event of the user, or a new model (a training run, an A/B promotion), invalidates it."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(key)
        pipe.hget(self.ns + features_key(user_id), "events")
        pipe.get(self.ns + keys.MODEL_CURRENT)
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


async def unlink_matching(client: AnyRedis, pattern: str, chunk: int = 2000) -> int:
    """Delete every key matching `pattern` (SCAN, then UNLINK in chunks: no KEYS, no long block); the count.
    On a cluster SCAN visits every master."""
    n, found = 0, []
    async for key in scan(client, pattern):
        found.append(key)
        if len(found) >= chunk:
            n += await unlink_keys(client, found)
            found.clear()
    if found:
        n += await unlink_keys(client, found)
    return n


async def publish_snapshot(client: AnyRedis, key: str, index: str | None, snapshot: dict[str, Any], ttl_s: int) -> None:
    """`snapshot` under `key` (expiring after `ttl_s`), listed in the sorted set `index` (score: now) if given,
    which expires with it: every worker kind's metrics (Store.publish_metrics, the attribution store)."""
    pipe = client.pipeline(transaction=False)
    pipe.set(key, orjson.dumps(snapshot), ex=ttl_s)
    if index:
        pipe.zadd(index, {key: time.time()})
        pipe.expire(index, ttl_s)
    await pipe.execute()


UNLINK_CHUNK = 200   # keys per UNLINK: 3,000 in one command held Redis 16.6 ms (SLOWLOG) while serving waited


async def unlink_keys(client: AnyRedis, names: Sequence[bytes | str]) -> int:
    """UNLINK `names`: on a single Redis a command per UNLINK_CHUNK keys, one after the other, so the
    reads of serving get in between; on a cluster (keys in many slots) one each, pipelined."""
    if not names:
        return 0
    if not is_cluster(client):
        n = 0
        for i in range(0, len(names), UNLINK_CHUNK):
            n += await client.unlink(*names[i:i + UNLINK_CHUNK])
        return n
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.execute_command("UNLINK", name)   # (ClusterPipeline.unlink is a coroutine that queues nothing)
    return sum(await pipe.execute())
