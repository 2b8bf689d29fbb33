"""Bad input at the edges (issue 21, part 5): each case refused with a 4xx naming the field, or bounded.

| case | answer | test |
| --- | --- | --- |
| `count` as ` 5`, `+5`, `5_0`, `٥`, `５`, `0x5`, `1e1`, `5 ` | 400, field `count` | test_integer_parameters_take_ascii_digits_only |
| `count` as `007`; `101`; 5000 digits | 7; 400 naming `count` | test_integer_parameters_take_ascii_digits_only |
| a parameter given twice (`?count=abc&count=5`) | 400, `count`: "given 2 times" | test_repeated_parameters_are_refused, test_the_app_refuses_repeated_and_bad_parameters |
| a `cart_items` entry with a space (`p1, p2`), `:`, `{}` | 400, field `cart_items[1]`, as for product_id | test_cart_items_follow_the_product_id_rule |
| `category`, `page` with a newline, NUL, `{}`, bidi override | 400, field `category` / `page` | test_context_labels_refuse_control_characters_and_braces |
| `category` over 256, `page` over 64 characters | 400, field `category` / `page` (not `context`) | test_long_context_values_name_their_own_field |
| `category` "Home & Garden: Lamps", "Küche", empty | taken (empty: no context) | test_context_labels_keep_names_people_use |
| an event id (`user_id`, ...) as a JSON number | 422, field `user_id`, ... | test_event_ids_must_be_json_strings |
| event `category` with `{}`, a newline or a number; `page` with NUL | 422, field `category` / `page` | test_event_labels_follow_the_same_rule |
| catalogue `category_path` with `{}` | refused, field `category_path` | test_event_labels_follow_the_same_rule |
| admin experiment `start`/`end`: -1e300, 1e300, 1e12, 1970, 2100-01-01T00:00:01Z | 400, problem `body.start` / `body.end` | test_admin_refuses_experiment_times_out_of_range |
| 500 made-up categories asked of the fallback | at most 50 looked up, none kept; a real one still gets its list | test_made_up_categories_do_not_fill_the_fallback |
| a real category under a junk flood; unnamed for an hour; 600 real ones | kept; forgotten; the 500 most recently named kept | test_fallback_keeps_real_categories_and_bounds_them |
| `/readyz` before the agents report, with one group silent, before the published model is loaded | 503 naming what is missing; 200 once every group has a live agent with a model | test_readiness_waits_for_every_group_and_a_model |
| a fallback reply while an agent is dead or a model is published | `model_version` the served version; `error` names the dead group before "no reply within" | test_fallback_names_the_served_version_and_the_real_reason |
| requests queueing in the API (its event loop runs late) | the wait counted in the latency histograms (`recstream_event_loop_lag_seconds`); over `RECSTREAM_SERVING_SHED_LOOP_LAG_MS` the fallback at once, `error` "overloaded: ..." | tests/unit/test_shedding.py |
| the real-time features behind (their consumer's committed lag over `RECSTREAM_SERVING_SHED_FEATURE_LAG_S`) | the fallback at once, `error` "overloaded: the real-time features are N s behind ..."; served again once under it | tests/unit/test_shedding.py |
"""
from __future__ import annotations

import dataclasses
import time
import warnings

import orjson
import pytest
import redis.asyncio
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

import recstream.settings
from recstream.experiments.store import ExperimentStore
from schemas import Event, Product, RecommendationRequest, SchemaError
from schemas.base import LABEL_PATTERN
from serving import recommend
from serving.admin import admin_routes
from serving.app import create_app
from serving.ingest import IngestError, parse_events
from serving.params import ParamError, openapi, parse

NOW = time.time()


def fields(path: str, query) -> dict[str, str]:
    with pytest.raises(ParamError) as info:
        parse(path, query)
    assert info.value.status == 400
    return {e.field: e.reason for e in info.value.errors}


# -- query parameters ----------------------------------------------------------------------------

