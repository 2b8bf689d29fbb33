"""The one way records reach Kafka: an idempotent producer that waits for acks from all replicas."""
from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer

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
