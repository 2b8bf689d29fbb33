"""The exposure journal: an API process writes each exposure to a local file before its answer leaves,
so a process that dies does not take its unsent exposures with it. Exposures are then at least once;
the attribution worker counts an exposure once by its request id (streams/attribution.py).

Files: `{home}/exposures/{topic}/{instance}-{n}.jsonl`, one exposure (JSON) a line, each appended with one
write(): the page cache keeps it when the process dies (a machine crash may lose the last lines: no
fsync per answer). The writing process holds an exclusive flock on each of its segments. A segment
is closed after SEGMENT_RECORDS lines or SEGMENT_S seconds, and once every line of a closed segment
has an answer from Kafka it is deleted (all acked) or released, lock dropped, for a resend (a send
failed). `recover` takes every segment no process holds: its writer died, or released it. It sends
the lines again and deletes the file after the acks. The API runs it at start and every RECOVER_S.
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SEGMENT_RECORDS = 10_000
SEGMENT_S = 10.0
RECOVER_S = 30.0


@dataclass
class Segment:
    path: Path
    fd: int
    opened_at: float
    written: int = 0
    acked: int = 0
    failed: int = 0
    closed: bool = False

    @property
    def settled(self) -> bool:
        return self.closed and self.acked + self.failed == self.written


class Journal:
    def __init__(self, folder: Path, instance: str, clock: Callable[[], float] = time.monotonic):
        self.folder, self.instance, self.clock = folder, instance, clock
        folder.mkdir(parents=True, exist_ok=True)
        self._n = 0
        self._current: Segment | None = None
        self._open: dict[Path, Segment] = {}     # this process's segments not settled yet

    def append(self, line: bytes) -> Segment:
        """Write one exposure; the segment it went to (for `settle`). OSError (disk full): not journaled."""
        seg = self._current
        if seg is None or seg.written >= SEGMENT_RECORDS or self.clock() - seg.opened_at >= SEGMENT_S:
            self._close_current()
            seg = self._current = self._new_segment()
        os.write(seg.fd, line + b"\n")
        seg.written += 1
        return seg

    def settle(self, seg: Segment, ok: bool) -> None:
        """Kafka's answer for one line of `seg`: acked, or failed (the line stays for a resend)."""
        if ok:
            seg.acked += 1
        else:
            seg.failed += 1
        self._finish_if_settled(seg)

    def close(self) -> None:
        """Stop writing (the app stops); segments with answers still pending are finished by `settle`."""
        self._close_current()

    def pending(self) -> int:
        """Lines written by this process that Kafka has not answered yet."""
        return sum(seg.written - seg.acked - seg.failed for seg in self._open.values())

    async def recover(self, send: Callable[[bytes], Awaitable[None]]) -> int:
        """Send again the lines of every segment no process holds, deleting each once sent; the lines sent.
        `send` returns once Kafka acknowledged the line and raises if it did not: the segment is then
        kept (released) for the next try."""
        sent = 0
        for path in sorted(self.folder.glob("*.jsonl")):
            if path in self._open:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:   # another process took and finished it
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:   # its writer is alive, or another process is recovering it
                    continue
                if not path.exists():     # finished by the process that held it a moment ago
                    continue
                with open(fd, "rb", closefd=False) as f:  # noqa: ASYNC230  (a small local file, at start-up)
                    lines = [x for x in f.read().split(b"\n") if x.strip()]
                for line in lines:
                    await send(line)
                path.unlink()
                sent += len(lines)
                log.info("exposure journal: %d exposures of %s sent again", len(lines), path.name)
            except Exception as exc:   # Kafka trouble: the file stays for the next try
                log.warning("exposure journal: %s not recovered yet: %r", path.name, exc)
            finally:
                os.close(fd)
        return sent

    def _new_segment(self) -> Segment:
        self._n += 1
        path = self.folder / f"{self.instance}-{self._n}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seg = Segment(path, fd, self.clock())
        self._open[path] = seg
        return seg

    def _close_current(self) -> None:
        if self._current is not None:
            self._current.closed = True
            self._finish_if_settled(self._current)
            self._current = None

    def _finish_if_settled(self, seg: Segment) -> None:
        if not seg.settled or seg.path not in self._open:
            return
        del self._open[seg.path]
        if not seg.failed:
            seg.path.unlink(missing_ok=True)
        os.close(seg.fd)   # releases the lock: a segment with failed lines is recovered later
