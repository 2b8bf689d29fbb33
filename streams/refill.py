"""Read a range of one partition again, without a consumer group: the records a stream skipped."""
from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition


async def read_range(bootstrap: str, topic: str, partition: int, start: int, end: int,
                     timeout_s: float = 30.0) -> list[ConsumerRecord]:
    """Records at offsets [start, end) of `topic`[`partition`] (from the log's start if retention
    removed some). Control records have offsets but are not returned, so the result may be shorter."""
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([tp])
        first = (await consumer.beginning_offsets([tp]))[tp]
        consumer.seek(tp, max(start, first))
        out: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while await consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}[{partition}]: offsets {start}-{end - 1} not read within {timeout_s} s")
            for m in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                if m.offset < end:
                    out.append(m)
        return out
    finally:
        await consumer.stop()