@pytest.mark.parametrize("value", [" 5", "+5", "5_0", "\u0665", "\uff15", "0x5", "1e1", "5 ", "-0", "5.0", ""])
def test_integer_parameters_take_ascii_digits_only(value):
    assert list(fields("homepage", {"count": value})) == ["count"]
    assert parse("homepage", {"count": "007"}).count == 7
    assert fields("homepage", {"count": "101"}) == {"count": "must be at most 100, got 101"}
    assert fields("homepage", {"count": "9" * 5000}) == {"count": "too large (5000 digits)"}


def test_repeated_parameters_are_refused():
    assert fields("homepage", [("count", "abc"), ("count", "5")]) == {"count": "given 2 times; give it once"}
    assert list(fields("similar", [("product_id", "p1"), ("product_id", "p2"), ("user_id", "u")])) == ["product_id"]
    assert parse("homepage", [("count", "5"), ("user_id", "u1")]).count == 5


def test_the_app_refuses_repeated_and_bad_parameters(tmp_path):
    """Through the real route: the app hands parse every value, not Starlette's last one."""
    s = dataclasses.replace(recstream.settings.load({}), home_dir=tmp_path)   # its exposure journal's folder
    client = TestClient(create_app(s))   # no lifespan: parse answers before Kafka
    r = client.get("/api/v1/recommendations/homepage?count=abc&count=5")
    assert r.status_code == 400
    assert r.json() == {"error": "invalid request", "fields": [{"field": "count", "reason": "given 2 times; give it once"}]}
    r = client.get("/api/v1/recommendations/homepage?count=%2B5&category=a%0Ab&page=p%7Bx%7D")
    assert r.status_code == 400 and {f["field"] for f in r.json()["fields"]} == {"count", "category", "page"}


def test_cart_items_follow_the_product_id_rule():
    assert list(fields("cart", {"cart_items": "p1, p2"})) == ["cart_items[1]"]
    assert list(fields("cart", {"cart_items": " p1"})) == ["cart_items[0]"]
    assert set(fields("cart", {"cart_items": "p1,p:2,p{3}"})) == {"cart_items[1]", "cart_items[2]"}
    assert list(fields("similar", {"product_id": " p1"})) == ["product_id"]      # the same rule
    assert parse("cart", {"cart_items": "p1,p2"}).cart_items == ("p1", "p2")


@pytest.mark.parametrize("name", ["category", "page"])
@pytest.mark.parametrize("value", ["a\nb", "a\x00", "{g}", "a}", "a\u202eb", "\x7f", "a\u2028b"])
def test_context_labels_refuse_control_characters_and_braces(name, value):
    reasons = fields("homepage", {name: value})
    assert list(reasons) == [name] and "not allowed" in reasons[name]


def test_long_context_values_name_their_own_field():
    assert list(fields("homepage", {"category": "c" * 257})) == ["category"]
    assert list(fields("homepage", {"page": "p" * 65})) == ["page"]
    assert parse("homepage", {"category": "c" * 256, "page": "p" * 64}).ctx("page") == "p" * 64


def test_context_labels_keep_names_people_use():
    r = parse("homepage", {"category": "Home & Garden: Lamps", "page": "product"})
    assert r.context == {"category": "Home & Garden: Lamps", "page": "product"}
    assert parse("homepage", {"category": "Küche"}).ctx("category") == "Küche"
    assert parse("homepage", {"category": ""}).context is None
    schema = {p["name"]: p["schema"] for p in openapi()["paths"]["/api/v1/recommendations/homepage"]["get"]["parameters"]}
    assert schema["category"]["pattern"] == schema["page"]["pattern"] == LABEL_PATTERN


# -- events and the catalogue -----------------------------------------------------------------------

EVENT = {"event_id": "e1", "user_id": "u1", "session_id": "s1", "product_id": "p1", "event_type": "view",
         "timestamp": NOW - 5}


