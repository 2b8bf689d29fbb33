"""The exposure journal (serving/journal.py): what an API process wrote before answering survives its death."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from serving import journal as jr
from serving.journal import Journal


class Kafka:
    """A send that acknowledges (or refuses, while `down`) and remembers what it was sent."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.down = False

    async def send(self, line: bytes) -> None:
        if self.down:
            raise ConnectionError("broker down")
        self.got.append(line)


def files(folder):
    return sorted(p.name for p in folder.glob("*.jsonl"))


async def test_a_segment_goes_once_every_line_is_acknowledged(tmp_path):
    j = Journal(tmp_path, "api-a")
    segs = [j.append(b'{"n": %d}' % i) for i in range(3)]
    assert files(tmp_path) == ["api-a-1.jsonl"] and j.pending() == 3
    for seg in segs:
        j.settle(seg, True)
    assert files(tmp_path) == ["api-a-1.jsonl"]   # still the open segment
    j.close()
    assert files(tmp_path) == [] and j.pending() == 0


async def test_segments_roll_by_count_and_age(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(jr, "SEGMENT_RECORDS", 2)
    j = Journal(tmp_path, "api-a", clock=lambda: now[0])
    a, b, c = (j.append(b"x") for _ in range(3))
    assert a is b and c is not a and files(tmp_path) == ["api-a-1.jsonl", "api-a-2.jsonl"]
    j.settle(a, True)
    j.settle(b, True)   # the first segment is closed and settled: deleted
    assert files(tmp_path) == ["api-a-2.jsonl"]
    now[0] = jr.SEGMENT_S
    assert j.append(b"y") is not c   # too old: a new one


async def test_a_failed_send_is_kept_released_and_sent_again(tmp_path):
    kafka = Kafka()
    j = Journal(tmp_path, "api-a")
    ok, failed = j.append(b'{"n": 1}'), j.append(b'{"n": 2}')
    j.settle(ok, True)
    j.settle(failed, False)
    assert await j.recover(kafka.send) == 0   # the open segment is this process's own
    j.close()                                  # closed with a failed line: released, not deleted
    assert files(tmp_path) == ["api-a-1.jsonl"]
    kafka.down = True
    assert await j.recover(kafka.send) == 0 and files(tmp_path) == ["api-a-1.jsonl"]   # kept for the next try
    kafka.down = False
    assert await j.recover(kafka.send) == 2 and files(tmp_path) == []   # the whole segment: at least once
    assert kafka.got == [b'{"n": 1}', b'{"n": 2}']


async def test_a_live_writers_segment_is_not_taken(tmp_path):
    kafka = Kafka()
    live = Journal(tmp_path, "api-a")
    live.append(b"mine")
    other = Journal(tmp_path, "api-b")
    assert await other.recover(kafka.send) == 0 and kafka.got == [] and files(tmp_path) == ["api-a-1.jsonl"]


@pytest.mark.parametrize("lines", [1, 50])
async def test_what_a_killed_process_wrote_is_recovered_by_the_next(tmp_path, lines):
    """A real process writes, then dies by SIGKILL before any ack: its lines are all sent again."""
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from serving.journal import Journal
        j = Journal(Path({str(tmp_path)!r}), "api-dead")
        for i in range({lines}):
            j.append(b'{{"n": %d}}' % i)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    kafka = Kafka()
    assert await Journal(tmp_path, "api-next").recover(kafka.send) == lines
    assert kafka.got == [b'{"n": %d}' % i for i in range(lines)] and files(tmp_path) == []
