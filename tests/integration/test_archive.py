import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recstream.data import Dataset, ShopConfig, shop_dataset
from schemas import Event
from streams import archive as archive_mod
from streams.archive import Archive, dataset_dir, group_id, read_archive
from streams.deadletter import DeadLetter
from streams.lag import group_lag
from streams.producer import create_producer
from streams.replay import publish, publish_dataset
from streams.topics import ensure_topics
from tests.integration.conftest import read_topic

ROOT = Path(__file__).resolve().parents[2]
SHOP = ShopConfig(users=30, products=150, seed=3, end_s=1_764_000_000.0)
BAD = b'{"event_id":"bad-1","user_id":"u1","event_type":"teleport"}'
RUN_ARCHIVE = "import asyncio; from recstream.settings import load; from streams.archive import run; asyncio.run(run(load()))"


async def wait_caught_up(s, records: int, timeout_s: float = 120):
    """Until the archive group's committed offsets reach the end of every partition (and `records` in all)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lags = await group_lag(s, group_id(s), s.topic("clickstream"))
        if sum(p.end for p in lags) == records and all(p.committed == p.end for p in lags):
            return lags
        assert time.monotonic() < deadline, f"archive not caught up: {lags}"
        await asyncio.sleep(0.5)


def utc_folder(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("dt=%Y-%m-%d/hour=%H")


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


async def test_archive_writes_hourly_parquet_commits_after_and_dead_letters(fresh, tmp_path):
    s = fresh(home_dir=tmp_path, archive_flush_records=1000, archive_flush_interval_s=1.0)
    await ensure_topics(s)
    data = shop_dataset(SHOP)
    producer = create_producer(s)
    await producer.start()
    try:
        await publish(producer, s.topic("clickstream"), data.events, progress=False)
        bad = await producer.send_and_wait(s.topic("clickstream"), BAD, key=b"u1")
    finally:
        await producer.stop()

    archive, stop = Archive(s), asyncio.Event()
    task = asyncio.create_task(archive.run(stop))
    lags = await wait_caught_up(s, len(data.events) + 1)
    stop.set()
    await asyncio.wait_for(task, 30)

    # Every event came back whole, once; the malformed one did not.
    table = read_archive(dataset_dir(s))
    back = [Event.from_dict({k: v for k, v in row.items() if v is not None}) for row in table.to_pylist()]
    assert sorted(back, key=lambda e: e.event_id) == sorted(data.events, key=lambda e: e.event_id)
    assert table.num_rows == len(set(table.column("event_id").to_pylist())) == len(data.events)
    # Files sit in the UTC date/hour folder of every event they hold; no temp file is left.
    files = files_under(dataset_dir(s))
    assert files and all(p.name.startswith("part-") and p.suffix == ".parquet" for p in files)
    for path in files:
        folder = path.parent.relative_to(dataset_dir(s)).as_posix()
        assert {utc_folder(ts) for ts in pq.read_table(path).column("timestamp").to_pylist()} == {folder}
    assert {p.parent.relative_to(dataset_dir(s)).as_posix() for p in files} == {utc_folder(e.timestamp) for e in data.events}
    # Offsets were committed past every record, the dead letter's included; the stats agree.
    assert archive.stats.committed == {p.partition: p.end for p in lags}
    assert archive.stats.archived == len(data.events) and archive.stats.files == len(files)
    assert archive.stats.dead_letters == 1 and archive.stats.buffered == 0
    # The malformed record is in the dead-letter topic, raw, with where it came from and why.
    letters = [DeadLetter.from_headers(m.key, m.value, list(m.headers)) for m in await read_topic(s, s.topic("deadletter"))]
    assert len(letters) == 1
    letter = letters[0]
    assert (letter.value, letter.key, letter.source_topic, letter.partition, letter.offset) == (
        BAD, b"u1", s.topic("clickstream"), bad.partition, bad.offset)
    assert letter.field == "session_id" and "event_type" in letter.reason


def start_archive(s, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RECSTREAM_TOPIC_PREFIX": s.topic_prefix, "RECSTREAM_APP_ID": s.app_id,
           "RECSTREAM_HOME_DIR": str(s.home_dir), "RECSTREAM_ARCHIVE_FLUSH_RECORDS": "500",
           "RECSTREAM_CLICKSTREAM_PARTITIONS": str(s.clickstream_partitions)}
    with log.open("ab") as err:
        return subprocess.Popen([sys.executable, "-c", RUN_ARCHIVE], cwd=ROOT, env=env, stderr=err)


async def wait_for(cond, timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_archive_killed_mid_stream_loses_nothing_on_restart(fresh, tmp_path):
    s = fresh(home_dir=tmp_path)
    await ensure_topics(s)
    events = shop_dataset(SHOP).events
    head, tail = events[:800], events[800:]
    log = tmp_path / "archive.log"
    producer = create_producer(s)
    await producer.start()
    first = start_archive(s, log)
    try:
        await publish(producer, s.topic("clickstream"), head, progress=False)
        await wait_for(lambda: any(dataset_dir(s).rglob("part-*.parquet")), what="the first Parquet file")
        # The rest arrives over ~3 s while the archive consumes it; kill it in the middle.
        rest = asyncio.create_task(publish(producer, s.topic("clickstream"), tail, rate_per_s=500, progress=False))
        await asyncio.sleep(1.0)
        assert first.poll() is None and not rest.done()
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        await rest  # returns once every event is acknowledged by the broker
        killed_at = sum(max(p.committed, 0) for p in await group_lag(s, group_id(s), s.topic("clickstream")))
        assert 0 < killed_at < len(events)

        second = start_archive(s, log)
        try:
            await wait_caught_up(s, len(events))
            second.send_signal(signal.SIGTERM)  # clean shutdown
            assert second.wait(30) == 0, log.read_text()
        finally:
            if second.poll() is None:
                second.kill()
    finally:
        if first.poll() is None:
            first.kill()
        await producer.stop()

    assert "Traceback" not in log.read_text(), log.read_text()
    written = sum(pq.read_metadata(p).num_rows for p in dataset_dir(s).rglob("part-*.parquet"))
    ids = read_archive(dataset_dir(s)).column("event_id").to_pylist()
    assert sorted(ids) == sorted(e.event_id for e in events)  # nothing lost, each once
    assert written >= len(ids)  # rows written twice (killed between rename and commit) are dropped on read
    assert not [p for p in files_under(dataset_dir(s)) if not p.name.startswith(".")
                and not (p.name.startswith("part-") and p.suffix == ".parquet")]


class Crash(Exception):
    """Stands for a process death after the files are durable and before the commit."""


async def test_a_crash_between_rename_and_commit_repeats_rows_that_read_archive_drops(fresh, tmp_path, monkeypatch):
    s = fresh(home_dir=tmp_path, archive_flush_records=1000, archive_flush_interval_s=1.0)
    events = shop_dataset(SHOP).events
    await publish_dataset(s, Dataset("shop", events), progress=False)

    real_write = archive_mod.write_batch

    def write_then_die(root, rows):
        real_write(root, rows)
        raise Crash

    monkeypatch.setattr(archive_mod, "write_batch", write_then_die)
    crashed = Archive(s)
    with pytest.raises(Crash):
        await asyncio.wait_for(crashed.run(asyncio.Event()), 60)
    monkeypatch.undo()
    assert all(p.committed == -1 for p in await group_lag(s, group_id(s), s.topic("clickstream")))
    assert any(dataset_dir(s).rglob("part-*.parquet"))

    # Restarted with other flush boundaries, it reads the same records again into other files.
    restarted, stop = Archive(dataclasses.replace(s, archive_flush_records=700)), asyncio.Event()
    task = asyncio.create_task(restarted.run(stop))
    await wait_caught_up(s, len(events))
    stop.set()
    await asyncio.wait_for(task, 30)

    written = sum(pq.read_metadata(p).num_rows for p in dataset_dir(s).rglob("part-*.parquet"))
    # Some of the first flush's rows are on disk twice; not all 1000, since a file whose partition,
    # hour and first/last offsets came out the same was rewritten in place (os.replace).
    assert len(events) < written <= len(events) + 1000
    ids = read_archive(dataset_dir(s)).column("event_id").to_pylist()
    assert sorted(ids) == sorted(e.event_id for e in events)


async def test_a_rebalance_flushes_and_commits_before_the_partitions_move(fresh, tmp_path):
    # Neither size nor time would flush: only the revocation does.
    s = fresh(home_dir=tmp_path, archive_flush_records=100_000, archive_flush_interval_s=3600.0)
    events = shop_dataset(SHOP).events
    await publish_dataset(s, Dataset("shop", events), progress=False)

    first, second, stop = Archive(s), Archive(s), asyncio.Event()
    tasks = [asyncio.create_task(first.run(stop))]
    await wait_for(lambda: first.stats.buffered == len(events), what="the first member to buffer every event")
    assert first.stats.files == 0
    tasks.append(asyncio.create_task(second.run(stop)))  # joins the group: the partitions are revoked
    lags = await wait_caught_up(s, len(events))
    assert first.stats.archived == len(events) and first.stats.buffered == 0
    assert first.stats.committed == {p.partition: p.end for p in lags}
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert sorted(read_archive(dataset_dir(s)).column("event_id").to_pylist()) == sorted(e.event_id for e in events)


async def test_a_clean_shutdown_flushes_what_is_buffered(fresh, tmp_path):
    s = fresh(home_dir=tmp_path, archive_flush_records=100_000, archive_flush_interval_s=3600.0)
    events = shop_dataset(SHOP).events[:300]
    await publish_dataset(s, Dataset("shop", events), progress=False)

    archive, stop = Archive(s), asyncio.Event()
    task = asyncio.create_task(archive.run(stop))
    await wait_for(lambda: archive.stats.buffered == len(events), what="every event buffered")
    assert archive.stats.files == 0 and not dataset_dir(s).exists()
    stop.set()
    await asyncio.wait_for(task, 30)
    await wait_caught_up(s, len(events), timeout_s=5)
    assert archive.stats.flushes == 1 and archive.stats.archived == len(events)
    assert read_archive(dataset_dir(s)).num_rows == len(events)
