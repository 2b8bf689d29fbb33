"""The project's topics: names, partitions, keys and configs in one table; created idempotently."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from recstream.settings import Settings


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    key: str
    record: str
    doc: str
    config: dict[str, str] = field(default_factory=dict)


def specs(s: Settings) -> list[TopicSpec]:
    retention_ms = str(s.clickstream_retention_h * 3600 * 1000)
    return [
        TopicSpec(s.topic("clickstream"), s.clickstream_partitions, "user_id", "schemas.Event",
                  "interaction events, keyed by user so one user's events stay in order",
                  {"retention.ms": retention_ms, "min.insync.replicas": "1"}),
        TopicSpec(s.topic("catalogue"), s.clickstream_partitions, "product_id", "schemas.Product",
                  "catalogue upserts; compacted, the latest record per product wins",
                  {"cleanup.policy": "compact"}),
        TopicSpec(s.topic("rec.requests"), s.request_partitions, "user_id or product_id", "schemas.RecommendationRequest",
                  "recommendation requests, API -> retrieval agents", {"retention.ms": str(3600 * 1000)}),
        TopicSpec(s.topic("rec.replies"), s.request_partitions, "request_id", "schemas.RecommendationReply",
                  "replies to requests that name no reply topic (Kafka-native callers; each API process has its own)",
                  {"retention.ms": str(3600 * 1000)}),
        TopicSpec(s.topic("rec.candidates"), s.request_partitions, "user_id or product_id", "schemas.CandidateSet",
                  "retrieved candidates, retrieval -> ranking agents", {"retention.ms": str(3600 * 1000)}),
        TopicSpec(s.topic("model.updates"), 1, "model name", "model version announcement",
                  "new model versions for the serving agents to load; compacted",
                  {"cleanup.policy": "compact"}),
        TopicSpec(s.topic("exposures"), s.clickstream_partitions, "user_id (else the unit)", "schemas.Exposure",
                  "every served recommendation list, API -> attribution (A/B metrics); keyed like the clickstream",
                  {"retention.ms": str(s.exposures_retention_h * 3600 * 1000)}),
        TopicSpec(s.topic("erasures"), s.clickstream_partitions, "user_id", "schemas.Erasure",
                  "shoppers erased on request; compacted (one record per shopper, kept for ever: the list later "
                  "events are checked against); co-partitioned with the clickstream, so a shopper's erasure reaches "
                  "the feature worker that holds their session",
                  {"cleanup.policy": "compact"}),
        TopicSpec(s.topic("deadletter"), 1, "source topic", "raw bytes + x-error-* headers",
                  "records that failed to decode or validate, kept with the reason",
                  {"retention.ms": str(30 * 24 * 3600 * 1000)}),
    ]


def reply_spec(s: Settings, instance: str) -> TopicSpec:
    """The reply topic of one API process (ranking -> that process): made when it starts, deleted when it stops."""
    return TopicSpec(s.topic(f"rec.replies.{instance}"), 1, "request_id", "schemas.RecommendationReply",
                     "replies for one API process", {"retention.ms": str(600 * 1000)})


async def delete_topics(s: Settings, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        await admin.delete_topics(names, timeout_ms=15000)
    finally:
        await admin.close()


def spec(s: Settings, short_name: str) -> TopicSpec:
    name = s.topic(short_name)
    return next(t for t in specs(s) if t.name == name)


async def ensure_topics(s: Settings, wanted: list[TopicSpec] | None = None) -> dict[str, str]:
    """Create missing topics; report existing ones, and refuse one with too few partitions."""
    wanted = specs(s) if wanted is None else wanted
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        created: set[str] = set()
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            new = [NewTopic(t.name, t.partitions, s.replication_factor, topic_configs=t.config) for t in missing]
            response = await admin.create_topics(new, timeout_ms=15000)
            for name, code, *_ in response.topic_errors:
                if code == 0:
                    created.add(name)
                elif code != TopicAlreadyExistsError.errno:  # a concurrent creator, or stale metadata
                    raise RuntimeError(f"creating topic {name} failed with Kafka error code {code}")
        have = await _partition_counts(admin, [t.name for t in wanted])
        states = {}
        for t in wanted:
            if have[t.name] < t.partitions:
                raise RuntimeError(f"topic {t.name} has {have[t.name]} partitions, settings ask for {t.partitions}; "
                                   "add partitions with kafka-topics --alter (keys would move) or lower the setting")
            states[t.name] = f"{'created' if t.name in created else 'exists'} ({have[t.name]} partitions)"
        return states
    finally:
        await admin.close()


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float = 30) -> dict[str, int]:
    """Partitions per topic; a topic created a moment ago may show none until metadata settles."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        counts = {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(names) if not d["error_code"]}
        if all(counts.get(n, 0) > 0 for n in names) or asyncio.get_running_loop().time() > deadline:
            return {n: counts.get(n, 0) for n in names}
        await asyncio.sleep(0.1)
