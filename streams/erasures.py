"""Erasure on request, the I/O: the erasures topic (record, follow, read), the session-table tombstone,
and `erase`, the one job behind `recstream erase` and DELETE /api/v1/admin/users/{id}.

What `erase` does, in this order, each step idempotent (a repeat is a no-op):
1. add the ids to the erased set in Redis (keys.ERASED): from here on the feature agents drop the
   shoppers' events, checked every batch;
2. delete their per-user keys (Store.erase_users: session, features, state, homepage cache, the
   vectors and offline features of every published version) and their A/B units, recent lists and
   impressions (AttributionStore.erase_users): the next request treats them as unknown;
3. write a tombstone for their session-table key on the table's changelog (the feature worker that
   owns the partition deletes the row from its RocksDB too, when it reads step 4's record);
4. record the erasure on the compacted erasures topic, keyed and partitioned like the clickstream:
   the feature worker holding the shopper's session deletes the row (and the keys it writes again,
   closing the race with a batch it was folding), the attribution worker and the archive worker keep the id in a
   set and drop later records, the archive worker rewrites its files without the shopper, and every
   later training run filters the shopper's events out of its window (`read_erased`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import cast

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from recstream.privacy import ErasureReport, pseudonym
from recstream.settings import Settings
from schemas import Erasure, SchemaError
from streams.attribution_store import AttributionStore
from streams.producer import create_producer, owner_partition
from streams.redisconn import AnyRedis, is_cluster
from streams.store import Store
from streams.topics import ensure_topics, spec

log = logging.getLogger(__name__)

SESSION_TABLE = "user-sessions"   # agents/features.py's table; its changelog is "<app_id>-user-sessions-changelog"


def changelog_topic(s: Settings) -> str:
    return f"{s.app_id}-{SESSION_TABLE}-changelog"


async def erase(s: Settings, store: Store, client: AnyRedis, user_ids: Sequence[str], *, source: str = "cli",
                producer: AIOKafkaProducer | None = None, hashed: bool = False) -> ErasureReport:
    """Erase `user_ids` (raw ids: hashed with RECSTREAM_USER_ID_KEY first, unless `hashed`) from the
    online store, the session table and every later consumer; the archive is left to `rewrite_archive`
    (streams/archive_erasure.py: the CLI runs it here, the archive worker on reading the record)."""
    users = tuple(sorted({u if hashed else pseudonym(u, s.user_id_key) for u in user_ids}))
    new = await store.mark_erased(users)
    redis_keys = await store.erase_users(users, s.erasure_cpu_share)
    # The A/B worker's keys live on one Redis (streams/attribution_store.py): the same client's, unless the
    # feature store is a cluster; then the attribution worker deletes them when it reads the record.
    ab_keys = 0 if is_cluster(client) else await AttributionStore(cast(aioredis.Redis, client),
                                                                   s.redis_namespace).erase_users(users, s.erasure_cpu_share)
    own = producer is None
    producer = producer or create_producer(s)
    if own:
        await producer.start()
    try:
        await ensure_topics(s, [spec(s, "erasures")])
        tombstones = await write_tombstones(s, producer, users)
        now = time.time()
        acks = [await producer.send(s.topic("erasures"), Erasure(user_id=u, erased_at=now, source=source).to_json(),
                                    key=u.encode()) for u in users]
        await asyncio.gather(*acks)
    finally:
        if own:
            await producer.stop()
    log.info("erased %d shoppers (%d new): %d Redis keys, %d A/B keys, %d tombstones", len(users), new, redis_keys,
             ab_keys, tombstones)
    return ErasureReport(users, redis_keys, new, ab_keys, tombstones, s.topic("erasures"))


async def erase_here(s: Settings, user_ids: Sequence[str], *, archive: bool = True, hashed: bool = False,
                     say: Callable[[str], None] = print) -> ErasureReport:
    """`recstream erase`: `erase` on its own connections, then, with `archive` and an archive on this
    machine, the archive's rewrite in this process with its progress (the archive worker does the
    same when it reads the record: the second of the two finds nothing to do)."""
    from dataclasses import replace

    from streams.archive import dataset_dir
    from streams.archive_erasure import rewrite_without
    from streams.online_store import open_store
    from streams.redisconn import connect

    client = connect(s)
    try:
        report = await erase(s, open_store(s, client), client, user_ids, source="cli", hashed=hashed)
    finally:
        await client.aclose()
    say(f"[erase] {len(report.users)} shoppers: {report.redis_keys} Redis keys and {report.ab_keys} A/B keys deleted, "
        f"{report.tombstones} session-table tombstones, recorded on {report.topic}")
    root = dataset_dir(s)
    if archive and root.exists():
        done = await asyncio.to_thread(rewrite_without, root, report.users, progress_printer(say),
                                       s.erasure_cpu_share)
        report = replace(report, archive=done.to_json())
    return report


async def write_tombstones(s: Settings, producer: AIOKafkaProducer, users: Sequence[str]) -> int:
    """A tombstone (null value) per user on the session table's changelog, on the partition the table
    keeps the user's row in (the owner partition of the user id, agents/features.py), with the key as
    Faust serialises a str key (JSON). None when no feature worker ever made the changelog."""
    topic = changelog_topic(s)
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        if topic not in set(await admin.list_topics()):
            return 0
    finally:
        await admin.close()
    acks = [await producer.send(topic, None, key=orjson.dumps(u), partition=owner_partition(u.encode(),
                                                                                            s.clickstream_partitions))
            for u in users]
    await asyncio.gather(*acks)
    return len(acks)


class ErasureFollower:
    """Every record of the erasures topic, read by a consumer of no group (every process needs them all):
    `catch_up` reads to the end offsets of the moment, `poll` returns the ids that arrived since."""

    def __init__(self, s: Settings):
        self.s = s
        self.topic = s.topic("erasures")
        self.ids: set[str] = set()
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        await ensure_topics(self.s, [spec(self.s, "erasures")])
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.s.kafka_bootstrap, enable_auto_commit=False,
                                          auto_offset_reset="earliest")
        await self._consumer.start()
        try:
            parts = await _partitions(self.s, self.topic)
            self._consumer.assign([TopicPartition(self.topic, p) for p in sorted(parts)])
            await self._consumer.seek_to_beginning()
        except BaseException:
            await self._consumer.stop()
            raise

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def catch_up(self, timeout_s: float = 30.0) -> set[str]:
        """Read to the end offsets of now; the new ids."""
        assert self._consumer is not None
        tps = list(self._consumer.assignment())
        ends = await self._consumer.end_offsets(tps) if tps else {}
        new: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while [tp for tp, end in ends.items() if await self._consumer.position(tp) < end]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.topic}: not read to its end within {timeout_s} s")
            new |= await self.poll(200)
        return new

    async def poll(self, timeout_ms: int = 0) -> set[str]:
        """The ids of the records fetched now (at most `timeout_ms` of waiting), added to `ids`; the new ones."""
        assert self._consumer is not None
        batch = await self._consumer.getmany(timeout_ms=timeout_ms)
        new = set()
        for msgs in batch.values():
            for m in msgs:
                if m.value is None:
                    continue   # (a tombstone on the topic: nothing to honour, the record it replaced is gone)
                try:
                    u = Erasure.from_json(m.value).user_id
                except SchemaError as exc:
                    log.warning("%s[%d]@%d: not an erasure record (%s); skipped", m.topic, m.partition, m.offset, exc)
                    continue
                if u not in self.ids:
                    new.add(u)
        self.ids |= new
        return new


async def _partitions(s: Settings, topic: str, timeout_s: float = 30) -> list[int]:
    """The partitions of `topic` as the brokers describe it (a consumer's metadata knows only its own topics)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            found = [p["partition"] for d in await admin.describe_topics([topic]) if not d["error_code"]
                     for p in d["partitions"]]
            if found or time.monotonic() > deadline:
                return sorted(found)
            await asyncio.sleep(0.2)   # (a topic made a moment ago: metadata settles)
    finally:
        await admin.close()


async def read_erased(s: Settings, store: Store | None = None) -> set[str]:
    """Every erased id: the erasures topic read to its end, with the Redis copy (keys.ERASED) where a
    store is given (either can be behind the other for a moment during an erasure)."""
    follower = ErasureFollower(s)
    await follower.start()
    try:
        await follower.catch_up()
    finally:
        await follower.stop()
    return follower.ids | (await store.erased_users() if store is not None else set())


def progress_printer(say: Callable[[str], None], every: int = 200) -> Callable[[int, int, int], None]:
    """A progress callback for the archive rewrite: (files done, files in all, rows removed) -> a line
    every `every` files and at the end."""
    def report(done: int, total: int, removed: int) -> None:
        if done == total or done % every == 0:
            say(f"[erase] archive: {done}/{total} files scanned, {removed} rows removed")
    return report