def refused(event: dict) -> dict[str, str]:
    with pytest.raises(IngestError) as info:
        parse_events(orjson.dumps(event), max_events=10, now=NOW)
    assert info.value.status == 422
    return {f.field: f.reason for f in info.value.fields}


@pytest.mark.parametrize("field", ["user_id", "session_id", "product_id", "event_id", "rec_request_id"])
def test_event_ids_must_be_json_strings(field):
    assert refused({**EVENT, field: 42}) == {field: "expected a string, got int"}


@pytest.mark.parametrize("field,value", [("category", "{g}"), ("category", "a\nb"), ("category", 7), ("page", "a\x00")])
def test_event_labels_follow_the_same_rule(field, value):
    assert list(refused({**EVENT, field: value})) == [field]
    event = parse_events(orjson.dumps({**EVENT, "category": "Home & Garden", "page": "product"}), max_events=1, now=NOW)
    assert event[0].category == "Home & Garden"
    with pytest.raises(SchemaError) as info:
        Product.from_dict({"product_id": "p1", "title": "t", "category_path": ["Home", "{x}"], "price": 1.0,
                           "created_at": NOW - 60}, now=NOW)
    assert [e.field for e in info.value.errors] == ["category_path"]
    assert Event.from_dict({**EVENT, "category": "Küche"}, now=NOW).category == "Küche"


# -- admin: experiment times -----------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("start", -1e300), ("end", 1e300), ("end", 1e12), ("start", 0),
                                         ("start", "1970-01-01T00:00:00Z"), ("end", "2100-01-01T00:00:01Z")])
def test_admin_refuses_experiment_times_out_of_range(tmp_path, field, value):
    s = dataclasses.replace(recstream.settings.load({}), admin_token="t", experiments_file=tmp_path / "e.toml")
    client = TestClient(Starlette(routes=admin_routes(s, ExperimentStore(s.experiments_file))))
    body = {"layer": "L", "start": NOW - 3600, "end": NOW + 86400, "traffic": 0.5,
            "variants": [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.5, "changes": {"ranker": "x"}}]}
    r = client.put("/api/v1/admin/experiments/e1", json={**body, field: value}, headers={"Authorization": "Bearer t"})
    assert r.status_code == 400, r.text
    fields = r.json()["fields"]
    assert len(fields) == 1 and fields[0]["field"] == f"body.{field}"
    assert fields[0]["reason"].startswith("must be from 2000-01-01")
    assert not s.experiments_file.exists()
    assert client.put("/api/v1/admin/experiments/e1", json=body, headers={"Authorization": "Bearer t"}).status_code == 201


# -- the fallback's categories -----------------------------------------------------------------------

class Trending:
    """The store reads the fallback makes: trending lists per category (None: overall)."""

    def __init__(self, lists: dict[str | None, list[tuple[str, float]]]):
        self.lists, self.lookups = lists, []

    async def trending(self, now, half_life_s, n=20, category=None):
        if category is not None:
            self.lookups.append(category)
        return self.lists.get(category, [])[:n]

    async def in_stock(self, ids):
        return [True] * len(ids)

    async def categories(self, ids):
        return {}


def ask(fb: recommend.Fallback, category: str):
    return fb.reply(parse("homepage", {"category": category}), "test")


def real(n: int) -> dict[str | None, list[tuple[str, float]]]:
    return {None: [("p0", 9.0)], **{f"real{i}": [(f"p{i}", 1.0)] for i in range(n)}}


async def test_made_up_categories_do_not_fill_the_fallback():
    store = Trending({**real(1), "Lamps": [("lamp1", 5.0), ("lamp2", 4.0)]})
    fb = recommend.Fallback(recstream.settings.load({}), store)
    for i in range(500):
        ask(fb, f"junk{i}")
    assert len(fb.new) == recommend.FALLBACK_NEW
    await fb.refresh()
    assert fb.by_category == {} and fb.new == {} and len(store.lookups) == recommend.FALLBACK_NEW
    assert [i.product_id for i in ask(fb, "Lamps").items] == ["p0"]      # not loaded yet: overall
    await fb.refresh()
    reply = ask(fb, "Lamps")
    assert [i.product_id for i in reply.items] == ["lamp1", "lamp2"] and reply.items[0].reason == "trending in Lamps"


