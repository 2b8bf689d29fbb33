"""Replay: publish a dataset's catalogue and events to Kafka at a chosen rate, with progress."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from recstream.data import Dataset
from recstream.settings import Settings
from streams.producer import create_producer
from streams.topics import ensure_topics

WINDOW = 2000  # sends in flight before we wait for their acks


@dataclass(frozen=True)
class ReplayResult:
    topic: str
    acked: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.acked / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return f"{self.topic}: {self.acked} records acknowledged in {self.seconds:.2f} s ({self.rate:,.0f}/s)"


class KeyedRecord(Protocol):
    """A record a topic binds: its JSON and its Kafka key (schemas' events, exposures, requests, products)."""
    @property
    def key(self) -> bytes: ...

    def to_json(self) -> bytes: ...


async def publish(producer: AIOKafkaProducer, topic: str, records: Sequence[KeyedRecord] | Iterable[KeyedRecord],
                  *, rate_per_s: float | None = None, progress: bool = True, total: int | None = None) -> ReplayResult:
    """Send records keyed by their `key`; return once every one is acknowledged (acks=all).

    Pacing follows a schedule (record i goes at start + i/rate), so the mean rate holds even when
    one send is slow; `rate_per_s=None` sends as fast as the broker acknowledges."""
    total = total if total is not None else (len(records) if isinstance(records, Sequence) else None)
    bar = tqdm(total=total, desc=topic, unit="rec", disable=not progress, mininterval=0.5)
    start = time.perf_counter()
    pending: list[asyncio.Future[Any]] = []
    acked = 0
    for i, record in enumerate(records):
        if rate_per_s:
            delay = start + i / rate_per_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        pending.append(await producer.send(topic, record.to_json(), key=record.key))
        if len(pending) >= WINDOW:
            await asyncio.gather(*pending)
            acked += len(pending)
            bar.update(len(pending))
            pending.clear()
    await asyncio.gather(*pending)
    acked += len(pending)
    bar.update(len(pending))
    bar.close()
    return ReplayResult(topic, acked, time.perf_counter() - start)


async def publish_dataset(s: Settings, data: Dataset, *, rate_per_s: float | None = None,
                          progress: bool = True) -> ReplayResult:
    """Catalogue first (so features can join on it), then the events in time order."""
    await ensure_topics(s)
    producer = create_producer(s)
    await producer.start()
    try:
        if data.products:
            await publish(producer, s.topic("catalogue"), data.products, progress=progress)
        return await publish(producer, s.topic("clickstream"), data.events, rate_per_s=rate_per_s, progress=progress)
    finally:
        await producer.stop()
