"""The archive's side of privacy: rewrite the Parquet files that hold erased shoppers' events without
them, and drop the date partitions older than the retention policy (RECSTREAM_ARCHIVE_RETENTION_DAYS).

Both write as the archive does (streams/archive.py): a rewritten file goes to a hidden temporary name,
is fsynced and renamed over the old one, then the folder is fsynced, so a reader (pyarrow, Spark) sees
the old file or the new one, never half of one, and a crash leaves the old file in place. Both are safe
to re-run: a file without the shoppers is only read (its user_id column), never written; a partition
already dropped is not there. The archive worker runs the rewrite when it reads an erasure (and once
for every erased id when it starts); `recstream erase` runs it in its own process too.
"""
from __future__ import annotations

import calendar
import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streams.archive import _fsync_dir, write_atomic

log = logging.getLogger(__name__)

Progress = Callable[[int, int, int], None]   # (files scanned, files in all, rows removed so far)


@dataclass
class RewriteResult:
    files_scanned: int = 0
    files_rewritten: int = 0      # rewritten without the rows (or removed: every row was erased)
    rows_removed: int = 0
    bytes_read: int = 0           # size of the files rewritten, before
    bytes_rewritten: int = 0      # size of the files written in their place
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)   # relative names of the files rewritten

    def to_json(self) -> dict[str, float]:
        return {"files_scanned": self.files_scanned, "files_rewritten": self.files_rewritten,
                "rows_removed": self.rows_removed, "bytes_rewritten": self.bytes_rewritten,
                "seconds": round(self.seconds, 3)}


def archive_files(root: Path) -> list[Path]:
    return sorted(Path(root).glob("dt=*/hour=*/part-*.parquet"))


def rewrite_without(root: Path, users: Iterable[str], progress: Progress | None = None,
                    cpu_share: float = 1.0) -> RewriteResult:
    """Every archive file under `root` that holds an event of `users`, rewritten without those events
    (a file left with none is removed). Reads only the user_id column of the files it keeps.

    It runs beside serving (the archive worker's host, or wherever `recstream erase` runs), so it yields:
    the calling thread's CPU priority is lowered to the lowest (nice 19; Linux schedules threads on their
    own), and after each file it sleeps long enough to use at most `cpu_share` of one core (1: no pause).
    bench/erasure.py measured serving's p99 with and without these (bench/RESULTS.md, "erasure")."""
    wanted = pa.array(sorted(set(users)), pa.string())
    out = RewriteResult()
    started = time.perf_counter()
    files = archive_files(root)
    _lowest_priority()
    for i, path in enumerate(files, 1):
        t = time.perf_counter()
        with contextlib.suppress(FileNotFoundError):   # (retention dropped its partition meanwhile)
            _rewrite_one(root, path, wanted, out)
        out.files_scanned += 1
        if 0 < cpu_share < 1:
            time.sleep((time.perf_counter() - t) * (1 / cpu_share - 1))
        if progress is not None:
            progress(i, len(files), out.rows_removed)
    out.seconds = time.perf_counter() - started
    if out.files_rewritten:
        log.info("archive erasure: %d rows removed from %d of %d files (%d bytes rewritten) in %.2f s",
                 out.rows_removed, out.files_rewritten, out.files_scanned, out.bytes_rewritten, out.seconds)
    return out


def _lowest_priority() -> None:
    """nice 19 for the calling thread only (a thread is a task of its own to Linux's scheduler)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _rewrite_one(root: Path, path: Path, wanted: pa.Array, out: RewriteResult) -> None:
    if len(wanted) == 0:
        return
    # use_threads=False: pyarrow's pool threads would run at normal priority beside serving (measured:
    # bench/RESULTS.md, "erasure"); on the calling thread the work stays at nice 19 and within the share
    hit = pc.is_in(pq.read_table(path, columns=["user_id"], use_threads=False).column("user_id"), value_set=wanted)
    n = pc.sum(hit).as_py() or 0
    if not n:
        return
    table = pq.read_table(path, use_threads=False)
    kept = table.filter(pc.invert(pc.is_in(table.column("user_id"), value_set=wanted)))
    out.bytes_read += path.stat().st_size
    if kept.num_rows:
        write_atomic(path, kept)
        out.bytes_rewritten += path.stat().st_size
    else:
        os.unlink(path)
    _fsync_dir(path.parent)
    out.files_rewritten += 1
    out.rows_removed += n
    out.files.append(str(path.relative_to(root)))


def partition_day(folder: Path) -> int | None:
    """The UTC day (Unix seconds of its midnight) a dt=YYYY-MM-DD folder holds; None for another name."""
    try:
        return calendar.timegm(time.strptime(folder.name, "dt=%Y-%m-%d"))
    except ValueError:
        return None


def expired_partitions(root: Path, retention_days: int, now_s: float) -> list[Path]:
    """The dt= folders whose every event is older than `retention_days` before `now_s` (none when 0)."""
    if retention_days <= 0 or not Path(root).exists():
        return []
    cutoff = now_s - retention_days * 86400
    return sorted(f for f in Path(root).glob("dt=*") if (day := partition_day(f)) is not None and day + 86400 <= cutoff)


def drop_expired(root: Path, retention_days: int, now_s: float | None = None) -> list[str]:
    """Remove the partitions past retention; their names."""
    gone = []
    for folder in expired_partitions(root, retention_days, time.time() if now_s is None else now_s):
        shutil.rmtree(folder, ignore_errors=True)
        gone.append(folder.name)
    if gone:
        _fsync_dir(Path(root))
        log.info("archive retention (%d days): dropped %s", retention_days, ", ".join(gone))
    return gone
