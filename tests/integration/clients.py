"""Kafka clients other than recstream's own, as shops' services publish: librdkafka and Java."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from confluent_kafka import KafkaException, Producer

from recstream.settings import Settings

JAVA_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "java" / "PublishEvents.java"


def librdkafka_publish(s: Settings, topic: str, records: list[tuple[bytes | None, bytes]],
                       **config) -> list[tuple[int, int]]:
    """Produce with confluent-kafka (librdkafka) as docs/publishing.md asks: acks=all, idempotence, and
    librdkafka's own default partitioner unless `config` names one. (partition, offset) of each
    record, in order, once the broker acknowledged them all; blocking: call it in a thread."""
    producer = Producer({"bootstrap.servers": s.kafka_bootstrap, "acks": "all", "enable.idempotence": True,
                         "linger.ms": 5, **config})
    acked: dict[int, tuple[int, int]] = {}
    errors: list = []

    def report(i: int):
        def on_delivery(err, msg):
            if err is not None:
                errors.append(err)
            else:
                acked[i] = (msg.partition(), msg.offset())
        return on_delivery

    for i, (key, value) in enumerate(records):
        producer.produce(topic, value=value, key=key, on_delivery=report(i))
        producer.poll(0)
    if producer.flush(30) or errors:
        raise KafkaException(f"{len(records) - len(acked)} records not acknowledged: {errors[:3]}")
    return [acked[i] for i in range(len(records))]


def java_publish(s: Settings, libs: Path, topic: str, key_field: str, lines: list[bytes]) -> list[tuple[int, int]]:
    """Produce with the Java client (kafka-clients, from the jars the project fetches into `libs`:
    cli.services.kafka_libs) through the
    runnable example examples/java/PublishEvents.java: one JSON record a line, keyed by `key_field`,
    the client's default partitioner. (partition, offset) of each line, in order."""
    run = subprocess.run(["java", "-cp", str(libs.resolve() / "*"), str(JAVA_EXAMPLE),
                          s.kafka_bootstrap, topic, key_field], input=b"\n".join(lines) + b"\n",
                         capture_output=True, timeout=120, check=False)
    acked = {}
    for line in run.stdout.decode().splitlines():
        if m := re.fullmatch(r"(\d+) (\d+) (\d+)", line.strip()):
            acked[int(m[1])] = (int(m[2]), int(m[3]))
    if run.returncode != 0 or len(acked) != len(lines):
        raise RuntimeError(f"java producer: exit {run.returncode}, {len(acked)} of {len(lines)} acknowledged\n"
                           f"{run.stderr.decode()[-2000:]}")
    return [acked[i] for i in range(len(lines))]
