"""Publish shop events to recstream with aiokafka, as docs/publishing.md asks.

    python examples/python/publish_aiokafka.py [BOOTSTRAP] [TOPIC]       # 127.0.0.1:9092 recs.clickstream

The record is schemas.Event as JSON (docs/schemas/event.schema.json), keyed by user_id (UTF-8). Delivery:
acks=all and idempotence; send_and_wait returns once the broker acknowledged the record. aiokafka's
default partitioner is murmur2, recstream's own: the record lands on its shopper's partition.
"""
import asyncio
import sys
import time
import uuid

import orjson
from aiokafka import AIOKafkaProducer


def event(user_id: str, product_id: str, event_type: str = "view", **extra) -> dict:
    return {"version": 1, "event_id": uuid.uuid4().hex, "user_id": user_id, "session_id": f"{user_id}-web",
            "product_id": product_id, "event_type": event_type, "timestamp": time.time(), **extra}


async def main(bootstrap: str = "127.0.0.1:9092", topic: str = "recs.clickstream") -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        for e in (event("u123", "p42", page="product", device="mobile"),
                  event("u123", "p42", "add_to_cart", price=19.9, quantity=1),
                  event("u7", "p9", "click", rec_request_id="r77")):
            # an exception here means not acknowledged: send it again (the event_id makes a repeat harmless)
            md = await producer.send_and_wait(topic, orjson.dumps(e), key=e["user_id"].encode())
            print(f"{e['user_id']} -> {md.topic}[{md.partition}]@{md.offset}")
    finally:
        await producer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:3])))
