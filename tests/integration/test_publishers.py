"""Services publishing with other Kafka clients (librdkafka, Java) on the real broker: their events
reach the features whatever their partitioner, their malformed records the dead-letter topic."""
import asyncio
import sys
import time
import zlib
from pathlib import Path

import pytest

from cli import services
from schemas import Event
from streams import deadletter
from streams.producer import owner_partition
from tests.integration.clients import java_publish, librdkafka_publish
from tests.integration.conftest import read_topic
from tests.integration.test_features import feature_agents, product, wait_until
from tests.integration.test_http_events import JSON, api

PARTITIONS = 8   # the clickstream's default, as in the issue
BAD = [b"{oops", b'{"event_id":"x","user_id":"u1"}', b'{"version": 1, "event_id": "w", "user_id": "u1", '
       b'"session_id": "s1", "product_id": "p1", "event_type": "wish", "timestamp": 1764000000.0}']


def misplaced_users(n: int, misplaced: bool = True) -> list[str]:
    """Users whose events librdkafka's default partitioner (consistent_random: CRC32 of the key) puts on
    another partition than recstream's producer (murmur2); with misplaced=False, on the same one."""
    users = (f"shopper-{i}" for i in range(1000))
    return [u for u in users
            if (zlib.crc32(u.encode()) % PARTITIONS != owner_partition(u.encode(), PARTITIONS)) is misplaced][:n]


def events_of(users: list[str], per_user: int) -> list[Event]:
    t0 = time.time() - 60
    return [Event(event_id=f"{u}-e{i}", user_id=u, session_id=f"{u}-s", product_id=f"p{i}",
                  event_type="view" if i % 3 else "click", timestamp=t0 + i, category="Audio")
            for i in range(per_user) for u in users]


async def test_one_shopper_over_the_api_and_librdkafka_is_one_session_in_order(fresh, tmp_path):
    s = fresh(home_dir=tmp_path, clickstream_partitions=PARTITIONS)
    user = misplaced_users(1)[0]
    events = events_of([user], 8)
    async with feature_agents(s) as agents, api(s) as http:
        partitions = set()
        for i, e in enumerate(events):   # alternately, each acknowledged before the next is sent
            if i % 2 == 0:
                assert (await http.post("/api/v1/events", content=e.to_json(), headers=JSON)).status_code == 202
            else:
                [(p, _)] = await asyncio.to_thread(librdkafka_publish, s, s.topic("clickstream"),
                                                   [(user.encode(), e.to_json())])
                partitions.add(p)
        assert partitions == {zlib.crc32(user.encode()) % PARTITIONS} != {owner_partition(user.encode(), PARTITIONS)}

        async def all_in():
            f = await agents.store.user_features(user)
            return f is not None and f["events"] == len(events)
        assert await wait_until(all_in), agents.stats
        newest_first = [e.product_id for e in reversed(events)]
        assert await agents.store.user_session(user) == newest_first
        f = await agents.store.user_features(user)
        assert f["session_id"] == events[0].session_id and f["session_items"] == newest_first
        assert agents.stats.rerouted == len(events) // 2 and agents.stats.duplicates == 0


@pytest.mark.parametrize("client", ["librdkafka", "java"])
async def test_a_clients_events_reach_the_features_and_its_bad_records_the_dead_letter_topic(client, fresh, stack,
                                                                                            tmp_path):
    s = fresh(home_dir=tmp_path, clickstream_partitions=PARTITIONS)
    users = misplaced_users(6) + misplaced_users(3, misplaced=False)   # 6 that librdkafka puts elsewhere, 3 it does not
    events = events_of(users, 6)
    values = [e.to_json() for e in events] + BAD
    async with feature_agents(s) as agents:
        if client == "librdkafka":
            records = [(e.user_id.encode(), e.to_json()) for e in events] + [(b"u1", v) for v in BAD]
            acked = await asyncio.to_thread(librdkafka_publish, s, s.topic("clickstream"), records)
        else:
            acked = await asyncio.to_thread(java_publish, s, services.kafka_libs(stack), s.topic("clickstream"),
                                            "user_id", values)
        assert len(set(acked)) == len(values)   # every record acknowledged, each at its own place

        async def all_seen():
            return agents.stats.seen == len(values)
        assert await wait_until(all_seen), agents.stats
        for u in users:   # nothing acknowledged is lost, and each shopper has one session in order
            mine = [e for e in events if e.user_id == u]
            f = await agents.store.user_features(u)
            assert f["events"] == len(mine) and f["session_id"] == mine[0].session_id, u
            assert await agents.store.user_session(u) == [e.product_id for e in reversed(mine)], u
        assert agents.stats.dead_letters == len(BAD) and agents.stats.duplicates == 0
        elsewhere = [e for e, (p, _) in zip(events, acked) if p != owner_partition(e.user_id.encode(), PARTITIONS)]
        assert agents.stats.rerouted == len(elsewhere) and len(elsewhere) == (36 if client == "librdkafka" else 0)
        # the guard holds every original as handled: a restart or a refill does not copy it again
        guard = await agents.store.applied_offsets(range(PARTITIONS))
        assert all(guard[p] >= o for p, o in acked[:len(events)])
    letters = [deadletter.DeadLetter.from_headers(m.key, m.value, list(m.headers))
               for m in await read_topic(s, s.topic("deadletter"))]
    assert sorted(lt.value for lt in letters) == sorted(BAD)   # the raw bytes, with the reasons
    reasons = {lt.value: (lt.field, lt.reason) for lt in letters}
    assert reasons[BAD[0]][0] == "<body>" and "malformed JSON" in reasons[BAD[0]][1]
    assert reasons[BAD[1]][0] == "session_id" and reasons[BAD[2]][0] == "event_type"
    assert "'wish' is not one of" in reasons[BAD[2]][1]


