"""Feature agents: clickstream -> user session table + Redis features; catalogue -> item features.

Thin edges around the pure core (recstream/features): decode, fetch what the core needs, call it,
write. Batches (streams.take.take_events) amortise Faust's per-event cost and Redis round trips; their
window is short while the agent keeps up and grows while it is behind (recstream.features.plan.batch_window).

Skipped records: a batch is checked for offsets the consumer never delivered (faust can skip a
record when it seeks during a rebalance: seen here as one lost event per moved partition in about
one rebalance test in four). Missing offsets are read again from Kafka and folded in their place
(recstream.features.plan.plan folds a batch in offset order), so every record reaches the features;
the check costs nothing while offsets follow on. A gap can open between two records of one batch
(delivered 815, skipped 816-818, delivered 819, after a rebalance's seek): folded after the refilled
818, the delivered 815 of the same user would read as a redelivery and be lost, Redis and table alike.

Lost table writes: Faust can drop the session-table write of a batch folded while its partition is
being revoked, though the batch's offsets are committed (seen for 1 user of 136 in about one
rebalance test in ten). Redis holds a copy of every state (user_state), written atomically with the
batch's features and offset guard, so before each fold the agent reads the copies of the batch's
users and folds on whichever of table row and copy has taken in more of the partition
(recstream.features.session.newest): the table lags at most until that user's next event, and
nothing the features hold is lost. The old owner may also still be folding after the new one read
its states (a zombie of the rebalance): its write moves the offset guard, the new owner's write
then meets it (streams.store.BatchFold.fold) and replans on the states the zombie wrote, so
neither overwrites the other's events (the new owner may have skipped one the zombie folded).

Partitioners: a shopper's session lives on the partition recstream's own producer picks for the user
id (murmur2, streams.producer.owner_partition). A record another client put elsewhere (librdkafka's
CRC32 default, a keyless or mis-keyed producer) is copied to that owner partition and acknowledged
there before its own offset can be committed, and the copy is folded like any record
(streams/reroute.py; `recstream_rerouted_records` counts them). Its offset still moves the guard, so
a redelivery or a refill does not copy it again. The session orders its items by event time
(recstream.features.session), so a copy that arrives after newer events still takes its place.

Erased shoppers (streams/erasures.py, README "Personal data"): every batch asks Redis which of its
users are erased (keys.ERASED, one SMISMEMBER, sent with the read of the states' copies: no new wait
between the take and the fold, where a rebalance could fall) and drops their events before the fold,
their offsets passed like re-routed records' (`erased_dropped` counts them). A third agent reads the
erasures topic, co-partitioned with the clickstream, so the worker holding a shopper's session gets their
erasure: it deletes the row (Faust writes the changelog's tombstone) and the Redis keys again. A batch
that was folding while the erasure came (checked before it, applied after) is covered both ways: if the
agent reads the record after the batch wrote, its deletes come last; if before, the batch finds the
user among those the agent deleted (`forgotten`, no wait) and deletes the row and keys again.

Redis down: an agent retries its batch, backing off up to REDIS_RETRY_MAX_S, until Redis answers.
It never lets the error escape: Faust would restart the agent in-process and go on past the batch,
whose events would then be lost to the features (and the applied-offset guard would not bring
them back). Meanwhile the batch's offsets are not committed, the lag grows and on-call sees it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import faust
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from recstream.features import Incoming, UserState
from recstream.features.config import feature_config, limits
from recstream.features.plan import BatchPlan, batch_window, missing_offsets
from recstream.settings import Settings
from recstream.stats import LatencyHistogram
from schemas import Erasure, Event, Product, SchemaError
from streams import deadletter
from streams.app import raw_topic
from streams.online_store import open_store
from streams.producer import owner_partition
from streams.refill import read_range
from streams.reroute import forward_all
from streams.store import Store
from streams.take import take_events

log = logging.getLogger(__name__)
REDIS_RETRY_FIRST_S, REDIS_RETRY_MAX_S = 0.1, 5.0


@dataclass
class FeatureStats:
    processed: Counter = field(default_factory=Counter)   # by event type
    duplicates: int = 0
    dead_letters: int = 0
    refilled: int = 0    # records the consumer skipped, read again from Kafka
    rerouted: int = 0    # records on another partition than their shopper's, copied to the owner partition
    recovered_states: int = 0   # users whose table row was behind Redis' copy (a write lost in a rebalance)
    erased_dropped: int = 0     # events of erased shoppers, dropped before the fold
    erasures: int = 0           # erased shoppers whose table row and keys this worker deleted
    batches: int = 0
    window_s: float = 0.0       # how long the latest batch was gathered (recstream.features.plan.batch_window)
    items: int = 0
    last_offset: dict[int, int] = field(default_factory=dict)   # partition -> last processed offset
    event_latency: LatencyHistogram = field(default_factory=LatencyHistogram)   # event time -> Redis written
    ingest_latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # Kafka append -> Redis written

    @property
    def seen(self) -> int:
        return sum(self.processed.values()) + self.duplicates + self.dead_letters


@dataclass
class FeatureAgents:
    sessions: faust.types.TableT
    store: Store
    stats: FeatureStats


def register(app: faust.App, s: Settings, store_client) -> FeatureAgents:
    """The feature agents on `app`: clickstream -> session table + Redis, catalogue -> item features.
    Why this long: Faust agents are closures over the app's tables and topics; the fold's steps are
    named functions of this module and recstream.features.plan, what stays here is their wiring."""
    clickstream = raw_topic(app, s.topic("clickstream"))
    catalogue = raw_topic(app, s.topic("catalogue"))
    erasures = raw_topic(app, s.topic("erasures"))
    dead_letters = raw_topic(app, s.topic("deadletter"))
    # Keyed by user like the clickstream; a row lives on the partition of its user's events (see _as_current).
    sessions = app.Table("user-sessions", default=None, key_type=str, partitions=s.clickstream_partitions,
                         help="per-user session state (recstream.features.session.UserState)",
                         options={"write_buffer_size": s.table_write_buffer_mb << 20, "max_write_buffer_number": 2,
                                  "block_cache_size": s.table_block_cache_mb << 20,
                                  "block_cache_compressed_size": s.table_block_cache_mb << 20})
    store = open_store(s, store_client, topic=clickstream.get_topic_name())
    stats = FeatureStats()
    cfg, lim = feature_config(s), limits(s)
    applied: dict[int, int] = {}
    forgotten: set[str] = set()   # shoppers whose row and keys this process deleted (see the module docstring)
    seen: dict[int, int] = {}   # partition -> highest clickstream offset this process has taken

    async def refill(events) -> list[tuple[object, Incoming]]:
        """The records a batch skipped (recstream.features.plan.missing_offsets), read again from
        Kafka, each with an event of the batch from its partition (whose table partition it is).
        The baseline is the higher of what this process took and what Redis holds as applied, read
        when a gap shows or a partition is new here: a partition that moved away and back is no gap.
        After a restart, a malformed record just before the batch may be dead-lettered again."""
        offsets = [(ev.message.partition, ev.message.offset) for ev in events]
        before = dict(seen)
        for p, o in offsets:
            seen[p] = max(seen.get(p, -1), o)
        suspects = set(missing_offsets(before, offsets)) | {p for p, _ in offsets if p not in before}
        if not suspects:
            return []
        held = await _until_redis_answers(lambda: store.applied_offsets(suspects), "applied offsets")
        baseline = {p: max(before.get(p, -1), held[p]) for p in suspects}
        context = {ev.message.partition: ev for ev in events}
        out = []
        for p, ranges in missing_offsets(baseline, [(p, o) for p, o in offsets if p in suspects]).items():
            for start, end in ranges:
                records = await read_range(s.kafka_bootstrap, clickstream.get_topic_name(), p, start, end)
                log.warning("clickstream[%d]: offsets %d-%d were skipped by the consumer; %d records read again "
                            "(%d records of the batch before them)", p, start, end - 1, len(records),
                            sum(1 for q, o in offsets if q == p and o < start))
                stats.refilled += len(records)
                for m in records:
                    try:
                        out.append((context[p], Incoming(Event.from_json(m.value), p, m.offset)))
                    except SchemaError as exc:
                        await deadletter.send(dead_letters, deadletter.from_record(m, exc))
                        stats.dead_letters += 1
        return out

    async def reroute(good, skipped) -> tuple[list[Any], list[Any], list[tuple[int, int]]]:
        """(good, skipped) less the records not on their shopper's owner partition, which are copied
        there (acknowledged before this returns), and the (partition, offset) of those records."""
        # the setting, not the consumer's metadata (the group leader's only): every worker must agree,
        # and the session table is co-partitioned with the topic, so the two counts are one
        n = s.clickstream_partitions
        users = {e.user_id for _, e in good} | {i.event.user_id for _, i in skipped}
        owner = {u: owner_partition(u.encode(), n) for u in users}
        out = []
        for ev, e in good:
            m = ev.message
            if owner[e.user_id] != m.partition:
                headers = list(m.headers.items()) if isinstance(m.headers, dict) else list(m.headers or [])
                out.append((e.user_id.encode(), ev.value, owner[e.user_id], m.partition, m.offset, m.timestamp,
                            headers))
        for _, inc in skipped:
            if owner[inc.event.user_id] != inc.partition:
                out.append((inc.event.user_id.encode(), inc.event.to_json(), owner[inc.event.user_id], inc.partition,
                            inc.offset, None, []))
        if not out:
            return good, skipped, []
        await forward_all(clickstream, out)
        stats.rerouted += len(out)
        passed = [(p, o) for _, _, _, p, o, _, _ in out]
        moved = set(passed)
        return ([(ev, e) for ev, e in good if (ev.message.partition, ev.message.offset) not in moved],
                [(ev, i) for ev, i in skipped if (i.partition, i.offset) not in moved], passed)

    async def decode(events, record_type):
        good = []
        for ev in events:
            try:
                good.append((ev, record_type.from_json(ev.value)))
            except SchemaError as exc:
                await deadletter.send(dead_letters, deadletter.from_error(ev, exc))
                stats.dead_letters += 1
        return good

    async def forget(stream: faust.StreamT[Any], context: dict[str, Any]) -> None:
        """Delete the table rows (tombstones on the changelog) and the Redis keys of the users of `context`
        (user -> an event of the partition their row is in)."""
        # the keys this worker writes (the CLI or API that recorded the erasure deleted the rest, paced;
        # a pass over the keyspace for each record here would cost a whole scan per erased shopper)
        await _until_redis_answers(lambda: store.forget_users(sorted(context)), "erasing shoppers' keys")
        forgotten.update(context)
        with _as_current(stream) as make_current:
            for user, ev in context.items():
                make_current(ev)
                if sessions.get(user) is not None:
                    del sessions[user]
        stats.erasures += len(context)

    @app.agent(clickstream, name="update_session_features")
    async def update_session_features(stream: faust.StreamT) -> None:
        age = 0.0   # seconds: now less the newest Kafka timestamp of the last batch

        def window() -> float:
            stats.window_s = batch_window(age, stats.window_s, s.feature_batch_within_ms / 1000,
                                          s.feature_batch_within_max_ms / 1000)
            return stats.window_s

        async for events in take_events(stream, s.feature_batch_max, window):
            age = time.time() - max(ev.message.timestamp for ev in events)   # Faust: seconds
            skipped = await refill(events)
            good = await decode(events, Event)
            good, skipped, passed = await reroute(good, skipped)
            if not good and not skipped and not passed:
                continue
            batch = [inc for _, inc in skipped] + [Incoming(e, ev.message.partition, ev.message.offset) for ev, e in good]
            # each user's newest event in the batch (a skipped record: an event of its partition)
            last_event = {inc.event.user_id: ev for ev, inc in skipped} | {e.user_id: ev for ev, e in good}
            states = _read_states(stream, sessions, last_event)
            # one wait between the take and the fold, as before erasures: a rebalance has no other gap to fall in
            fresher, erased = await _until_redis_answers(lambda: _fresher_and_erased(store, states), "session states")
            if erased:   # erased shoppers' events: dropped, their offsets passed (their keys stay deleted)
                kept = [i for i in batch if i.event.user_id not in erased]
                passed += [(i.partition, i.offset) for i in batch if i.event.user_id in erased]
                stats.erased_dropped += len(batch) - len(kept)
                batch, good = kept, [(ev, e) for ev, e in good if e.user_id not in erased]
                last_event = {u: ev for u, ev in last_event.items() if u not in erased}
                states = {u: st for u, st in states.items() if u not in erased}
                fresher = {u: st for u, st in fresher.items() if u not in erased}
            for user, table_state in states.items():
                if fresher[user] is not table_state:
                    stats.recovered_states += 1
                    log.warning("user %s: the session table is behind Redis (offset %d < %d on partition %d, "
                                "a write lost in a rebalance): folding on Redis' copy", user, table_state.offset,
                                fresher[user].offset, fresher[user].partition)
            states = fresher
            result = await _until_redis_answers(lambda: store.fold(batch, states, applied, cfg, lim, passed),
                                                "session features")  # Redis first: see features/plan.py
            _write_states(stream, sessions, last_event, result.states)
            _account(stats, result, good, passed)
            meanwhile = forgotten.intersection(result.states)
            if meanwhile:   # the erasures agent deleted them while this batch folded: the batch wrote them again
                await forget(stream, {u: last_event[u] for u in meanwhile if u in last_event})

    @app.agent(erasures, name="forget_erased_users")
    async def forget_erased_users(stream: faust.StreamT[Any]) -> None:
        async for ev in stream.events():   # one at a time: erasures are rare
            try:
                user = Erasure.from_json(ev.value).user_id
            except (SchemaError, TypeError) as exc:   # (TypeError: a tombstone, no value)
                log.warning("erasures[%d]@%d skipped: %s", ev.message.partition, ev.message.offset, exc)
                continue
            await _until_redis_answers(lambda: store.mark_erased([user]), "erased shoppers")
            await forget(stream, {user: ev})

    @app.agent(catalogue, name="update_item_features")
    async def update_item_features(stream: faust.StreamT) -> None:
        async for events in stream.take_events(500, within=s.feature_batch_within_ms / 1000):
            good = await decode(events, Product)
            products = [p for _, p in good]
            stats.items += await _until_redis_answers(lambda: store.write_items(products), "item features")

    return FeatureAgents(sessions, store, stats)


async def _fresher_and_erased(store: Store, states: dict[str, UserState]) -> tuple[dict[str, UserState], set[str]]:
    """Redis' copies of the batch's states (Store.fresher) and which of its users are erased, in one wait."""
    fresher, erased = await asyncio.gather(store.fresher(states), store.erased(states))
    return fresher, erased


async def _until_redis_answers(call, what: str):
    """`call()` again and again while Redis is unreachable (see the module docstring). A retried fold
    is safe: `applied` advances only after success, and the Redis script skips offsets it holds."""
    delay = REDIS_RETRY_FIRST_S
    while True:
        try:
            return await call()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            log.warning("%s: Redis unavailable (%r); the batch is retried in %.1f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, REDIS_RETRY_MAX_S)


@contextmanager
def _as_current(stream: faust.StreamT):
    """Faust's table reads and writes go to the partition of the *current* event (RocksDB keeps one
    database per partition; the changelog has one partition per source partition). In a batch we
    make each user's own event current, so the row lives where that user's events do and recovers
    on the worker that owns them. The stream's current event is restored after: the take buffer's
    filler reads it when it resumes."""
    previous = stream.current_event
    try:
        yield lambda ev: stream._set_current_event(ev)
    finally:
        stream._set_current_event(previous)


def _read_states(stream: faust.StreamT, sessions: faust.types.TableT, last_event: dict) -> dict[str, UserState]:
    states = {}
    with _as_current(stream) as make_current:
        for user, ev in last_event.items():
            make_current(ev)
            states[user] = UserState.from_dict(sessions.get(user))
    return states


def _write_states(stream: faust.StreamT, sessions: faust.types.TableT, last_event: dict,
                  states: dict[str, UserState]) -> None:
    with _as_current(stream) as make_current:
        for user, state in states.items():
            make_current(last_event[user])
            sessions[user] = state.to_dict()


def _account(stats: FeatureStats, result: BatchPlan, good: list[Any], passed: list[tuple[int, int]]) -> None:
    now = time.time()
    stats.batches += 1
    stats.duplicates += result.duplicates
    for inc in result.processed:
        stats.processed[inc.event.event_type] += 1
    stats.event_latency.extend([now - inc.event.timestamp for inc in result.processed])
    stats.ingest_latency.extend([now - ev.message.timestamp for ev, _ in good])  # Faust: seconds
    for p, o in [(ev.message.partition, ev.message.offset) for ev, _ in good] + passed:
        stats.last_offset[p] = max(o, stats.last_offset.get(p, -1))
