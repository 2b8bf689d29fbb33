"""Horizontal workers on the real stack (issue 9): several processes of one app share a topic's
partitions through their consumer group. A second process joins under load, later the first is
stopped (SIGTERM); the state moves with the partitions and nothing is lost or counted twice, and
serving keeps answering while its agents come and go."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections import Counter, defaultdict

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.worker import metrics_index
from recstream.data import ShopConfig, shop_dataset
from recstream.features import Incoming, UserState, keys, plan
from recstream.features.config import feature_config, limits
from recstream.features.session import decode_features, features_value, fingerprint, newest
from recstream.settings import Settings
from schemas import Event
from streams.online_store import open_store
from streams.producer import create_producer
from streams.replay import publish
from streams.topics import ensure_topics
from tests.integration import namespaces
from tests.integration.conftest import read_changelog
from tests.integration.serving_stack import Processes, request_cases, small_deployment, trained_shop, wait_for

pytestmark = pytest.mark.integration


# -- helpers ------------------------------------------------------------------------------------------

def figures(name: str, **values) -> None:
    """One line of what the run measured (pytest -s shows it; a failing test's output has it too)."""
    print(f"\nREBALANCE-FIGURES {name} {orjson.dumps(values).decode()}", flush=True)


async def topic_records(s: Settings, name: str = "clickstream") -> list:
    """Every record of a topic, in (partition, offset) order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(s.topic(name), p) for p in range(s.clickstream_partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        out: list = []
        deadline = time.monotonic() + 30
        while len(out) < sum(end.values()) and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(msgs)
        assert len(out) == sum(end.values()), (len(out), end)
        return sorted(out, key=lambda m: (m.partition, m.offset))
    finally:
        await consumer.stop()


async def owned(client: aioredis.Redis, s: Settings, pid: int) -> set[int] | None:
    """The clickstream partitions the feature worker `pid` consumes, from its latest metrics snapshot
    (agents/worker.py publishes one every 2 s, its key listed in the metrics index)."""
    host = socket.gethostname()
    for key in await client.zrange(metrics_index(s, "features"), 0, -1):
        if key.decode().endswith(f":{host}:{pid}"):
            raw = await client.get(key)
            return {int(p) for p in orjson.loads(raw)["lag"]} if raw else None
    return None


def probe_events(users: list[str], phase: str, products: list) -> list[Event]:
    """One view per product for each probe user, all in one session that outlasts both moves."""
    now = time.time()
    return [Event.from_dict({"event_id": f"{u}-{phase}-{i}", "user_id": u, "session_id": f"{u}-session",
                             "product_id": p.product_id, "category": p.category, "event_type": "view",
                             "timestamp": now + i * 0.001, "device": "mobile", "page": "product"})
            for u in users for i, p in enumerate(products)]


# -- (a) feature workers --------------------------------------------------------------------------------

async def test_feature_worker_joins_and_leaves_under_load_state_moves_with_its_partitions(fresh, tmp_path):
    await _join_and_leave(fresh, tmp_path)


async def _join_and_leave(fresh, tmp_path):
    """Two `recstream worker features` processes of one app: the second joins while events flow, the
    first is then stopped with SIGTERM. Afterwards every user's Redis features and state, every counter
    and the session state the next fold starts from (the newer of the changelog's row and Redis' copy:
    agents/features.py) equal the pure core's fold of the topic: no event lost, none counted twice,
    no tolerance. Probe users view products before the join,
    between join and leave, and after the leave, in one session: their `user_session` lists all nine,
    so the session state followed each move."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    s = fresh(home_dir=tmp_path, feature_batch_max=100, cooccurrence_max_per_item=100_000)
    await ensure_topics(s)
    data = shop_dataset(ShopConfig(users=120, products=400, seed=21, end_s=float(int(time.time()) - 60)))
    probes = [f"probe-{i}" for i in range(16)]
    phases = {"a": data.products[0:3], "b": data.products[3:6], "c": data.products[6:9]}
    client = aioredis.from_url(s.redis_url)
    store = open_store(s, client)
    parts = set(range(s.clickstream_partitions))
    procs = Processes(s, tmp_path)
    producer = create_producer(s)
    await producer.start()
    sender = None
    try:
        await publish(producer, s.topic("catalogue"), data.products, progress=False)
        w1 = procs.start("features")
        await wait_for(lambda: _owns(client, s, w1.pid, parts), 90, "worker 1 owning every partition",
                       interval_s=0.3, check=lambda: procs.check_alive("features"))
        await publish(producer, s.topic("clickstream"), probe_events(probes, "a", phases["a"]), progress=False)
        sender = asyncio.create_task(publish(producer, s.topic("clickstream"), data.events, rate_per_s=200,
                                             progress=False))
        await asyncio.sleep(4)
        w2 = procs.start("features-2", "features")
        moved_at_join = await wait_for(lambda: _owns_some(client, s, w2.pid), 90, "worker 2 taking partitions",
                                       interval_s=0.3, check=lambda: procs.check_alive("features", "features-2"))
        await wait_for(lambda: _owns(client, s, w1.pid, parts - moved_at_join), 30, "worker 1 keeping the rest",
                       interval_s=0.3)
        assert not sender.done(), "events stopped flowing before the second worker joined"
        await publish(producer, s.topic("clickstream"), probe_events(probes, "b", phases["b"]), progress=False)
        await asyncio.sleep(3)
        procs.procs["features"].terminate()   # (waited for in a thread: the sender goes on meanwhile)
        assert await asyncio.to_thread(procs.procs["features"].wait, 60) == 0, procs.tail("features")
        await wait_for(lambda: _owns(client, s, w2.pid, parts), 60, "worker 2 owning every partition",
                       interval_s=0.3, check=lambda: procs.check_alive("features-2"))
        assert not sender.done(), "events stopped flowing before the first worker left"
        await publish(producer, s.topic("clickstream"), probe_events(probes, "c", phases["c"]), progress=False)
        await sender
        records = await topic_records(s)

        async def all_applied():
            got = await store.applied_offsets(parts)
            return got == {p: max((m.offset for m in records if m.partition == p), default=-1) for p in parts}
        await wait_for(all_applied, 120, "every offset applied in Redis", interval_s=0.3,
                       check=lambda: procs.check_alive("features-2"))
        await asyncio.sleep(2)   # the last batch's changelog write
        procs.procs["features-2"].terminate()
        assert await asyncio.to_thread(procs.procs["features-2"].wait, 60) == 0, procs.tail("features-2")

        batch = [Incoming(Event.from_json(m.value), m.partition, m.offset) for m in records]
        want = plan(batch, {}, {}, {}, feature_config(s), limits(s))
        assert len(want.processed) == len(data.events) + 9 * len(probes)
        # every user's features: events counted once each (the `events` field), sessions, carts, purchases
        bad = {}
        for user, state in want.states.items():
            got = await store.user_features(user)
            if got != decode_features(features_value(state)) or await store.user_session(user) != list(state.recent):
                bad[user] = f"events {got and got['events']}, want {state.events} (partition {state.partition})"
        if bad:
            rows = await read_changelog(s)
            stored = await store.user_states(list(bad))
            where = {fingerprint(Event.from_json(m.value).event_id): (m.partition, m.offset) for m in records}
            detail = {u: _missing(want.states[u], stored.get(u), UserState.from_dict(rows.get(u)), where) for u in bad}
            figures("features-short", bad=bad, detail=detail,
                    applied={str(p): o for p, o in (await store.applied_offsets(parts)).items()})
        assert not bad, f"{len(bad)} of {len(want.states)} users differ from the topic's fold: {bad}"
        # every counter holds each event exactly once: popularity, trending and co-occurrence
        by_key: dict[str, dict[str, float]] = defaultdict(dict)
        for (key, member), delta in want.ops.incr.items():
            by_key[key][member] = delta
        for key, members in by_key.items():
            got = {m.decode(): v for m, v in await client.zrange(s.redis_namespace + key, 0, -1, withscores=True)}
            assert got.keys() == members.keys(), key
            for member, value in members.items():
                assert abs(got[member] - value) <= 1e-9 * max(1.0, abs(value)), (key, member, got[member], value)
        # the probes' sessions continued across both moves: nine products, newest first
        by_partition = {orjson.loads(m.value)["user_id"]: m.partition for m in records}
        moved_at_leave = parts - moved_at_join
        expected_recent = [p.product_id for k in "cba" for p in reversed(phases[k])]
        for u in probes:
            assert await store.user_session(u) == expected_recent, (u, by_partition[u])
        probe_parts = {by_partition[u] for u in probes}
        assert probe_parts & moved_at_join and probe_parts & moved_at_leave, (probe_parts, moved_at_join)
        # what the next owner folds on: the changelog's row (what it restores), or Redis' copy where the
        # table lost a write; both must be the topic's fold, and Redis' copy always is
        rows = await read_changelog(s)
        stored = await store.user_states(list(want.states))
        assert stored == want.states
        behind = sorted(u for u in want.states if UserState.from_dict(rows.get(u)) != want.states[u])
        assert {u: newest(UserState.from_dict(rows.get(u)), stored.get(u)) for u in want.states} == want.states
        figures("features", events=len(records), moved_at_join=sorted(moved_at_join),
                moved_at_leave=sorted(moved_at_leave), users=len(want.states), users_short=len(bad),
                table_rows_behind_redis=len(behind))
    finally:
        if sender is not None and not sender.done():
            sender.cancel()
        procs.stop_all()
        await producer.stop()
        await client.aclose()


def _missing(want: UserState, stored: UserState | None, row: UserState, where: dict) -> dict:
    """Which of a user's events (partition, offset) Redis' copy and the changelog's row lack (of the
    last SEEN_MAX the states remember), and the offset each copy has folded up to: a failure's evidence."""
    def lacks(got: UserState | None) -> list:
        have = set(got.seen) if got else set()
        return sorted(where[f] for f in want.seen if f not in have)
    return {"want_offset": want.offset, "redis_offset": stored and stored.offset, "redis_events": stored and stored.events,
            "row_offset": row.offset, "row_events": row.events, "want_events": want.events,
            "redis_lacks": lacks(stored), "row_lacks": lacks(row)}


async def _owns(client: aioredis.Redis, s: Settings, pid: int, want: set[int]) -> bool:
    return await owned(client, s, pid) == want


async def _owns_some(client: aioredis.Redis, s: Settings, pid: int) -> set[int] | None:
    got = await owned(client, s, pid)
    return got or None



async def test_a_feature_worker_whose_app_crashes_exits_for_a_restart(fresh, tmp_path):
    """Before each process claimed a table directory of its own, a second worker on the host crashed
    opening a RocksDB partition the first held, and its process then stayed up consuming nothing. Here
    the first slot is held and the second slot's partition 0 is open elsewhere, as a stray process
    would hold it: the worker's app crashes on its first assignment and the process exits CRASHED."""
    from rocksdict import Rdict

    from agents.worker import CRASHED
    from streams.app import claim_datadir

    s = fresh(home_dir=tmp_path, clickstream_partitions=1)
    await ensure_topics(s)
    root = (tmp_path / "faust").resolve() / s.app_id
    _, held = claim_datadir(root)                     # another worker's slot
    table = root.with_name(f"{root.name}.1") / "v1" / "tables" / "user-sessions-0.db"
    table.parent.mkdir(parents=True)
    stray = Rdict(str(table))                          # the partition's RocksDB, locked by this process
    procs = Processes(s, tmp_path)
    try:
        worker = procs.start("features")
        code = await asyncio.to_thread(worker.wait, 120)
        assert code == CRASHED, procs.tail("features")
        assert "exiting for a restart" in procs.tail("features", 20_000)
    finally:
        procs.stop_all()
        stray.close()
        os.close(held)

# -- (b) retrieval and ranking agents ---------------------------------------------------------------------

API = "/api/v1/recommendations"
DEADLINE_MS = 200   # as in test_serving.py / test_faults.py: a 2-core box shared by several stacks
SERVING = ("retrieval", "ranking", "api")


@dataclasses.dataclass
class Stack:
    s: Settings
    procs: Processes
    http: object
    redis: aioredis.Redis
    version: str
    products: set[str]
    cases: list[tuple[str, dict, set[str]]]   # (path, params, products that must not be recommended)


@pytest.fixture(scope="module")
async def serving_stack(stack: Settings, tmp_path_factory):
    import httpx

    home = tmp_path_factory.mktemp("rebalance-serving")
    s = small_deployment(stack, home, "rebalance", DEADLINE_MS)
    await ensure_topics(s)
    procs = Processes(s, home)
    client = aioredis.from_url(s.redis_url)
    store = open_store(s, client)
    try:
        data, report = await trained_shop(s, ShopConfig(users=80, products=200, seed=4,
                                                        end_s=float(int(time.time()) - 60)), procs, store)
        for name in SERVING:
            procs.start(name)
        cases = request_cases(data)
        async with httpx.AsyncClient(base_url=procs.base_url, timeout=10) as http:
            st = Stack(s, procs, http, client, report.version, {p.product_id for p in data.products}, cases)

            async def answered():
                try:
                    r = await http.get(f"{API}/similar", params=next(c[1] for c in cases if c[0] == "similar"))
                except httpx.TransportError:
                    return False
                return r.status_code == 200 and not r.json()["fallback"] and r.json()["model_version"] == st.version
            await wait_for(answered, 120, "the agents answering", interval_s=0.3,
                           check=lambda: procs.check_alive(*SERVING))
            yield st
    finally:
        procs.stop_all()
        await client.aclose()
        await namespaces.remove(s)


async def _serving_snapshot(st: Stack, role: str, pid: int) -> dict | None:
    raw = await st.redis.get(st.s.redis_namespace + keys.metrics(role, socket.gethostname(), pid))
    return orjson.loads(raw) if raw else None


async def test_serving_agents_join_and_leave_under_load_every_request_answered(serving_stack: Stack):
    """Requests flow at ~30/s; a second retrieval and ranking agent join their groups, then the first
    of each gets SIGTERM. Every request gets a 200 within the deadline (+ margin) and every agent answer
    is valid: known products, none repeated, none that was on screen. Requests in flight on a partition
    that moves are answered by the fallback (the agents start a partition at its end by design,
    agents/runner.py), so fallbacks are counted and bounded, not forbidden."""
    st = serving_stack
    results: list[tuple[float, int, dict, float, int]] = []   # (start, status, body, seconds, case)
    stop = asyncio.Event()

    async def client(k: int, rate_per_s: float = 10) -> None:
        i, n, start = k * 7, 0, time.perf_counter()
        while not stop.is_set():
            path, params, _ = st.cases[i % len(st.cases)]
            t = time.monotonic()
            r = await st.http.get(f"{API}/{path}", params=params)
            results.append((t, r.status_code, r.json() if r.status_code == 200 else {"text": r.text},
                            time.monotonic() - t, i % len(st.cases)))
            i, n = i + 1, n + 1
            await asyncio.sleep(max(0.0, start + n / rate_per_s - time.perf_counter()))

    clients = [asyncio.create_task(client(k)) for k in range(3)]
    try:
        await asyncio.sleep(3)
        t_join = time.monotonic()
        added = {role: st.procs.start(f"{role}-2", role) for role in ("retrieval", "ranking")}

        async def both_handling():   # the new agents own partitions: requests reach them
            snaps = [await _serving_snapshot(st, role, p.pid) for role, p in added.items()]
            return all(x and x["handled"] > 0 for x in snaps)
        await wait_for(both_handling, 90, "the second retrieval and ranking agents answering", interval_s=0.3,
                       check=lambda: st.procs.check_alive())
        t_leave = time.monotonic()
        for role in ("retrieval", "ranking"):
            st.procs.procs[role].terminate()
        for role in ("retrieval", "ranking"):
            assert await asyncio.to_thread(st.procs.procs[role].wait, 30) == 0, st.procs.tail(role)

        async def recovered():
            tail = [x for x in results if x[0] > t_leave + 0.5][-15:]
            return len(tail) == 15 and all(x[1] == 200 and not x[2]["fallback"] for x in tail)
        await wait_for(recovered, 60, "agents answering again after the first pair left", interval_s=0.2,
                       check=lambda: st.procs.check_alive("retrieval-2", "ranking-2", "api"))
        await asyncio.sleep(2)
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
    assert all(x[1] == 200 for x in results), Counter(x[1] for x in results)
    # No request hangs: the client waits up to 10 s, the API must answer near its deadline. The margin is
    # wide because the new agents import faiss, xgboost and mlflow on the same 2 cores as the API: CI once
    # saw 3 of 534 replies past 0.45 s (one at 0.74 s). Latency under load is measured in bench/, not here.
    late = [round(x[3], 3) for x in results if x[3] > DEADLINE_MS / 1000 + 1.0]
    assert not late, f"{len(late)} of {len(results)} replies over the deadline + 1 s: {late}"
    answers = computed = 0
    for _, _, body, _, case in results:
        if body["fallback"]:
            continue
        answers += 1
        computed += not body.get("cached")   # a cached homepage was computed by the agents earlier
        path, params, exclude = st.cases[case]
        ids = [it["product_id"] for it in body["items"]]
        assert ids and len(set(ids)) == len(ids) and set(ids) <= st.products, (path, params, ids)
        assert not set(ids) & exclude, (path, params, ids)
        assert body["model_version"] == st.version, body
    fallbacks = [x for x in results if x[2]["fallback"]]
    around = [x for x in fallbacks if t_join - 1 < x[0] < t_join + 30 or t_leave - 1 < x[0] < t_leave + 30]
    figures("serving", requests=len(results), agent_answers=answers, computed_now=computed, fallbacks=len(fallbacks),
            fallbacks_near_join_or_leave=len(around), join_to_handling_s=round(t_leave - t_join, 1))
    # Measured on the 2-core box (2026-11-26, other test suites running beside): 4 fallbacks of 438
    # requests (0.9%), all within 30 s of the join or the leave. A rebalance pauses a group for up to
    # a heartbeat interval (3 s) plus the join, and a moved partition restarts at its end, so requests
    # in flight then fall back; the bound leaves room for a slower box, not for a lost agent.
    assert len(fallbacks) <= len(results) // 10, (len(fallbacks), len(results))
    assert computed >= len(results) // 4, (computed, len(results))
