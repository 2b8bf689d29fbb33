"""Read the compacted catalogue topic to its end: the latest record of every product."""
from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer

from recstream.settings import Settings
from schemas import Product, SchemaError


async def read_catalogue(s: Settings) -> tuple[list[Product], int]:
    """(products, records refused); the last valid record of a product wins, as compaction keeps."""
    topic = s.topic("catalogue")
    # no group: the consumer is given every partition once it has the topic's metadata
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        for _ in range(100):
            if parts := sorted(consumer.assignment()):
                break
            await asyncio.sleep(0.05)
        else:
            return [], 0
        ends = await consumer.end_offsets(parts)
        latest: dict[str, Product] = {}
        refused = 0
        remaining = {tp for tp in parts if ends[tp] > 0}
        while remaining:
            for tp, msgs in (await consumer.getmany(*remaining, timeout_ms=1000)).items():
                for m in msgs:
                    try:
                        p = Product.from_json(m.value)
                        latest[p.product_id] = p
                    except SchemaError:
                        refused += 1
                    if m.offset + 1 >= ends[tp]:
                        remaining.discard(tp)
        return list(latest.values()), refused
    finally:
        await consumer.stop()
