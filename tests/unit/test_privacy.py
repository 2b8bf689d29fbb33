"""Shoppers' data, the pure part (recstream/privacy.py) and the archive's rewrite and retention
(streams/archive_erasure.py, files in a temporary folder), and the admin route's statuses."""
from __future__ import annotations

import dataclasses
import warnings

import orjson
import pyarrow.parquet as pq
import pytest
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():   # (as tests/unit/test_admin_api.py)
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

import recstream.settings
from recstream.experiments.store import ExperimentStore
from recstream.privacy import ErasedSet, ErasureReport, is_pseudonym, pseudonym, pseudonymise_events, without_erased
from schemas import Event, Exposure
from schemas.base import Id
from serving import ingest
from serving.admin import admin_routes
from streams.archive import read_archive, write_batch
from streams.archive_erasure import drop_expired, expired_partitions, rewrite_without
from tests import factories
from tests.factories import bind

NOW = 1_764_000_000.0  # 2025-11-24T16:00:00Z
event = bind(factories.event, "i", "user", "ts")


# -- the keyed pseudonym -----------------------------------------------------------------------------

def test_a_pseudonym_is_stable_keyed_and_a_valid_id():
    a = pseudonym("alice@example.com", "k1")
    assert a == pseudonym("alice@example.com", "k1") != pseudonym("alice@example.com", "k2")
    assert a != pseudonym("bob@example.com", "k1") and "alice" not in a
    assert Id()(a, NOW) == a and is_pseudonym(a, "k1") and len(a) == 33
    assert pseudonym(a, "k1") == a            # hashing twice (an edge behind another) changes nothing
    assert pseudonym("alice", "") == "alice"  # no key: ids are stored as sent


def test_events_are_pseudonymised_whole_and_only_in_their_user_id():
    events = [event(1, "u1", NOW), event(2, "u2", NOW)]
    hashed = pseudonymise_events(events, "k")
    assert [e.user_id for e in hashed] == [pseudonym("u1", "k"), pseudonym("u2", "k")]
    assert [dataclasses.replace(e, user_id="x") for e in hashed] == [dataclasses.replace(e, user_id="x") for e in events]
    assert pseudonymise_events(events, "") == events


@pytest.mark.parametrize("field", ["ip", "ip_address", "user_agent", "remote_addr"])
def test_no_record_has_a_place_for_an_ip_address_or_user_agent(field):
    """Nothing of the request's connection reaches a record: the records have no such field, and an
    event that brings one is refused whole (serving/app.py serves without an access log)."""
    assert field not in Event.__dataclass_fields__ and field not in Exposure.__dataclass_fields__
    body = factories.event_json(1) | {field: "203.0.113.9"}
    with pytest.raises(ingest.IngestError) as refused:
        ingest.parse_events(orjson.dumps(body), max_events=10, now=NOW)
    assert refused.value.status == 422


# -- the erased set --------------------------------------------------------------------------------

def test_the_erased_set_drops_and_counts_only_erased_shoppers():
    erased = ErasedSet()
    assert erased.add(["u1", "u2"]) == {"u1", "u2"} and erased.add(["u2", "u3"]) == {"u3"}
    events = [event(1, "u1", NOW), event(2, "u4", NOW), event(3, "u3", NOW), event(4, "u4", NOW)]
    assert [e.event_id for e in erased.keep(events, lambda e: e.user_id)] == ["e2", "e4"]
    assert erased.dropped == 2 and "u1" in erased and "u4" not in erased and len(erased) == 3
    assert [e.event_id for e in without_erased(events, {"u4"})] == ["e1", "e3"]


def test_the_report_says_what_was_erased_where():
    r = ErasureReport(("u1",), 5, 1, 2, 1, "recs.erasures").to_json()
    assert r["redis"] == {"keys_deleted": 5, "ab_keys_deleted": 2} and r["erased_before"] is False
    assert r["session_table"] == {"tombstones": 1} and str(r["archive"]).startswith("queued")
    assert "training run" in str(r["after_next_training_run"])
    again = ErasureReport(("u1",), 0, 0, 0, 1, "recs.erasures", {"rows_removed": 0}).to_json()
    assert again["erased_before"] is True and again["archive"] == {"rows_removed": 0}


# -- the archive ------------------------------------------------------------------------------------

def _archive(root):
    rows = {0: [(o, event(o, ("u1", "u2", "u3")[o % 3], NOW + o * 600)) for o in range(30)],
            1: [(o, event(100 + o, "u1", NOW + o)) for o in range(3)]}   # a file of u1 alone
    return write_batch(root, rows)


