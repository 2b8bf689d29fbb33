"""Attribution worker: exposures + clickstream -> A/B aggregates in Redis, with an exactly-once effect.

One aiokafka consumer (group "<app_id>-attribution", no auto commit) reads the exposures and the
clickstream topics; per batch it decodes (a record that fails validation goes to the dead-letter
topic, acknowledged, and the loop goes on), loads the slice of state the batch needs from Redis
(pipelines), folds the batch with the pure core (recstream.experiments.attribution, whose
docstring holds the counting rules) and writes every change *and the next offset of each
topic-partition* in one MULTI/EXEC. On partition assignment the consumer seeks to the offsets
stored in Redis (none: the beginning), so a crash anywhere re-reads exactly the batches whose
transaction did not run: each record changes the aggregates once. Offsets are also committed to
Kafka after the transaction, for lag tools only; Redis is the source of truth. A dead letter may be
sent twice (a crash between its ack and the transaction): dead letters are at least once.

Exposures first: an event whose timestamp is past the exposures' watermark is held back (its
partition is sought back to it, its offset is not stored) until the exposures topic has been read
that far (or to its end). The watermark is the smallest, over the exposures partitions not yet read
to their high-water mark, of the latest exposure time read from it; +inf when all are read. So a
click is never taken before the list it came from merely because the two topics were fetched at
different speeds. An event that really precedes its exposure (clocks) is unattributed.

Erased shoppers (streams/erasures.py): the worker follows the erasures topic; a new erasure deletes the
shopper's units, recent list and impressions (AttributionStore.erase_users) under the batch lock, so no
batch in flight writes them back, and their later exposures and events are dropped (`erased_dropped`).
The per-variant totals keep what was counted before: they are aggregates, no one's data.

Single worker: run ONE attribution worker per deployment. The read-modify-write of unit totals,
impressions and recent lists happens between a read pipeline and the transaction without WATCH: it
is not safe across concurrent workers (a second member of the group would take partitions and two
writers could race on a unit).

Redis keys (every one prefixed with `s.redis_namespace`; built in recstream/features/keys.py AttributionKeys):
- `abx:imp:{request_id}`  string, JSON {unit, shopper, ts, items, arms [[experiment, variant], ...],
  flags [clicked, carted, bought]}: the impression, for rec_request_id attribution; TTL
  attribution_ttl_s from when it was first written (kept on updates).
- `abx:recent:{shopper}`  string, JSON [[request_id, ts, items], ...] by time: the shopper's (user_id,
  else unit) recent exposures for window attribution; trimmed to 2 windows and RECENT_MAX entries;
  TTL attribution_ttl_s, refreshed on write.
- `abx:unit:{experiment}:{variant}:{unit}`  hash UnitTotals (impressions, clicked, carted, bought,
  revenue); TTL 90 days, refreshed on write (a unit silent for 90 days starts again from zero).
- `abx:tot:{experiment}:{variant}`  hash VariantTotals: HINCRBY / HINCRBYFLOAT (revenue, sum_revenue2,
  sum_x_revenue); latency bucket i is the field "lat:<i>". The pseudo experiment "_all", variant
  "all" holds every exposure. No TTL.
- `abx:day:{experiment}:{variant}:{YYYY-MM-DD}`  hash, the same increments per UTC day (of the
  exposure for impressions, units and guardrails; of the event for outcomes). No TTL.
- `abx:days:{experiment}:{variant}`  set of the days that have a day hash (read side, no SCAN).
- `abx:variants:{experiment}`  set of variants seen; `abx:experiments`  set of experiments seen.
- `abx:offsets`  hash "{topic}:{partition}" -> next offset to read, written in the transaction.
- `abx:seen:{event_id}`  "1", TTL 1 day: outcome events already counted (dedupe).
- `metrics:attribution:{host}:{pid}`  JSON snapshot for on-call (counts, lag), TTL 30 s.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from recstream.experiments.assignment import unit_for
from recstream.experiments.attribution import (
    is_outcome,
    step,
)
from recstream.features import keys
from recstream.settings import Settings
from schemas import Event, Exposure, SchemaError
from streams.attribution_store import AttributionStore, offset_field
from streams.deadletter import DeadLetter
from streams.erasures import ErasureFollower
from streams.metrics import METRICS_EVERY_S, METRICS_TTL_S, SnapshotHolder, serve_metrics, stop_on_signals, worker_registry
from streams.producer import create_producer
from streams.reroute import is_copy

log = logging.getLogger(__name__)

MAX_RECORDS = 5000
RETRY_S = 1.0
COMMIT_TIMEOUT_S = 5.0


def group_id(s: Settings) -> str:
    return f"{s.app_id}-attribution"


# -- the worker ----------------------------------------------------------------------------------

@dataclass
class AttributionStats:
    counts: Counter = field(default_factory=Counter)   # exposures, events, attributed, unattributed, ...
    dead_letters: int = 0
    batches: int = 0
    held: int = 0          # events held back behind the exposures' watermark (re-read later)
    failures: int = 0      # batches whose transaction did not run (retried from the stored offsets)
    erased_dropped: int = 0   # exposures and events of erased shoppers, not counted
    erasures: int = 0         # erased shoppers whose A/B data this worker deleted


class Attribution:
    def __init__(self, s: Settings, client: aioredis.Redis):
        self.s, self.client = s, client
        self.store = AttributionStore(client, s.redis_namespace)
        self.exposures, self.clickstream = s.topic("exposures"), s.topic("clickstream")
        self.stats = AttributionStats()
        self.next: dict[TopicPartition, int] = {}        # next offset per partition, as stored in Redis
        self.last_exposure_ts: dict[TopicPartition, float] = {}
        self.lock = asyncio.Lock()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer = None
        self.metrics_holder = SnapshotHolder()   # the latest snapshot, for Prometheus (streams/metrics.py)
        self.erasures = ErasureFollower(s)

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        s = self.s
        self.consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=group_id(s),
                                         client_id=group_id(s), enable_auto_commit=False,
                                         auto_offset_reset="earliest", max_poll_records=MAX_RECORDS,
                                         fetch_min_bytes=s.background_fetch_min_bytes, fetch_max_wait_ms=500)
        self.consumer.subscribe([self.exposures, self.clickstream], listener=_SeekToStored(self))
        self.producer = create_producer(s)
        await self.producer.start()
        await self.erasures.start()
        await self._forget(await self.erasures.catch_up())
        next_metrics = 0.0
        try:
            await self.consumer.start()
            log.info("attribution %s consuming %s and %s", group_id(s), self.exposures, self.clickstream)
            while not stop.is_set():
                await self._forget(await self.erasures.poll())
                batch = await self.consumer.getmany(timeout_ms=300, max_records=MAX_RECORDS)
                if ready and not ready.is_set() and self.consumer.assignment():
                    ready.set()
                if batch:
                    done: dict[TopicPartition, int] = {}
                    async with self.lock:
                        try:
                            done = await self.process(batch)
                        except Exception:
                            self.stats.failures += 1
                            log.exception("attribution batch failed; re-reading from the stored offsets")
                            await asyncio.sleep(RETRY_S)
                            await self._seek_stored(self.consumer.assignment())
                    if done:  # for lag tools only (Redis holds the truth); outside the lock a rebalance takes
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(self.consumer.commit(done), COMMIT_TIMEOUT_S)
                if time.monotonic() >= next_metrics:
                    next_metrics = time.monotonic() + METRICS_EVERY_S
                    await self.publish_metrics()
            await self.publish_metrics()
        finally:
            await self.erasures.stop()
            await self.consumer.stop()
            await self.producer.stop()

    async def _forget(self, users: set[str]) -> None:
        """Delete newly erased shoppers' A/B data, between batches (their later records are dropped)."""
        if users:
            async with self.lock:
                await self.store.erase_users(sorted(users))
            self.stats.erasures += len(users)

    async def _seek_stored(self, tps) -> None:
        stored = await self.store.offsets()
        for tp in tps:
            if tp in stored:
                self.consumer.seek(tp, stored[tp])
                self.next[tp] = stored[tp]
            else:
                await self.consumer.seek_to_beginning(tp)
                self.next[tp] = 0
        log.info("attribution positions %s", {offset_field(tp): self.next[tp] for tp in tps})

    # -- one batch -------------------------------------------------------------------------------

    async def process(self, batch: Mapping[TopicPartition, list[ConsumerRecord]]) -> dict[TopicPartition, int]:
        """Fold one fetched batch into Redis; returns the next offsets it stored."""
        assigned = self.consumer.assignment()
        msgs = {tp: [m for m in ms if m.offset >= self.next.get(tp, 0)] for tp, ms in batch.items() if tp in assigned}
        msgs = {tp: ms for tp, ms in msgs.items() if ms}
        if not msgs:
            return {}
        records: list[Exposure | Event] = []
        letters: list[tuple[ConsumerRecord, SchemaError]] = []
        offsets: dict[TopicPartition, int] = {}
        for tp in (tp for tp in msgs if tp.topic == self.exposures):
            for m in msgs[tp]:
                try:
                    x = Exposure.from_json(m.value or b"")
                    records.append(x)
                    self.last_exposure_ts[tp] = max(self.last_exposure_ts.get(tp, -math.inf), x.ts)
                except SchemaError as exc:
                    letters.append((m, exc))
            offsets[tp] = msgs[tp][-1].offset + 1
        watermark = self._watermark(offsets)
        for tp in (tp for tp in msgs if tp.topic != self.exposures):
            offsets[tp] = msgs[tp][-1].offset + 1
            for m in msgs[tp]:
                if is_copy(m.headers):
                    continue   # a re-routed copy for the feature agents (streams/reroute.py): counted as its original
                try:
                    e = Event.from_json(m.value or b"")
                except SchemaError as exc:
                    letters.append((m, exc))
                    continue
                if e.timestamp > watermark and is_outcome(e):
                    offsets[tp] = m.offset          # hold this one and the rest of the partition
                    self.stats.held += 1
                    break
                records.append(e)
        await self._dead_letters(letters)
        records = self._without_erased(records)
        ch = step(records, await self.store.load(records, self.s.attribution_window_s), self.s.attribution_window_s)
        await self.store.write(ch, offsets, self.s.attribution_ttl_s)
        # after the transaction: positions of held partitions go back to the first record held
        for tp, off in offsets.items():
            self.next[tp] = off
            if off != msgs[tp][-1].offset + 1:
                self.consumer.seek(tp, off)
        self.stats.counts.update(ch.counts)
        self.stats.dead_letters += len(letters)
        self.stats.batches += 1
        return offsets

    def _without_erased(self, records: list[Exposure | Event]) -> list[Exposure | Event]:
        erased = self.erasures.ids
        if not erased:
            return records
        units = {unit_for(u) for u in erased}
        kept = [r for r in records if r.user_id not in erased and not (isinstance(r, Exposure) and r.unit in units)]
        self.stats.erased_dropped += len(records) - len(kept)
        return kept

    def _watermark(self, batch_next: Mapping[TopicPartition, int]) -> float:
        return watermark([(batch_next.get(tp, self.next.get(tp)), self.consumer.highwater(tp),
                           self.last_exposure_ts.get(tp)) for tp in self.consumer.assignment()
                          if tp.topic == self.exposures])

    async def _dead_letters(self, letters: list[tuple[ConsumerRecord, SchemaError]]) -> None:
        acks = []
        for m, exc in letters:
            first = exc.errors[0]
            letter = DeadLetter(m.topic, m.partition, m.offset, first.field, "; ".join(map(str, exc.errors)),
                                m.key, m.value)
            log.warning("dead letter from %s[%d]@%d: %s", m.topic, m.partition, m.offset, letter.reason)
            acks.append(await self.producer.send(self.s.topic("deadletter"), letter.value or b"", key=letter.key,
                                                 headers=letter.headers()))
        await asyncio.gather(*acks)

    # -- on-call ---------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        lag = {}
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)
            lag[offset_field(tp)] = max(0, hw - self.next.get(tp, 0)) if hw is not None else None
        st = self.stats
        return {"agent": "attribution", "ts": time.time(), "processed": dict(st.counts), "dead_letters": st.dead_letters,
                "batches": st.batches, "held": st.held, "failures": st.failures, "lag": lag,
                "erased_dropped": st.erased_dropped, "erasures": st.erasures,
                "lag_total": sum(v for v in lag.values() if v is not None)}

    async def publish_metrics(self) -> None:
        ns = self.s.redis_namespace
        key = ns + keys.metrics("attribution", socket.gethostname(), os.getpid())
        try:
            self.metrics_holder.snapshot = snap = self.snapshot()
            await self.store.publish_metrics(key, ns + keys.metrics_index("attribution"), snap, METRICS_TTL_S)
        except Exception as exc:  # metrics must never stop the worker
            log.warning("metrics not published: %r", exc)


