"""Consumer lag: records behind the end of each partition, per consumer group."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CoordinatorNotAvailableError

from recstream.settings import Settings


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    committed: int  # -1: the group has committed nothing yet
    end: int

    @property
    def lag(self) -> int:
        return self.end - max(self.committed, 0)


async def group_lag(s: Settings, group: str, topic: str) -> list[PartitionLag]:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = await consumer.end_offsets(partitions)
        committed = await _committed(admin, group, partitions)
        return [PartitionLag(tp.partition, committed[tp].offset if tp in committed else -1, ends[tp])
                for tp in partitions]
    finally:
        await consumer.stop()
        await admin.close()


async def _committed(admin: AIOKafkaAdminClient, group: str, partitions: list[TopicPartition]
                     ) -> dict[TopicPartition, Any]:
    # The first coordinator lookup on a fresh broker creates __consumer_offsets: wait for it.
    offsets: dict[TopicPartition, Any]   # partition -> OffsetAndMetadata (aiokafka ships no types)
    for _attempt in range(40):
        try:
            offsets = await admin.list_consumer_group_offsets(group, partitions=partitions)
            return offsets
        except CoordinatorNotAvailableError:
            await asyncio.sleep(0.25)
    offsets = await admin.list_consumer_group_offsets(group, partitions=partitions)
    return offsets


def total(lags: list[PartitionLag]) -> int:
    return sum(p.lag for p in lags)


METRICS_AGENTS = ("features", "attribution", "retrieval", "ranking")   # the workers that publish snapshots


async def report(s: Settings) -> int:
    """`recstream lag`: committed lag of each consumer group, then each worker's own snapshot, found by
    the agents' metrics indexes (no pass over the keyspace: a shop's Redis holds millions of keys)."""
    import time

    import orjson

    from recstream.features import keys
    from streams.metrics import METRICS_TTL_S
    from streams.redisconn import connect

    for group, source in s.consumer_groups():
        lags = await group_lag(s, group, source)
        parts = " ".join(f"{p.partition}:{p.lag}" for p in lags)
        print(f"{group:28} {source}  total {total(lags):>8}   per partition {parts}")
    client = connect(s)
    try:
        for agent in METRICS_AGENTS:
            live = await client.zrangebyscore(s.redis_namespace + keys.metrics_index(agent),
                                              time.time() - METRICS_TTL_S, "+inf")
            for key in cast(list[bytes], live):   # (redis-py types every reply shape of ZRANGEBYSCORE)
                raw = await client.get(key)   # one at a time: on a cluster the snapshots sit in many slots
                if raw:
                    print(f"{key.decode():40} {worker_line(agent, orjson.loads(raw))}")
    finally:
        await client.aclose()
    return 0


def worker_line(agent: str, m: dict[str, Any]) -> str:
    """One worker's snapshot as `recstream lag` prints it."""
    if agent == "features":
        lat = m["event_latency_ms"]
        return (f"lag {m['lag_total']:>7}  event->feature p50 {_ms(lat['p50'])} p99 {_ms(lat['p99'])}  "
                f"processed {sum(m['processed'].values())}")
    if agent == "attribution":
        return f"lag {m['lag_total']:>7}  processed {sum(m['processed'].values())}  held {m['held']}"
    lat = m["handle_latency_ms"]
    return (f"model {m['model_version']}  handled {m['handled']}  expired {m['expired']}  errors {m['errors']}  "
            f"batch p50 {_ms(lat['p50'])} p99 {_ms(lat['p99'])}")


def _ms(value: float | None) -> str:
    """A percentile as published (JSON null when nothing was measured yet)."""
    return "-" if value is None else f"{value:.1f} ms"