def test_the_archive_is_rewritten_without_the_erased_and_a_rerun_writes_nothing(tmp_path):
    files = _archive(tmp_path)
    before = read_archive(tmp_path).to_pylist()
    seen = []
    done = rewrite_without(tmp_path, ["u1"], lambda i, n, removed: seen.append((i, n)))
    after = read_archive(tmp_path).to_pylist()
    assert [r for r in before if r["user_id"] != "u1"] == after          # the others' rows, in order, unchanged
    assert done.rows_removed == 13 and done.files_scanned == len(files) and seen[-1] == (len(files), len(files))
    assert done.files_rewritten == len(files) and done.bytes_rewritten > 0
    assert not (tmp_path / "dt=2025-11-24/hour=16/part-1-0-2.parquet").exists()   # only u1's rows: removed
    assert not list(tmp_path.rglob(".*.tmp"))
    again = rewrite_without(tmp_path, ["u1"])
    assert again.files_rewritten == 0 and again.rows_removed == 0 and read_archive(tmp_path).to_pylist() == after
    assert all(pq.read_metadata(f).num_rows > 0 for f in tmp_path.rglob("*.parquet"))


def test_retention_drops_whole_days_past_the_policy(tmp_path):
    day = 86400
    for ts in (NOW - 100 * day, NOW - 91 * day, NOW - 89 * day, NOW):
        write_batch(tmp_path, {0: [(int(ts), event(int(ts), "u1", ts))]})
    now = NOW + 3600
    assert [p.name for p in expired_partitions(tmp_path, 90, now)] == ["dt=2025-08-16", "dt=2025-08-25"]
    assert expired_partitions(tmp_path, 0, now) == []      # 0: kept for ever
    assert drop_expired(tmp_path, 90, now) == ["dt=2025-08-16", "dt=2025-08-25"]
    assert sorted(p.name for p in tmp_path.glob("dt=*")) == ["dt=2025-08-27", "dt=2025-11-24"]
    assert drop_expired(tmp_path, 90, now) == []


# -- the admin route ---------------------------------------------------------------------------------

@pytest.fixture
def admin(tmp_path):
    s = dataclasses.replace(recstream.settings.load({}), admin_token="t0k", experiments_file=tmp_path / "e.toml")
    asked = []

    async def eraser(uid):
        asked.append(uid)
        if uid == "down":
            raise ConnectionError("redis down")
        return {"users": [uid], "erased_before": len(asked) > 1}
    app = Starlette(routes=admin_routes(s, ExperimentStore(s.experiments_file), eraser))
    return TestClient(app), asked


def test_the_erase_route_needs_the_token_checks_the_id_and_is_repeatable(admin):
    client, asked = admin
    url = "/api/v1/admin/users/"
    assert client.delete(url + "u1").status_code == 401
    assert client.delete(url + "u1", headers={"Authorization": "Bearer nope"}).status_code == 401
    auth = {"Authorization": "Bearer t0k"}
    r = client.delete(url + "u1", headers=auth)
    assert r.status_code == 200 and r.json() == {"users": ["u1"], "erased_before": False}
    assert client.delete(url + "u1", headers=auth).json()["erased_before"] is True
    assert client.delete(url + "a*b", headers=auth).status_code == 400
    r = client.delete(url + "down", headers=auth)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert asked == ["u1", "u1", "down"]


# -- the edges: the HTTP API hashes ids, the topics carry their retention -------------------------------

def test_the_http_edge_hashes_user_ids_of_events_and_requests(tmp_path):
    from serving.app import create_app

    s = dataclasses.replace(recstream.settings.load({}), user_id_key="k", home_dir=tmp_path)
    app = create_app(s)
    sent, asked = [], []

    async def send(events):
        sent.extend(events)

    async def check_products(req):
        asked.append(req)
        raise RuntimeError("stop here: the request as the recommender would see it is all this test needs")
    app.state.sink.send = send
    app.state.recommender.check_products = check_products
    client = TestClient(app, raise_server_exceptions=False)   # no lifespan: nothing connects
    r = client.post("/api/v1/events", json=[factories.event_json(1, user="alice@example.com"),
                                            factories.event_json(2, user="bob")])
    assert r.status_code == 202 and [e.user_id for e in sent] == [pseudonym("alice@example.com", "k"), pseudonym("bob", "k")]
    client.get("/api/v1/recommendations/homepage", params={"user_id": "alice@example.com"})
    assert [q.user_id for q in asked] == [pseudonym("alice@example.com", "k")]


def test_topics_carry_the_retention_of_the_settings_and_erasures_are_compacted():
    from streams.topics import specs

    s = dataclasses.replace(recstream.settings.load({}), clickstream_retention_h=48, exposures_retention_h=72)
    by_name = {t.name: t for t in specs(s)}
    assert by_name["recs.clickstream"].config["retention.ms"] == str(48 * 3600 * 1000)
    assert by_name["recs.exposures"].config["retention.ms"] == str(72 * 3600 * 1000)
    erasures = by_name["recs.erasures"]
    assert erasures.config == {"cleanup.policy": "compact"} and erasures.partitions == s.clickstream_partitions