def watermark(partitions: Iterable[tuple[int | None, int | None, float | None]]) -> float:
    """Event time up to which the exposures are read: per exposures partition (next offset, high-water
    mark, latest exposure time read), the smallest latest time of those not read to their end
    (-inf when none read yet); +inf when every partition is read to its end. Outcome events later
    than it wait."""
    wm = math.inf
    for position, highwater, last_ts in partitions:
        if highwater is not None and position is not None and position >= highwater:
            continue
        wm = min(wm, -math.inf if last_ts is None else last_ts)
    return wm


class _SeekToStored(ConsumerRebalanceListener):
    def __init__(self, worker: Attribution):
        self.worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        async with self.worker.lock:   # wait for the batch in hand: its transaction decides
            for tp in revoked:
                self.worker.next.pop(tp, None)

    async def on_partitions_assigned(self, assigned) -> None:
        if assigned:
            async with self.worker.lock:
                await self.worker._seek_stored(assigned)


async def run_attribution(s: Settings, stop: asyncio.Event | None = None, ready: asyncio.Event | None = None) -> int:
    """Run the attribution worker until `stop` (without one: SIGTERM or SIGINT); 0 on a clean stop."""
    stop = stop or stop_on_signals()
    client = aioredis.from_url(s.redis_url)
    try:
        worker = Attribution(s, client)
        serve_metrics(s.metrics_port, worker_registry("attribution", worker.metrics_holder))
        await worker.run(stop, ready)
        return 0
    finally:
        await client.aclose()
