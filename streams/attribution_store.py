"""The A/B attribution worker's store (streams/attribution.py): its reads, and its one transaction a
batch, over the keys of recstream.features.keys.AttributionKeys (listed in streams/attribution.py).

One Redis, not a cluster: the transaction spans many keys (MULTI/EXEC), offsets included, so a batch's
counts and the offsets it read up to are written together or not at all.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import TopicPartition

from recstream.experiments.assignment import unit_for
from recstream.experiments.attribution import (
    FLOAT_FIELDS,
    SEEN_TTL_S,
    Changes,
    Impression,
    State,
    UnitTotals,
    VariantTotals,
    is_outcome,
    needed_impressions,
    needed_recent,
    recent_from_json,
    recent_to_json,
)
from recstream.features import keys
from schemas import Event, Exposure
from streams.online_store import publish_snapshot, unlink_keys
from streams.redisconn import scan

UNIT_TTL_S = 90 * 86400   # a unit silent this long starts again from zero


def offset_field(tp: TopicPartition) -> str:
    return f"{tp.topic}:{tp.partition}"


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


class AttributionStore:
    def __init__(self, client: aioredis.Redis, namespace: str):
        self.redis, self.keys = client, keys.AttributionKeys(namespace)

    async def offsets(self) -> dict[TopicPartition, int]:
        """The next offset to read per partition, as the last transaction stored it."""
        out = {}
        for k, v in (await self.redis.hgetall(self.keys.offsets)).items():
            topic, _, partition = _text(k).rpartition(":")
            out[TopicPartition(topic, int(partition))] = int(v)
        return out

    async def totals(self, experiment_id: str) -> dict[str, VariantTotals]:
        """variant -> VariantTotals of one experiment ("_all" for every exposure)."""
        k = self.keys
        variants = sorted(_text(v) for v in await self.redis.smembers(k.variants(experiment_id)))
        pipe = self.redis.pipeline(transaction=False)
        for v in variants:
            pipe.hgetall(k.tot(experiment_id, v))
        return {v: VariantTotals.from_fields(h) for v, h in zip(variants, await pipe.execute())}

    async def daily(self, experiment_id: str) -> dict[str, dict[str, VariantTotals]]:
        """variant -> UTC day "YYYY-MM-DD" -> that day's increments (cumulative sums give as-of totals)."""
        k = self.keys
        variants = sorted(_text(v) for v in await self.redis.smembers(k.variants(experiment_id)))
        pipe = self.redis.pipeline(transaction=False)
        for v in variants:
            pipe.smembers(k.days(experiment_id, v))
        days = {v: sorted(map(_text, d)) for v, d in zip(variants, await pipe.execute())}
        pipe = self.redis.pipeline(transaction=False)
        for v in variants:
            for d in days[v]:
                pipe.hgetall(k.day(experiment_id, v, d))
        hashes = iter(await pipe.execute())
        return {v: {d: VariantTotals.from_fields(next(hashes)) for d in days[v]} for v in variants}

    async def publish_metrics(self, key: str, index: str, snapshot: dict[str, Any], ttl_s: int) -> None:
        await publish_snapshot(self.redis, key, index, snapshot, ttl_s)

    async def load(self, records: list[Exposure | Event], window: float) -> State:
        """What the pure step needs of the stored state for `records`, in three pipelined reads."""
        k = self.keys
        event_ids = sorted({r.event_id for r in records if isinstance(r, Event) and is_outcome(r)})
        shoppers = sorted(needed_recent(records))
        pipe = self.redis.pipeline(transaction=False)
        for eid in event_ids:
            pipe.exists(k.seen(eid))
        for u in shoppers:
            pipe.get(k.recent(u))
        got = await pipe.execute()
        seen = {eid for eid, n in zip(event_ids, got) if n}
        recent = {u: recent_from_json(raw) for u, raw in zip(shoppers, got[len(event_ids):]) if raw}
        rids = sorted(needed_impressions(records, recent, window))
        pipe = self.redis.pipeline(transaction=False)
        for rid in rids:
            pipe.get(k.imp(rid))
        impressions = {rid: Impression.from_json(rid, raw) for rid, raw in zip(rids, await pipe.execute()) if raw}
        units = {(e, v, imp.unit) for imp in impressions.values() for e, v in imp.arms}
        units |= {(e, v, x.unit) for x in records if isinstance(x, Exposure) for e, v in Impression.of(x).arms}
        units_list = sorted(units)
        pipe = self.redis.pipeline(transaction=False)
        for key in units_list:
            pipe.hgetall(k.unit(*key))
        unit_totals = {key: UnitTotals.from_fields(h) for key, h in zip(units_list, await pipe.execute()) if h}
        return State(seen=seen, impressions=impressions, recent=recent, units=unit_totals)

    async def erase_users(self, users: Sequence[str], share: float = 1.0) -> int:
        """Forget `users`' A/B data: their impressions (abx:imp: naming them as shopper or unit), the units
        of those impressions and their own (u:<id>), and their recent lists. The per-variant totals
        and days (abx:tot:, abx:day:) stay: aggregates of every unit, no one's data. Two SCANs (units,
        impressions), whatever the number of users, each busy at most `share` of the time
        (redisconn.scan). The count of keys deleted."""
        k, wanted = self.keys, set(users)
        if not wanted:
            return 0
        units = {unit_for(u) for u in wanted}
        gone: list[str | bytes] = []
        names: list[bytes] = [key async for key in scan(self.redis, k.imp_pattern, share=share)]
        for i in range(0, len(names), 1000):
            chunk = names[i:i + 1000]
            for name, raw in zip(chunk, await self.redis.mget(chunk)):
                if raw is None:
                    continue
                d = orjson.loads(raw)
                if d.get("shopper") in wanted or d.get("unit") in units:
                    gone.append(name)
                    units.add(d.get("unit"))
        async for key in scan(self.redis, k.unit_pattern, share=share):
            if k.unit_of(_text(key)) in units:
                gone.append(key)
        gone += [k.recent(x) for x in wanted | units]
        return await unlink_keys(self.redis, gone)

    async def write(self, ch: Changes, offsets: Mapping[TopicPartition, int], ttl_s: int) -> None:
        """The step's changes and the next offsets in one MULTI/EXEC: all of it, or none."""
        k = self.keys
        tx = self.redis.pipeline(transaction=True)   # MULTI ... EXEC: all of it, offsets included, or none
        for rid, imp in ch.impressions.items():
            if rid in ch.new_impressions:
                tx.set(k.imp(rid), imp.to_json(), ex=ttl_s)
            else:
                tx.set(k.imp(rid), imp.to_json(), keepttl=True)
        for shopper, entries in ch.recent.items():
            tx.set(k.recent(shopper), recent_to_json(entries), ex=ttl_s)
        for key, u in ch.units.items():
            tx.hset(k.unit(*key), mapping=u.to_fields())
            tx.expire(k.unit(*key), UNIT_TTL_S)
        for (exp, variant), inc in ch.totals.items():
            _increment(tx, k.tot(exp, variant), inc)
            tx.sadd(k.variants(exp), variant)
            tx.sadd(k.experiments, exp)
        for (exp, variant, day), inc in ch.daily.items():
            _increment(tx, k.day(exp, variant, day), inc)
            tx.sadd(k.days(exp, variant), day)
        for eid in ch.seen:
            tx.set(k.seen(eid), 1, ex=SEEN_TTL_S)
        if offsets:
            tx.hset(k.offsets, mapping={offset_field(tp): off for tp, off in offsets.items()})
        await tx.execute()


def _increment(tx: Any, key: str, inc: Mapping[str, float]) -> None:
    for f, v in inc.items():
        if not v:
            continue
        if f in FLOAT_FIELDS:
            tx.hincrbyfloat(key, f, v)
        else:
            tx.hincrby(key, f, int(v))


async def read_totals(client: aioredis.Redis, ns: str, experiment_id: str) -> dict[str, VariantTotals]:
    return await AttributionStore(client, ns).totals(experiment_id)


async def read_daily(client: aioredis.Redis, ns: str, experiment_id: str) -> dict[str, dict[str, VariantTotals]]:
    return await AttributionStore(client, ns).daily(experiment_id)


async def read_offsets(client: aioredis.Redis, ns: str) -> dict[TopicPartition, int]:
    return await AttributionStore(client, ns).offsets()