async def test_catalogue_upserts_from_librdkafka_reach_item_features(fresh, tmp_path):
    s = fresh(home_dir=tmp_path, clickstream_partitions=PARTITIONS)
    items = [product(f"p{i}", "Audio") for i in range(10)]
    async with feature_agents(s) as agents:
        await asyncio.to_thread(librdkafka_publish, s, s.topic("catalogue"),
                                [(p.product_id.encode(), p.to_json()) for p in items] + [(b"p99", b"{oops")])

        async def stocked(want: bytes, pids) -> bool:
            rows = [await agents.store.item_features(pid) for pid in pids]
            return all(r.get("in_stock", "").encode() == want for r in rows)
        assert await wait_until(lambda: stocked(b"1", [p.product_id for p in items])), agents.stats
        out = product("p3", "Audio", in_stock=False)   # a stock change: the latest upsert wins
        await asyncio.to_thread(librdkafka_publish, s, s.topic("catalogue"), [(b"p3", out.to_json())])
        assert await wait_until(lambda: stocked(b"0", ["p3"]), timeout_s=30)
        assert (await agents.store.item_features("p3"))["title"] == "Item p3"
        assert agents.stats.dead_letters == 1


@pytest.mark.parametrize("example", ["publish_aiokafka.py", "publish_confluent.py"])
async def test_the_python_examples_events_reach_the_features(example, fresh, tmp_path):
    s = fresh(home_dir=tmp_path, clickstream_partitions=PARTITIONS)
    script = Path(__file__).resolve().parents[2] / "examples" / "python" / example
    async with feature_agents(s) as agents:
        run = await asyncio.create_subprocess_exec(sys.executable, str(script), s.kafka_bootstrap, s.topic("clickstream"))
        assert await run.wait() == 0

        async def all_seen():
            return agents.stats.seen == 3
        assert await wait_until(all_seen), agents.stats
        assert (await agents.store.user_features("u123"))["cart_items"] == ["p42"]
        assert await agents.store.user_session("u7") == ["p9"] and agents.stats.dead_letters == 0


async def test_the_archive_holds_each_event_once_though_the_topic_holds_re_routed_copies(fresh, tmp_path):
    import pyarrow.parquet as pq

    from streams.archive import Archive, dataset_dir, group_id
    from streams.lag import group_lag
    from tests.integration.test_archive import files_under

    s = fresh(home_dir=tmp_path, clickstream_partitions=PARTITIONS, archive_flush_interval_s=1.0)
    events = events_of(misplaced_users(4), 5)
    async with feature_agents(s) as agents:
        await asyncio.to_thread(librdkafka_publish, s, s.topic("clickstream"),
                                [(e.user_id.encode(), e.to_json()) for e in events])

        async def all_seen():
            return agents.stats.seen == len(events)
        assert await wait_until(all_seen), agents.stats
        assert agents.stats.rerouted == len(events)
    archive, stop = Archive(s), asyncio.Event()
    task = asyncio.create_task(archive.run(stop))

    async def caught_up():   # past the originals and their copies (some partitions stay empty)
        lags = await group_lag(s, group_id(s), s.topic("clickstream"))
        return sum(p.end for p in lags) == 2 * len(events) and all(p.committed == p.end for p in lags if p.end)
    assert await wait_until(caught_up)
    stop.set()
    await asyncio.wait_for(task, 30)
    rows = [r for p in files_under(dataset_dir(s)) for r in pq.read_table(p).column("event_id").to_pylist()]
    assert sorted(rows) == sorted(e.event_id for e in events) and archive.stats.archived == len(events)
