import numpy as np
import orjson
import redis.asyncio as aioredis

from batch.publish import current, decode_embedding, publish
from models.artifacts import BatchOutputs, Embeddings, Window
from recstream.features import keys
from streams.topics import ensure_topics
from tests.integration.conftest import read_topic


def outputs(scale: float) -> BatchOutputs:
    users = Embeddings(["u1", "u2"], np.arange(8, dtype=np.float32).reshape(2, 4) * scale)
    items = Embeddings(["a", "b", "c"], np.ones((3, 4), dtype=np.float32) * scale)
    return BatchOutputs(Window(0, 1, 10), users, items, {}, {}, {"u1": {"Audio": 1.0}}, {"a": 3.0},
                        {"u1": 19.5}, {"a": "Audio"})


async def test_versions_switch_atomically_and_old_ones_go(fresh):
    s = fresh()
    await ensure_topics(s)
    ns = s.redis_namespace
    client = aioredis.from_url(s.redis_url)
    try:
        first = await publish(s, "m", "1", outputs(1.0), progress=lambda _: None)
        assert first.keys == 2 + 3 + 1 + 1 and (await current(s))["version"] == "1"
        got = decode_embedding(await client.get(ns + keys.embedding("user", "1", "u2")))
        assert np.array_equal(got, np.arange(4, 8, dtype=np.float32))
        assert await client.hget(ns + keys.user_offline("1", "u1"), "median_price") == b"19.5"
        await publish(s, "m", "2", outputs(2.0), progress=lambda _: None)
        assert (await current(s))["version"] == "2"
        assert await client.exists(ns + keys.embedding("item", "1", "a"))  # the previous version stays for requests in flight
        third = await publish(s, "m", "3", outputs(3.0), progress=lambda _: None)
        assert third.removed_versions == ["1"] and not await client.exists(ns + keys.embedding("item", "1", "a"))
        assert decode_embedding(await client.get(ns + keys.embedding("item", "3", "c")))[0] == 3.0
    finally:
        await client.aclose()
    msgs = await read_topic(s, s.topic("model.updates"))
    assert [orjson.loads(m.value)["version"] for m in msgs] == ["1", "2", "3"] and msgs[0].key == b"m"
