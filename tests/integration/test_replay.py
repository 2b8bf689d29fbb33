import os
import subprocess
import sys
from collections import defaultdict

from aiokafka import AIOKafkaConsumer

from recstream.data import ShopConfig, shop_dataset
from schemas import Event
from streams.replay import publish_dataset


async def consume_all(s, topic, expected, timeout_s=30):
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=s.kafka_bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    out = []
    try:
        import time
        deadline = time.monotonic() + timeout_s
        while len(out) < expected and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(msgs)
    finally:
        await consumer.stop()
    return out


async def test_replayed_events_come_back_whole_keyed_by_user_in_order(fresh):
    s = fresh()
    data = shop_dataset(ShopConfig(users=40, products=200, seed=11, end_s=1_764_000_000.0))
    result = await publish_dataset(s, data, progress=False)
    assert result.acked == len(data.events)
    msgs = await consume_all(s, s.topic("clickstream"), len(data.events))
    back = [Event.from_json(m.value) for m in msgs]
    assert sorted(e.event_id for e in back) == sorted(e.event_id for e in data.events)
    assert all(m.key == e.user_id.encode() for m, e in zip(msgs, back))
    partitions = defaultdict(set)
    for m, e in zip(msgs, back):
        partitions[e.user_id].add(m.partition)
    assert all(len(p) == 1 for p in partitions.values())  # one user, one partition
    per_user = defaultdict(list)
    for _m, e in sorted(zip(msgs, back), key=lambda x: (x[0].partition, x[0].offset)):
        per_user[e.user_id].append(e.timestamp)
    assert all(ts == sorted(ts) for ts in per_user.values())  # a user's events stay in order
    catalogue = await consume_all(s, s.topic("catalogue"), len(data.products))
    assert len(catalogue) == len(data.products)


async def test_rate_limited_replay_holds_the_rate(fresh):
    s = fresh()
    data = shop_dataset(ShopConfig(users=20, products=100, seed=5, end_s=1_764_000_000.0))
    data.events, data.products = data.events[:300], []
    result = await publish_dataset(s, data, rate_per_s=1000, progress=False)
    assert result.acked == 300 and 0.25 <= result.seconds < 1.0


def test_cli_replays_a_csv_and_reports_bad_rows(fresh, tmp_path):
    s = fresh()
    path = tmp_path / "events.csv"
    path.write_text("user_id,product_id,event_type,timestamp\nu1,p1,view,1700000000\nu1,p2,bogus,1700000001\n")
    env = {**os.environ, "RECSTREAM_TOPIC_PREFIX": s.topic_prefix}
    run = subprocess.run([sys.executable, "-m", "cli.main", "replay", "--dataset", "csv", "--path", str(path)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert f"{s.topic('clickstream')}: 1 records acknowledged" in run.stdout
    assert "events.csv:3: event_type" in run.stderr