async def test_fallback_keeps_real_categories_and_bounds_them(monkeypatch):
    store = Trending(real(600))
    fb = recommend.Fallback(recstream.settings.load({}), store)
    ask(fb, "real1")
    await fb.refresh()
    for i in range(1000):                       # a junk flood does not push real1 out
        ask(fb, f"junk{i}")
    await fb.refresh()
    assert list(fb.by_category) == ["real1"] and ask(fb, "real1").items[0].product_id == "p1"
    fb.asked["real1"] = time.time() - recommend.FALLBACK_CATEGORY_AGE_S - 1
    await fb.refresh()
    assert fb.by_category == {} and fb.asked == {}               # nobody named it for an hour
    monkeypatch.setattr(recommend, "FALLBACK_NEW", 600)
    for i in range(600):
        ask(fb, f"real{i}")
    await fb.refresh()
    assert len(fb.by_category) == recommend.FALLBACK_CATEGORIES == len(fb.asked)
    assert "real599" in fb.by_category and "real0" not in fb.by_category    # the most recently named kept


# -- readiness and the fallback's account of itself ------------------------------------------------------

def test_readiness_waits_for_every_group_and_a_model():
    now, roles = 1_000.0, ["retrieval-0-of-2", "retrieval-1-of-2", "ranking"]
    live = {"retrieval-0-of-2:h:1": {"ts": now - 1, "model_version": "7"},
            "retrieval-1-of-2:h:2": {"ts": now - 2, "model_version": "7"},
            "ranking:h:3": {"ts": now - 1, "model_version": "7"}}
    assert recommend.path_status(live, roles, "7", now) == recommend.PathStatus(True, "", "7")
    assert recommend.path_status({}, roles, None, now).reason == "no retrieval-0-of-2 agent has reported in the last 10 s"
    silent = live | {"retrieval-1-of-2:h:2": {"ts": now - 11, "model_version": "7"}}
    assert not recommend.path_status(silent, roles, "7", now).ready
    loading = {k: {**v, "model_version": None} for k, v in live.items()}
    got = recommend.path_status(loading, roles, "7", now)
    assert not got.ready and "not loaded a model yet (version 7 is published)" in got.reason
    # nothing trained yet: the agents serve with rules, so the path is ready
    assert recommend.path_status(loading, roles, None, now) == recommend.PathStatus(True, "", "none")
    # a model swap in progress: version 8 is published, the agents still serve 7: ready, on 7
    assert recommend.path_status(live, roles, "8", now) == recommend.PathStatus(True, "", "7")


def test_fallback_names_the_served_version_and_the_real_reason():
    rec = recommend.Recommender(recstream.settings.load({}), client=redis.asyncio.from_url("redis://127.0.0.1:1"))
    rec.fallback.overall = [("p1", 3.0, "Lamps"), ("p2", 2.0, None)]
    req = RecommendationRequest(request_id="r1", kind="homepage", created_at=time.time(), count=2)
    rec.connected = True
    rec.path = recommend.PathStatus(False, "no ranking agent has reported in the last 10 s", "7")
    reply = rec._fallback(req, "no reply within 40 ms")
    assert reply.fallback and reply.model_version == "7"
    assert reply.error == "no ranking agent has reported in the last 10 s (no reply within 40 ms)"
    assert recommend.status(reply) == "fallback_error"
    rec.path = recommend.PathStatus(True, "", "7")   # the agents are there, just slow: the deadline is the reason
    reply = rec._fallback(req, "no reply within 40 ms")
    assert reply.error == "no reply within 40 ms" and recommend.status(reply) == "fallback_deadline"
