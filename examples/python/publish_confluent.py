"""Publish shop events to recstream with confluent-kafka (librdkafka), as docs/publishing.md asks.

    python examples/python/publish_confluent.py [BOOTSTRAP] [TOPIC]      # 127.0.0.1:9092 recs.clickstream

The record is schemas.Event as JSON (docs/schemas/event.schema.json), keyed by user_id (UTF-8). Delivery:
acks=all and idempotence, and a send counts only once its delivery report says so. Any partitioner
works (recstream re-routes a record to its shopper's partition); murmur2_random, the Java client's
and recstream's own, puts it there at once and saves that hop.
"""
import sys
import time
import uuid

import orjson
from confluent_kafka import Producer


def event(user_id: str, product_id: str, event_type: str = "view", **extra) -> dict:
    return {"version": 1, "event_id": uuid.uuid4().hex, "user_id": user_id, "session_id": f"{user_id}-web",
            "product_id": product_id, "event_type": event_type, "timestamp": time.time(), **extra}


def main(bootstrap: str = "127.0.0.1:9092", topic: str = "recs.clickstream") -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                         "partitioner": "murmur2_random", "linger.ms": 5})
    failed = []

    def on_delivery(err, msg):
        if err is not None:
            failed.append(err)   # not acknowledged: send it again (the event_id makes a repeat harmless)
        else:
            print(f"{msg.key().decode()} -> {msg.topic()}[{msg.partition()}]@{msg.offset()}")

    for e in (event("u123", "p42", page="product", device="mobile"),
              event("u123", "p42", "add_to_cart", price=19.9, quantity=1),
              event("u7", "p9", "click", rec_request_id="r77")):
        producer.produce(topic, key=e["user_id"].encode(), value=orjson.dumps(e), on_delivery=on_delivery)
    remaining = producer.flush(30)
    return 1 if failed or remaining else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
