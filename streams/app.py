"""The Faust application: one App per process, configured from Settings; topics carry raw bytes."""
from __future__ import annotations

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from recstream.settings import Settings

# faust-streaming 0.15.3 hard-codes the consumer's fetch_max_wait_ms at 1500 (drivers/aiokafka.py).
# After a stall (GC, a slow Redis call, a paused process) the worker then settles into waiting up
# to 1.5 s per fetch and events wait as long: measured p50 ~1.5 s at 5,787 events/s, where 100 ms
# recovered within seconds (bench/RESULTS.md). The broker still answers at once when data is there.
FETCH_MAX_WAIT_MS = 100


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts its fetcher
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class App(faust.App):
    def _new_transport(self):
        return _Transport(self.conf.broker_consumer, self)


def create_app(s: Settings) -> faust.App:
    """Values travel as raw bytes and are decoded by `schemas` in the agents, so that a record that
    fails to decode reaches the dead-letter topic instead of stopping the stream."""
    datadir = (s.home_dir / "faust").resolve()
    datadir.mkdir(parents=True, exist_ok=True)
    return App(
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
        # a crashed worker's partitions move after 10 s, not Faust's default 60 s
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        broker_commit_interval=1.0,
        web_enabled=False,
    )


def raw_topic(app: faust.App, name: str) -> faust.TopicT:
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
