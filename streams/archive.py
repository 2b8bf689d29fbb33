"""Archive consumer group: clickstream to hourly Parquet files; offsets are committed only after fsync.

Privacy (README "Personal data"): the worker follows the erasures topic (streams/erasures.py), drops the
events of erased shoppers (at take and again at flush), and rewrites the files that hold their earlier
events without them (streams/archive_erasure.py) in the background: for every erased id when it starts,
then for each new erasure. Once an hour it drops the date partitions older than
RECSTREAM_ARCHIVE_RETENTION_DAYS."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import ConsumerRecord

from recstream.settings import Settings
from schemas import Event, SchemaError
from schemas.arrow import arrow_schema, to_table
from streams.deadletter import DeadLetter
from streams.erasures import ErasureFollower
from streams.metrics import serve_metrics, worker_registry
from streams.producer import create_producer
from streams.reroute import is_copy

log = logging.getLogger(__name__)

DATASET = "clickstream"  # the folder under archive_dir, named after the topic without its prefix
MAX_POLL_RECORDS = 10_000

Row = tuple[int, Event]  # (source offset, event)


def group_id(s: Settings) -> str:
    return f"{s.app_id}-archive"


def dataset_dir(s: Settings) -> Path:
    return s.archive_dir / DATASET


# -- pure core: where each event goes ------------------------------------------------------------

def hour_folder(timestamp_s: float) -> str:
    """Hive-style partition of an event by its UTC date and hour: dt=YYYY-MM-DD/hour=HH."""
    t = time.gmtime(timestamp_s)
    return f"dt={t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}/hour={t.tm_hour:02d}"


def file_name(partition: int, first_offset: int, last_offset: int) -> str:
    return f"part-{partition}-{first_offset}-{last_offset}.parquet"


def plan_files(partition: int, rows: list[Row]) -> dict[str, list[Row]]:
    """One file per hour folder for one partition's buffered rows: "folder/name" -> rows in offset order.

    A name is determined by (partition, hour, first, last offset): a batch re-read after a crash
    that ends on the same offsets rewrites the same file with the same rows (os.replace)."""
    by_hour: dict[str, list[Row]] = defaultdict(list)
    for offset, event in sorted(rows, key=lambda r: r[0]):
        by_hour[hour_folder(event.timestamp)].append((offset, event))
    return {f"{folder}/{file_name(partition, group[0][0], group[-1][0])}": group for folder, group in by_hour.items()}


# -- durable files ---------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(folder: Path) -> None:
    """Create missing folders, fsyncing each parent so the new entries survive a power cut too."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        _fsync_dir(d.parent)


def write_atomic(path: Path, table: pa.Table) -> None:
    """Write to a hidden temporary name beside `path`, fsync, rename over `path`; the caller fsyncs
    the folder. Readers (pyarrow, Spark) skip names starting with '.', so a crash leaves no half file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_batch(root: Path, rows_by_partition: dict[int, list[Row]]) -> list[Path]:
    """Every partition's rows as hourly files, each durable (file and folder fsynced) on return."""
    written: list[Path] = []
    for partition, rows in rows_by_partition.items():
        for relative, group in plan_files(partition, rows).items():
            path = root / relative
            _make_dirs(path.parent)
            write_atomic(path, to_table([e for _, e in group], Event))
            written.append(path)
    for folder in {p.parent for p in written}:
        _fsync_dir(folder)
    return written


def _file_order(path: Path) -> tuple:
    _, partition, first, _last = path.stem.split("-")
    return (str(path.parent), int(partition), int(first))


def read_archive(path: Path) -> pa.Table:
    """The archived events under `path` (dataset_dir(s)), duplicates from at-least-once delivery
    dropped by event_id (the first in hour, partition, offset order is kept)."""
    schema = arrow_schema(Event)
    files = sorted(Path(path).glob("dt=*/hour=*/part-*.parquet"), key=_file_order)
    if not files:
        return schema.empty_table()
    table = ds.dataset([str(f) for f in files], schema=schema, format="parquet").to_table()
    return first_per_key(table, "event_id")


def first_per_key(table: pa.Table, key: str) -> pa.Table:
    """Keep each key's first row, in the table's order."""
    indexed = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    first = indexed.group_by(key, use_threads=False).aggregate([("__row", "min")]).column("__row_min")
    return table.take(pc.take(first, pc.sort_indices(first)))


# -- the consumer --------------------------------------------------------------------------------

