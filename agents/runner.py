"""The request loop both serving agents run: consume a topic in small batches, handle, produce.

Plain aiokafka rather than a Faust agent: these agents keep no table and are latency-bound, and
Faust's per-message stream machinery measured at half the throughput of a bare aiokafka loop
(bench/RESULTS.md, ingest). A consumer group still spreads partitions over the agent's processes
and moves them off a dead one.

Delivery: at most once, by design. A recommendation request is worth something only within its
deadline, so offsets are auto-committed, an agent given a partition (at start, or when a rebalance
moves one to it) starts at the log's end rather than decode a backlog nobody waits for, and a
request already past its deadline is dropped unanswered (the API has answered it from the fallback
by then), as is one with too little time left to make it (`serving_reserve_ms`): under overload
the agents then spend their time on requests that can still be answered. The cost: the few requests in flight
on a partition that moves are answered by the fallback.
Deadlines compare the API host's clock with the agent's: keep hosts' clocks in sync (NTP), well
inside the deadline.
A record that does not decode goes to the dead-letter topic and the loop goes on.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord

from recstream.settings import Settings
from recstream.stats import LatencyHistogram
from schemas import Record, SchemaError
from streams.deadletter import DeadLetter

log = logging.getLogger(__name__)

T = TypeVar("T", bound=Record)
MAX_INFLIGHT = 4   # batches handled at once, so one batch's Redis wait does not idle the loop


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes


@dataclass
class AgentStats:
    received: int = 0
    handled: int = 0
    expired: int = 0
    dead_letters: int = 0
    errors: int = 0
    batches: int = 0
    handle_latency: LatencyHistogram = field(default_factory=LatencyHistogram)   # batch in -> replies queued


class _StartAtEnd(ConsumerRebalanceListener):
    def __init__(self, consumer: AIOKafkaConsumer):
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked) -> None:
        pass

    async def on_partitions_assigned(self, assigned) -> None:
        if assigned:
            await self.consumer.seek_to_end(*assigned)


def serving_producer(s: Settings) -> AIOKafkaProducer:
    """Leader ack, no linger: a reply waits for nothing. A lost reply costs one fallback answer."""
    return AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks=1, linger_ms=0,
                            request_timeout_ms=s.produce_timeout_ms)


class RequestAgent(Generic[T]):
    def __init__(self, s: Settings, name: str, topic: str, record: type[T],
                 handle: Callable[[list[T]], Awaitable[list[Outgoing]]], expired: Callable[[T], bool],
                 window_ms: float = 0.0):
        self.s, self.name, self.topic, self.record = s, name, topic, record
        self.handle, self.expired, self.window_s = handle, expired, window_ms / 1000
        self.stats = AgentStats()
        self.group = f"{s.app_id}-{name}"
        self._inflight = asyncio.Semaphore(MAX_INFLIGHT)
        self._tasks: set[asyncio.Task] = set()
        self._producer: AIOKafkaProducer | None = None

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        s = self.s
        consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=self.group,
                                    auto_offset_reset="latest", enable_auto_commit=True, auto_commit_interval_ms=1000,
                                    session_timeout_ms=10_000, heartbeat_interval_ms=3_000, fetch_max_wait_ms=100,
                                    max_poll_records=s.serving_batch_max)
        consumer.subscribe([self.topic], listener=_StartAtEnd(consumer))
        producer = serving_producer(s)
        await producer.start()
        await consumer.start()
        self._producer = producer
        try:
            while not consumer.assignment() and not stop.is_set():  # noqa: ASYNC110  (no event for a join)
                await asyncio.sleep(0.05)
            for tp in consumer.assignment():   # resolve the start positions now: later requests are ours
                await consumer.position(tp)
            if ready:
                ready.set()
            window = self.window_s   # after the first record, wait this long for more to share the batch
            while not stop.is_set():
                records = _flat(await consumer.getmany(timeout_ms=200, max_records=s.serving_batch_max))
                if records and window > 0 and len(records) < s.serving_batch_max:
                    more = await consumer.getmany(timeout_ms=int(window * 1000) or 1,
                                                  max_records=s.serving_batch_max - len(records))
                    records += _flat(more)
                if records:
                    await self._inflight.acquire()
                    self._track(asyncio.create_task(self._handle(records, producer)))
        finally:
            self._producer = None
            for task in list(self._tasks):
                with contextlib.suppress(Exception):
                    await task
            await consumer.stop()
            await producer.stop()

    def _track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def submit(self, batch: list[T]) -> None:
        """Handle messages that did not come from the topic as a batch of their own, like the topic's
        (ranking: a request's shard answers merged after the gather wait). Dropped when stopped."""
        producer = self._producer
        if producer is None:
            return

        async def run() -> None:
            async with self._inflight:
                await self._process(batch, producer, time.perf_counter())
        self._track(asyncio.create_task(run()))

    async def _handle(self, records: list[ConsumerRecord], producer: AIOKafkaProducer) -> None:
        t0 = time.perf_counter()
        try:
            st = self.stats
            st.received += len(records)
            now = time.time()
            batch = []
            for r in records:
                try:
                    batch.append(self.record.from_json(r.value, now=now))
                except SchemaError as exc:
                    st.dead_letters += 1
                    await self._dead_letter(producer, r, exc)
            await self._process(batch, producer, t0)
        finally:
            self._inflight.release()

    async def _process(self, batch: list[T], producer: AIOKafkaProducer, t0: float) -> None:
        st = self.stats
        live = [m for m in batch if not self.expired(m)]
        st.expired += len(batch) - len(live)
        if not live:
            return
        try:
            out = await self.handle(live)
        except Exception:
            st.errors += len(live)
            log.exception("%s: a batch of %d failed; the API answers those from the fallback", self.name, len(live))
            return
        for o in out:
            await producer.send(o.topic, o.value, key=o.key)   # queued; no wait for the ack
        st.handled += len(live)
        st.batches += 1
        st.handle_latency.add(time.perf_counter() - t0)

    async def _dead_letter(self, producer: AIOKafkaProducer, r: ConsumerRecord, exc: SchemaError) -> None:
        first = exc.errors[0]
        letter = DeadLetter(r.topic, r.partition, r.offset, first.field, "; ".join(map(str, exc.errors)), r.key, r.value)
        log.warning("dead letter from %s[%d]@%d: %s", r.topic, r.partition, r.offset, letter.reason)
        await producer.send(self.s.topic("deadletter"), r.value or b"", key=r.key, headers=letter.headers())


def _flat(batches: dict) -> list[ConsumerRecord]:
    return [r for records in batches.values() for r in records]
