"""The online store on a Redis Cluster: RedisStore with what differs where a script or MGET may touch one slot.

Writes, exactly once: a script may only touch one slot, so a batch is split by hash tag
(features/plan.py split_by_tag) and each group is applied by one script (apply_group.lua) that checks
and advances its own guard, applied:{tag}, in the same slot; the groups go pipelined. A group whose
guard is past the batch is skipped, one partly past is replanned from its guard (as one Redis replans
from the partition offsets); the partition offsets advance last. So a batch replayed after a crash
between groups applies exactly the groups that were missing.

Reads that span slots go per key, pipelined by node (item rows, user states, embeddings); the candidate
statistics script runs in the {g} slot, concurrently with the per-slot reads.
"""
from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from recstream.features import keys
from recstream.features.plan import BatchPlan, Incoming, Limits, RedisOps, plan, split_by_tag
from recstream.features.session import FeatureConfig, UserState
from streams.online_store import RedisStore, lua
from streams.store import OffsetConflict, RankingReads

GUARD_TTL_S = 30 * 86400   # a tag's guard outlives any redelivery by far (a replay starts at the committed offset)


class RedisClusterStore(RedisStore):
    redis: RedisCluster

    def __init__(self, client: RedisCluster, namespace: str, group: str, topic: str):
        super().__init__(client, namespace, group, topic)
        self.guard_field = keys.guard_field(group, topic, 0)[:-1]   # + partition
        self._apply_group = client.register_script(lua("apply_group.lua"))

    # -- writes ----------------------------------------------------------------------------------
    async def apply(self, ops: RedisOps) -> None:
        """A batch's writes, one script per hash tag, then the partition offsets."""
        conflicts = await self.apply_groups(split_by_tag(ops))
        if conflicts:
            tag, at = next(iter(conflicts.items()))
            raise OffsetConflict(f"{len(conflicts)} hash tags already applied in part, e.g. {tag!r} up to {at}")
        await self._advance(ops.offsets)

    async def _advance(self, offsets: Mapping[int, tuple[int, int]]) -> None:
        """The partition offsets, once every group is in (all in the {g} slot)."""
        if offsets:
            pipe = self.redis.pipeline(transaction=False)
            for p, (_, hi) in offsets.items():
                pipe.set(self.offsets_prefix + str(p), hi)
            await pipe.execute()

    async def _fold_planned(self, batch: list[Incoming], states: Mapping[str, UserState], applied: dict[int, int],
                            categories: Mapping[str, str], cfg: FeatureConfig, limits: Limits,
                            passed: Sequence[tuple[int, int]] = ()) -> BatchPlan:
        """Every hash tag's group under its own guard, then the partition offsets."""
        result = plan(batch, states, applied, categories, cfg, limits, passed)
        pending = split_by_tag(result.ops)
        done: set[str] = set()
        for _ in range(3):
            conflicts = await self.apply_groups(pending, done)
            if not conflicts:
                break
            pending = {}
            # one replan per distinct guard position ((partition, offset) pairs), not per tag
            by_guard: dict[tuple[tuple[int, int], ...], list[str]] = {}
            for tag, at in conflicts.items():
                by_guard.setdefault(tuple(sorted(at.items())), []).append(tag)
            # the process that moved a guard may have written newer states than we read
            states = await self.fresher(states, (i.event.user_id for i in batch))
            for guard, tags in by_guard.items():
                start = {**applied, **{p: max(o, applied.get(p, -1)) for p, o in guard}}
                again = plan(batch, states, start, categories, cfg, limits, passed)
                groups = split_by_tag(again.ops)
                pending.update({tag: groups[tag] for tag in tags if tag in groups})
                for user in set(tags) & set(states):   # a user's hash tag is the user id
                    result.states[user] = again.states.get(user, states[user])
        else:
            raise OffsetConflict("could not apply a batch's groups after 3 replans from their guards")
        if stale := done & {i.event.user_id for i in batch}:   # skipped: another process wrote those users
            result.states.update(await self.fresher({u: states.get(u, UserState()) for u in stale}))
        await self._advance(result.ops.offsets)
        return result

    async def apply_groups(self, groups: Mapping[str, RedisOps],
                           done: set[str] | None = None) -> dict[str, dict[int, int]]:
        """Apply each tag's group by its guarded script, pipelined (split by node); the groups in
        conflict, each with its guard (partition -> offset). Applied and skipped groups are left out;
        the tags of skipped ones (the guard already past the batch) go into `done`."""
        tags = list(groups)
        if not tags:
            return {}
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for tag in tags:
                # (redis-py blocks ClusterPipeline.evalsha by name; the command itself routes by its key)
                pipe.execute_command("EVALSHA", self._apply_group.sha, 1, self.ns + keys.guard(tag),
                                     orjson.dumps(groups[tag].as_payload()), self.guard_field, self.ns, GUARD_TTL_S)
            replies = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                # every master; the groups applied meanwhile answer 'done'
                await self.redis.script_load(self._apply_group.script)
                continue
            break
        conflicts = {}
        for tag, r in zip(tags, replies):
            if isinstance(r, Exception):
                raise r
            if r[0] == b"conflict":
                conflicts[tag] = {int(r[i]): int(r[i + 1]) for i in range(1, len(r), 2)}
            elif r[0] == b"done" and done is not None:
                done.add(tag)
        return conflicts

    # -- reads -----------------------------------------------------------------------------------
    async def _mget(self, names: list[str]) -> list[Any]:
        # a cluster cannot MGET across slots: mget_nonatomic sends one MGET per slot, pipelined by node
        return await self.redis.mget_nonatomic(names)

    async def item_rows(self, product_ids: list[str], fields: Sequence[str]) -> list[list[str | None]]:
        """Items live in many slots: one HMGET each, pipelined by node."""
        if not product_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for pid in product_ids:
            pipe.hmget(self.ns + keys.item_features(pid), list(fields))
        return [[v.decode() if v is not None else None for v in row] for row in await pipe.execute()]

    async def ranking_reads(self, product_ids: list[str], item_misses: list[str], fields: Sequence[str],
                            stat_misses: list[str], user_id: str | None, version: str | None, now: float,
                            window_days: int, half_life_s: float) -> RankingReads:
        """The global-slot script and a pipeline of per-slot reads, concurrently."""
        async def stats() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            if not stat_misses:
                return (np.zeros(0),) * 3
            raw = await self._stats(keys=[self.oos], args=self._stats_args(stat_misses, now, window_days, half_life_s))
            return self._stats_result(raw)

        async def per_slot() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for pid in item_misses:
                pipe.hmget(self.ns + keys.item_features(pid), list(fields))
            if product_ids:
                pipe.smismember(self.oos, product_ids)
            if user_id:
                self._queue_user_reads(pipe, user_id, version)
            return await pipe.execute() if (item_misses or product_ids or user_id) else []

        (pop, bought, trend), res = await asyncio.gather(stats(), per_slot())
        rows = [[v.decode() if v is not None else None for v in res.pop(0)] for _ in item_misses]
        in_stock = [not x for x in res.pop(0)] if product_ids else []
        return self._with_user(RankingReads(rows, in_stock, pop, bought, trend), res if user_id else None)
