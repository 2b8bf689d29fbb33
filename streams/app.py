"""The Faust application: one App per process, configured from Settings; topics carry raw bytes."""
from __future__ import annotations

import faust

from recstream.settings import Settings


def create_app(s: Settings) -> faust.App:
    """Values travel as raw bytes and are decoded by `schemas` in the agents, so that a record that
    fails to decode reaches the dead-letter topic instead of stopping the stream."""
    datadir = (s.home_dir / "faust").resolve()
    datadir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        s.app_id,
        broker=f"kafka://{s.kafka_bootstrap}",
        store=s.table_store,
        datadir=str(datadir / s.app_id),
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=s.clickstream_partitions,
        topic_replication_factor=s.replication_factor,
        producer_acks=-1,  # all in-sync replicas
        producer_linger_ms=s.producer_linger_ms,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        web_enabled=False,
    )


def raw_topic(app: faust.App, name: str) -> faust.TopicT:
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
