"""streams.redisconn: commands packed by hiredis are the bytes redis-py would send, and its errors stay."""
import pytest
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from recstream.settings import load
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
