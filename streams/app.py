"""The Faust application: one App per process, configured from Settings; topics carry raw bytes."""
from __future__ import annotations

import fcntl
import itertools
import os
from pathlib import Path
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from recstream.settings import Settings

# faust-streaming 0.15.3 hard-codes the consumer's fetch_max_wait_ms at 1500 (drivers/aiokafka.py).
# After a stall (GC, a slow Redis call, a paused process) the worker then settles into waiting up
# to 1.5 s per fetch and events wait as long: measured p50 ~1.5 s at 5,787 events/s, where 100 ms
# recovered within seconds (bench/RESULTS.md). The broker still answers at once when data is there.
FETCH_MAX_WAIT_MS = 100


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts its fetcher
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class App(faust.App):
    datadir_lock: int | None = None   # fd holding this process's claim on its datadir (see claim_datadir)

    def _new_transport(self) -> _Transport:
        return _Transport(self.conf.broker_consumer, self)

    async def on_shutdown(self) -> None:   # after the tables (children) stopped
        await super().on_shutdown()
        if self.datadir_lock is not None:
            os.close(self.datadir_lock)   # closing the fd releases the flock
            self.datadir_lock = None


def claim_datadir(root: Path) -> tuple[Path, int]:
    """The first of `root`, `root.1`, `root.2`, ... that no other running process holds, and the fd of
    the lock that holds it (flock: released when the process ends, however it ends).

    Each process needs a table directory of its own: RocksDB locks a partition's database for one
    process, and Faust opens partitions as they are assigned, standbys too, so two workers of one app
    sharing a directory crash on the first partition both open ("IO error: While lock file ...
    user-sessions-0.db/LOCK"). A restarted worker usually gets its old slot back and recovers from its
    own RocksDB files; a new one starts empty and restores its partitions from the changelog."""
    for i in itertools.count():
        path = root if i == 0 else root.with_name(f"{root.name}.{i}")
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / ".worker.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return path, fd
    raise AssertionError("unreachable")


def create_app(s: Settings) -> faust.App:
    """Values travel as raw bytes and are decoded by `schemas` in the agents, so that a record that
    fails to decode reaches the dead-letter topic instead of stopping the stream."""
    datadir, lock = claim_datadir((s.home_dir / "faust").resolve() / s.app_id)
    app = App(
        s.app_id,
        broker=f"kafka://{s.kafka_bootstrap}",
        store=s.table_store,
        datadir=str(datadir),
        table_standby_replicas=s.table_standby_replicas,
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
    app.datadir_lock = lock
    return app


def raw_topic(app: faust.App, name: str) -> faust.TopicT:
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
