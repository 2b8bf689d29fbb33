"""Dead-letter topic: a record that fails to decode or validate is kept with its raw bytes and reason."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from faust.types import EventT, TopicT

from schemas import SchemaError

log = logging.getLogger(__name__)

# Headers on each dead letter: where the record came from and why it was refused.
H_SOURCE, H_PARTITION, H_OFFSET, H_FIELD, H_REASON = (
    "x-error-source-topic", "x-error-source-partition", "x-error-source-offset", "x-error-field", "x-error-reason")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    source_topic: str
    partition: int
    offset: int
    field: str
    reason: str
    key: bytes | None
    value: bytes | None

    def headers(self) -> list[tuple[str, bytes]]:
        return [(H_SOURCE, self.source_topic.encode()), (H_PARTITION, str(self.partition).encode()),
                (H_OFFSET, str(self.offset).encode()), (H_FIELD, self.field.encode()),
                (H_REASON, self.reason.encode()[:1024])]

    @classmethod
    def from_headers(cls, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> DeadLetter:
        h = {k: v.decode() for k, v in headers}
        return cls(h[H_SOURCE], int(h[H_PARTITION]), int(h[H_OFFSET]), h[H_FIELD], h[H_REASON], key, value)


def from_error(event: EventT[Any], error: SchemaError) -> DeadLetter:
    return from_record(event.message, error)


def from_record(msg: Any, error: SchemaError) -> DeadLetter:
    """`msg`: a faust Message or an aiokafka ConsumerRecord (topic, partition, offset, key, value)."""
    reason = "; ".join(map(str, error.errors))
    return DeadLetter(msg.topic, msg.partition, msg.offset, error.errors[0].field, reason, msg.key, msg.value)


async def send(topic: TopicT, letter: DeadLetter) -> None:
    """Queue the dead letter; Faust flushes its producer before it commits the source offset,
    so a refused record is in the dead-letter topic before the stream moves past it."""
    log.warning("dead letter from %s[%d]@%d: %s", letter.source_topic, letter.partition, letter.offset, letter.reason)
    await topic.send(key=letter.key, value=letter.value if letter.value is not None else b"", headers=letter.headers())
