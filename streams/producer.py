"""The one way records reach Kafka: an idempotent producer that waits for acks from all replicas."""
from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from recstream.settings import Settings


def create_producer(s: Settings, **overrides: Any) -> AIOKafkaProducer:
    """acks=all + idempotence: a send that returned was written to every in-sync replica, once."""
    options = dict(
        bootstrap_servers=s.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=s.producer_linger_ms,
        request_timeout_ms=s.produce_timeout_ms,
        max_batch_size=256 * 1024,
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


_murmur2 = DefaultPartitioner()


def owner_partition(key: bytes, partitions: int) -> int:
    """The partition this producer writes `key` to (aiokafka's default partitioner: murmur2, as the Java
    client's): where the feature agents keep a shopper's session. Another client's default may differ
    (librdkafka's is CRC32); the agents re-route such records here (agents/features.py)."""
    every = list(range(partitions))
    return int(_murmur2(key, every, every))
