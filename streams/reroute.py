"""Re-routing: a clickstream record on another partition than its shopper's owner is copied there.

The feature agents keep one session per shopper on the partition recstream's own producer picks
(murmur2 of the user id, streams.producer.owner_partition). Other clients partition the same key
elsewhere (librdkafka's default, consistent_random, hashes with CRC32), so a shopper whose events
come from two clients would have two sessions. As Kafka Streams and Faust's group_by do with a
repartition topic, the agent copies such a record to its owner partition and folds the copy; the
clickstream itself is the repartition topic here, so the session table, its changelog and the
offset guard stay as they are. The copy carries H_REROUTED, and the consumers that read every
event once (archive, attribution) skip copies.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from faust.types import TopicT

log = logging.getLogger(__name__)
H_REROUTED = "x-recstream-rerouted-from"   # "{partition}:{offset}" of the record this one copies
RETRY_FIRST_S, RETRY_MAX_S = 0.1, 5.0


def is_copy(headers: Iterable[tuple[str, bytes]] | dict[str, bytes] | None) -> bool:
    """Whether a record is a re-routed copy (its original is on the topic too)."""
    if not headers:
        return False
    pairs = headers.items() if isinstance(headers, dict) else headers
    return any(k == H_REROUTED for k, _ in pairs)


async def forward_all(topic: TopicT, records: list[tuple[bytes, bytes, int, int, int, float, list[tuple[str, bytes]]]]) -> None:
    """Send each (key, value, owner partition, source partition, source offset, timestamp s, headers)
    and return once every one is acknowledged (acks=all), retrying the failed ones: the caller commits
    the source offsets only after this, so a re-routed record is at least once on its owner partition
    (a copy sent twice, after a crash, is dropped by event_id like any producer retry)."""
    pending = records
    delay = RETRY_FIRST_S
    while pending:
        # force: sent now, not attached to the current event (Faust would publish it only at commit)
        futures = [await topic.send(key=k, value=v, partition=owner, timestamp=ts, force=True,
                                    headers=[*headers, (H_REROUTED, f"{p}:{o}".encode())])
                   for k, v, owner, p, o, ts, headers in pending]
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [r for r, res in zip(pending, results) if isinstance(res, BaseException)]
        if failed:
            log.warning("re-routing: %d of %d records not acknowledged (%r); sent again in %.1f s",
                        len(failed), len(pending), next(res for res in results if isinstance(res, BaseException)),
                        delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
        pending = failed
