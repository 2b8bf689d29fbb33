"""streams.redisconn: commands packed by hiredis are the bytes redis-py would send, and its errors stay; a
sorted set's reply read in either protocol."""
import pytest
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from recstream.settings import load
from streams import redisconn
from streams.redisconn import connect, hiredis_packing

COMMANDS = [
    ("SMISMEMBER", "ns:oos", *[f"p{i:06d}" for i in range(300)]),
    ("ZADD", b"ns:z", 0.1, "a", 1e-05, b"b", 2, "c", -3.5, "d"),
    ("HSET", "user_features:{\u00e9l\u00e8ve}", "n", 10 ** 20, "s", "caf\u00e9"),
    ("EVALSHA", "a" * 40, 0, b'["x","y"]', memoryview(b"raw")),
    ("CONFIG GET", "maxmemory"),          # a two-word command name, split as redis-py does
    ("GET", b"k" * 70_000),               # over redis-py's buffer cutoff: chunked there, one buffer here
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: str(c[0]))
def test_hiredis_packs_the_bytes_redis_py_packs(cmd):
    ours, theirs = hiredis_packing(Connection)(), Connection()
    assert b"".join(ours.pack_command(*cmd)) == b"".join(theirs.pack_command(*cmd))
    assert b"".join(ours.pack_commands([cmd, cmd])) == b"".join(theirs.pack_commands([cmd, cmd]))


@pytest.mark.parametrize("bad", [None, True, [1]])
def test_an_argument_redis_cannot_take_is_redis_pys_error(bad):
    with pytest.raises(DataError, match="Invalid input of type"):
        hiredis_packing(Connection)().pack_command("SET", "k", bad)


def test_connect_keeps_the_schemes_connection_class():
    client = connect(load({"RECSTREAM_REDIS_URL": "unix:///tmp/redis.sock"}))
    cls = client.connection_pool.connection_class
    assert issubclass(cls, UnixDomainSocketConnection) and cls.pack_command is not Connection.pack_command
    assert hiredis_packing(Connection) is hiredis_packing(Connection)   # one class per base


class Pages:
    """A single Redis' SCAN as pages of keys: the cursor is the next page's index (0: the pass ended)."""

    def __init__(self, pages):
        self.pages, self.calls = pages, []

    async def scan(self, cursor, match=None, count=None):
        self.calls.append((cursor, match, count))
        return (cursor + 1) % len(self.pages), self.pages[cursor]


async def test_a_paced_scan_sleeps_between_calls_for_its_share(monkeypatch):
    slept = []

    async def sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(redisconn.asyncio, "sleep", sleep)
    clock = iter(range(0, 1000, 2))    # every reading 2 s after the one before: each call and its keys take 2 s
    monkeypatch.setattr(redisconn.time, "perf_counter", lambda: next(clock))
    client = Pages([[b"a"], [], [b"b", b"c"]])   # a call that matches nothing still counts
    keys = [k async for k in redisconn.scan(client, "ns:*", count=7, share=0.25)]
    assert keys == [b"a", b"b", b"c"]
    assert client.calls == [(0, "ns:*", 7), (1, "ns:*", 7), (2, "ns:*", 7)]
    assert slept == [6, 6]   # busy 2 s, idle 2 * (1 / 0.25 - 1): none after the pass's last call

    slept.clear()
    assert [k async for k in redisconn.scan(Pages([[b"a"], [b"b"]]), "ns:*")] == [b"a", b"b"] and slept == []


@pytest.mark.parametrize("raw", [
    [[b"b", 2.0], [b"a", 1.5], [b"\xc3\xa9", -1e-05]],          # RESP3: pairs, scores as doubles
    [b"b", b"2", b"a", b"1.5", b"\xc3\xa9", b"-1.0000000000000001e-05"],   # RESP2: flat, scores as text
])
def test_score_pairs_reads_a_withscores_reply_in_either_protocol(raw):
    assert redisconn.score_pairs(raw) == [("b", 2.0), ("a", 1.5), ("\u00e9", -1e-05)]
    assert redisconn.score_pairs([]) == []