@dataclass
class ArchiveStats:
    """Process-local figures for tests and the operations dashboard."""
    archived: int = 0           # events written to durable Parquet files
    files: int = 0              # Parquet files written (a rewrite after a re-read counts again)
    dead_letters: int = 0       # records refused and acknowledged on the dead-letter topic
    flushes: int = 0
    commit_failures: int = 0    # files written but offsets not committed (a rebalance): re-read later
    committed: dict[int, int] = field(default_factory=dict)  # partition -> next offset committed
    buffered: int = 0           # valid events waiting for the next flush
    erased_dropped: int = 0     # events of erased shoppers not archived
    erasure_rewrites: int = 0   # background rewrites done (each for the erasures known then)
    erasure_pending: int = 0    # erased shoppers whose archived events are still to be rewritten away
    erasure_files_rewritten: int = 0
    erasure_rows_removed: int = 0
    partitions_expired: int = 0  # dt= folders dropped by the retention policy


@dataclass
class _Pending:
    rows: list[Row] = field(default_factory=list)
    next_offset: int = 0  # last consumed offset + 1, valid or dead-lettered


class Archive:
    """One member of the archive group; `run` consumes until `stop` is set, then flushes."""

    def __init__(self, s: Settings):
        self.s = s
        self.topic = s.topic("clickstream")
        self.root = dataset_dir(s)
        self.stats = ArchiveStats()
        self._pending: dict[TopicPartition, _Pending] = {}
        self._oldest: float | None = None  # monotonic time the oldest unflushed record arrived
        self._lock = asyncio.Lock()         # a batch and a flush never interleave
        self._consumer: AIOKafkaConsumer | None = None
        self._producer = None
        self.erasures = ErasureFollower(s)

    async def run(self, stop: asyncio.Event) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.s.kafka_bootstrap, group_id=group_id(self.s), client_id=group_id(self.s),
            enable_auto_commit=False, auto_offset_reset="earliest",
            fetch_min_bytes=self.s.background_fetch_min_bytes, fetch_max_wait_ms=500)
        self._consumer.subscribe([self.topic], listener=_FlushOnRevoke(self))
        self._producer = create_producer(self.s)
        await self._producer.start()
        await self.erasures.start()
        await self.erasures.catch_up()
        upkeep = asyncio.create_task(self._upkeep(stop), name="archive-erasures-and-retention")
        try:
            await self._consumer.start()
            log.info("archive group %s consuming %s into %s", group_id(self.s), self.topic, self.root)
            while not stop.is_set():
                batch = await self._consumer.getmany(timeout_ms=self._wait_ms(), max_records=self._room())
                async with self._lock:
                    for tp, msgs in batch.items():
                        await self._take(tp, msgs)
                    if self._due():
                        await self.flush("size" if self.stats.buffered >= self.s.archive_flush_records else "interval")
            async with self._lock:
                await self.flush("shutdown")
        finally:
            upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upkeep
            await self.erasures.stop()
            await self._consumer.stop()
            await self._producer.stop()

    async def _upkeep(self, stop: asyncio.Event) -> None:
        """In the background: the archive rewritten without erased shoppers (every one known at start,
        then each new one, a second after it is read), and the partitions past retention dropped hourly."""
        from streams.archive_erasure import drop_expired, rewrite_without  # (it writes with this module's helpers)

        todo, next_retention = set(self.erasures.ids), 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + 3600
                    gone = await asyncio.to_thread(drop_expired, self.root, self.s.archive_retention_days)
                    self.stats.partitions_expired += len(gone)
                todo |= await self.erasures.poll(1000)
                self.stats.erasure_pending = len(todo)
                if todo:
                    users, todo = todo, set()
                    done = await asyncio.to_thread(rewrite_without, self.root, users, _log_progress(len(users)),
                                                   self.s.erasure_cpu_share)
                    self.stats.erasure_rewrites += 1
                    self.stats.erasure_files_rewritten += done.files_rewritten
                    self.stats.erasure_rows_removed += done.rows_removed
                    self.stats.erasure_pending = len(todo)
            except asyncio.CancelledError:
                raise
            except Exception:   # the archive goes on; the ids are tried again on the next pass
                log.exception("archive erasure or retention failed; tried again in 10 s")
                todo |= self.erasures.ids
                await asyncio.sleep(10)

    def metrics_snapshot(self) -> dict:
        """Counters for Prometheus (streams/metrics.py), read at scrape time."""
        st = self.stats
        return {"agent": "archive", "archived": st.archived, "dead_letters": st.dead_letters, "files": st.files,
                "batches": st.flushes, "commit_failures": st.commit_failures, "buffered": st.buffered,
                "erased_dropped": st.erased_dropped, "erasure_pending": st.erasure_pending,
                "erasure_files_rewritten": st.erasure_files_rewritten, "erasure_rows_removed": st.erasure_rows_removed,
                "partitions_expired": st.partitions_expired}

    def _room(self) -> int:
        return max(1, min(MAX_POLL_RECORDS, self.s.archive_flush_records - self.stats.buffered))

    def _wait_ms(self) -> int:
        if self._oldest is None:
            return 500
        left = self._oldest + self.s.archive_flush_interval_s - time.monotonic()
        return int(min(500, max(0, left * 1000)))

    def _due(self) -> bool:
        if not self._pending:
            return False
        return (self.stats.buffered >= self.s.archive_flush_records
                or time.monotonic() - self._oldest >= self.s.archive_flush_interval_s)

    async def _take(self, tp: TopicPartition, msgs: list[ConsumerRecord]) -> None:
        """Buffer valid events; send refused records to the dead-letter topic and wait for the ack,
        so their offsets may be committed with the next flush.

        A batch fetched before a rebalance may arrive after it: records of a partition now owned by
        another member are left to it, and records already buffered (the position was reset to the
        committed offset) are not buffered twice."""
        if not msgs or tp not in self._consumer.assignment():
            return
        pending = self._pending.setdefault(tp, _Pending(next_offset=msgs[0].offset))
        msgs = [m for m in msgs if m.offset >= pending.next_offset]
        if not msgs:
            return
        acks = []
        for msg in msgs:
            if is_copy(msg.headers):
                continue   # a re-routed copy for the feature agents (streams/reroute.py): its original is archived
            try:
                event = Event.from_json(msg.value or b"")
            except SchemaError as exc:
                letter = _letter(msg, exc)
                log.warning("dead letter from %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, letter.reason)
                acks.append(await self._producer.send(self.s.topic("deadletter"), letter.value or b"",
                                                      key=letter.key, headers=letter.headers()))
                continue
            if event.user_id in self.erasures.ids:
                self.stats.erased_dropped += 1
                continue
            pending.rows.append((msg.offset, event))
            self.stats.buffered += 1
        await asyncio.gather(*acks)
        self.stats.dead_letters += len(acks)
        pending.next_offset = msgs[-1].offset + 1
        if self._oldest is None:
            self._oldest = time.monotonic()

    async def flush(self, reason: str) -> None:
        """Write every buffered event durably, then commit the offsets past them (never before)."""
        if not self._pending:
            return
        pending, self._pending, self._oldest = self._pending, {}, None
        self.stats.buffered -= sum(len(p.rows) for p in pending.values())  # written below, or read again
        erased = self.erasures.ids   # (erasures read since the rows were taken)
        rows = {tp.partition: kept for tp, p in pending.items()
                if (kept := [r for r in p.rows if r[1].user_id not in erased])}
        self.stats.erased_dropped += sum(len(p.rows) for p in pending.values()) - sum(map(len, rows.values()))
        archived = sum(map(len, rows.values()))
        started = time.perf_counter()
        files = await asyncio.to_thread(write_batch, self.root, rows) if rows else []
        self.stats.archived += archived
        self.stats.files += len(files)
        self.stats.flushes += 1
        offsets = {tp: p.next_offset for tp, p in pending.items()}
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The files are durable; the new owner re-reads these records and downstream drops repeats.
            self.stats.commit_failures += 1
            log.warning("archive commit failed after %s flush (%s); records will be read again", reason, exc)
        else:
            self.stats.committed.update({tp.partition: o for tp, o in offsets.items()})
        log.info("archive %s flush: %d events in %d files in %.2f s; %d archived, %d dead letters; committed %s",
                 reason, archived, len(files), time.perf_counter() - started, self.stats.archived,
                 self.stats.dead_letters, dict(sorted(self.stats.committed.items())))

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Flush and commit before the partitions move. The buffer is emptied even if that fails:
        every partition's next owner (this member too) starts again from its last committed offset."""
        async with self._lock:
            await self.flush("rebalance")


class _FlushOnRevoke(ConsumerRebalanceListener):
    def __init__(self, archive: Archive):
        self.archive = archive

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.archive.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("archive assigned %s", sorted(tp.partition for tp in assigned))


def _log_progress(users: int) -> Callable[[int, int, int], None]:
    def report(done: int, total: int, removed: int) -> None:
        if done == total or done % 500 == 0:
            log.info("archive erasure of %d shoppers: %d/%d files scanned, %d rows removed", users, done, total, removed)
    return report


def _letter(msg: ConsumerRecord, error: SchemaError) -> DeadLetter:
    first = error.errors[0]
    return DeadLetter(msg.topic, msg.partition, msg.offset, first.field, "; ".join(map(str, error.errors)),
                      msg.key, msg.value)


async def run(s: Settings, stop: asyncio.Event | None = None) -> None:
    """Run one archive group member until `stop` is set, or, without one, until SIGTERM or SIGINT."""
    handled: list[int] = []
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
    try:
        archive = Archive(s)
        serve_metrics(s.metrics_port, worker_registry("archive", archive.metrics_snapshot))
        await archive.run(stop)
    finally:
        for sig in handled:
            asyncio.get_running_loop().remove_signal_handler(sig)
