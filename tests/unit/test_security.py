"""Security basics: ids checked before they become Redis or Kafka keys, request and batch sizes bounded,
admin routes behind a token, no secrets in `recstream settings` output, and the OpenAPI description
derived from the same checks."""
from __future__ import annotations

import dataclasses
import re
import time
import warnings

import orjson
import pytest
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

import recstream.settings
from cli import main as cli
from recstream.data import ShopConfig, shop_dataset
from recstream.data.importers import _slug, event_id
from recstream.experiments.store import ExperimentStore
from schemas import Event, SchemaError
from schemas.base import ID_PATTERN, Id, Invalid
from serving import ingest, params
from serving.admin import admin_routes

NOW = time.time()
GOOD = {"event_id": "e1", "user_id": "u1", "session_id": "s1", "product_id": "p1", "event_type": "view",
        "timestamp": NOW}
BAD_IDS = ["a:b", "a b", "a\tb", "a\nb", "a\x00b", "a\x1fb", "a\x7fb", "p*", "p?", "p[1]", "a\\b", "a,b", "\u2028",
           "{u1}", "a}b", "a\u00a0b", "a\u200bb", "\ufeffa", ""]
GOOD_IDS = ["u00001", "p00001", "123456", "s123", "whole-milk", "1001-21-07-2015", "user@example.com", "é-ü-中文",
            "a.b_c-d/e", "x" * 256]


# -- ids -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("field", ["user_id", "session_id", "product_id", "event_id", "rec_request_id"])
def test_events_refuse_ids_that_would_break_the_key_layout(field, bad):
    with pytest.raises(SchemaError) as exc:
        Event.from_dict({**GOOD, field: bad}, now=NOW)
    assert exc.value.errors[0].field == field


@pytest.mark.parametrize("good", GOOD_IDS)
def test_ids_of_every_importer_and_the_shop_are_taken(good):
    if len(good) > 64:
        assert Id()(good, NOW) == good
        return
    assert Event.from_dict({**GOOD, "user_id": good, "product_id": good, "event_id": good}, now=NOW).user_id == good


def test_id_rule_and_its_openapi_pattern_agree():
    pattern = re.compile(ID_PATTERN)
    for v in BAD_IDS + GOOD_IDS:
        try:
            Id()(v, NOW)
            ok = True
        except Invalid:
            ok = False
        assert ok == bool(pattern.search(v)) or (len(v) > 256), v


def test_generated_shop_and_importer_ids_pass():
    data = shop_dataset(ShopConfig(users=30, products=300, seed=3))
    assert data.events and all(Event.from_dict(e.to_dict()) for e in data.events[:500])
    for name in ("whole milk", "UHT-milk", "bottled water", "Instant food products", "rolls/buns"):
        Id()(_slug(name), NOW)      # groceries: product ids are slugs, no spaces
    Id()(event_id("gr", 1, "1000", "21-07-2015", "whole milk"), NOW)


@pytest.mark.parametrize("name", ["user_id", "product_id", "session_id"])
@pytest.mark.parametrize("bad", ["a:b", "a b", "p*", "x\x00", "[x]"])
def test_query_ids_are_refused_before_a_request_is_built(name, bad):
    query = {name: bad, "product_id": "p1"} if name != "product_id" else {name: bad}
    with pytest.raises(params.ParamError) as exc:
        params.parse("similar", query)
    assert exc.value.status == 400 and any(e.field == name for e in exc.value.errors)


@pytest.mark.parametrize("cart", ["p1,p:2", "p1,p 2", "p1,*", "p1,a\x00"])
def test_cart_ids_are_checked(cart):
    with pytest.raises(params.ParamError) as exc:
        params.parse("cart", {"cart_items": cart})
    assert exc.value.errors[0].field == "cart_items[1]"


# -- sizes ---------------------------------------------------------------------------------------

def test_sizes_are_bounded():
    with pytest.raises(params.ParamError):
        params.parse("homepage", {"count": "101"})
    with pytest.raises(params.ParamError):
        params.parse("homepage", {"count": "0"})
    with pytest.raises(params.ParamError):
        params.parse("cart", {"cart_items": ",".join(f"p{i}" for i in range(params.MAX_CART + 1))})
    with pytest.raises(params.ParamError):   # the cart's characters too, whatever the count
        params.parse("cart", {"cart_items": "p" * (params.MAX_CART_CHARS + 1)})
    assert len(params.parse("cart", {"cart_items": ",".join(f"p{i}" for i in range(params.MAX_CART))}).cart_items) == 100
    with pytest.raises(params.ParamError):
        params.parse("homepage", {"user_id": "u" * 257})
    batch = orjson.dumps([{**GOOD, "event_id": f"e{i}"} for i in range(11)])
    with pytest.raises(ingest.IngestError) as exc:
        ingest.parse_events(batch, max_events=10, now=NOW)
    assert exc.value.status == 413
    with pytest.raises(ingest.IngestError) as exc:
        ingest.check_content_length(str(2 * 1024 * 1024), 1024 * 1024)
    assert exc.value.status == 413
    with pytest.raises(ingest.IngestError) as exc:
        ingest.check_body_size(1024 * 1024 + 1, 1024 * 1024)
    assert exc.value.status == 413
    s = recstream.settings.load({})
    assert s.http_max_batch_events <= 1000 and s.http_max_body_bytes <= 4 * 1024 * 1024
    with pytest.raises(SchemaError):
        Event.from_dict({**GOOD, "page": "x" * 65}, now=NOW)


# -- admin token ---------------------------------------------------------------------------------

@pytest.fixture
def admin(tmp_path):
    s = dataclasses.replace(recstream.settings.load({}), admin_token="t0k-secret", experiments_file=tmp_path / "e.toml")
    app = Starlette(routes=admin_routes(s, ExperimentStore(s.experiments_file)))
    return TestClient(app)


@pytest.mark.parametrize("method,path", [("GET", "/api/v1/admin/experiments"), ("GET", "/api/v1/admin/experiments/x"),
                                         ("PUT", "/api/v1/admin/experiments/x"), ("DELETE", "/api/v1/admin/experiments/x"),
                                         ("PUT", "/api/v1/admin/defaults")])
@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic t0k-secret", "Bearer ", "t0k-secret"])
def test_every_admin_route_needs_the_token(admin, method, path, header):
    headers = {"Authorization": header} if header is not None else {}
    r = admin.request(method, path, headers=headers, content=b"{}")
    assert r.status_code == 401
    assert "t0k-secret" not in r.text


def test_admin_is_off_without_a_token(tmp_path):
    s = dataclasses.replace(recstream.settings.load({}), admin_token="", experiments_file=tmp_path / "e.toml")
    client = TestClient(Starlette(routes=admin_routes(s, ExperimentStore(s.experiments_file))))
    assert client.get("/api/v1/admin/experiments", headers={"Authorization": "Bearer "}).status_code == 403


# -- secrets -------------------------------------------------------------------------------------

def test_settings_output_masks_token_and_url_credentials(monkeypatch, capsys):
    for k in [k for k in __import__("os").environ if k.startswith("RECSTREAM_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("RECSTREAM_ADMIN_TOKEN", "sup3r-s3cret")
    monkeypatch.setenv("RECSTREAM_REDIS_URL", "redis://:hunter2@redis.internal:6379/0")
    monkeypatch.setenv("RECSTREAM_MLFLOW_TRACKING_URI", "https://alice:pa55@mlflow.internal")
    assert cli.main(["settings"]) == 0
    out = capsys.readouterr().out
    for secret in ("sup3r-s3cret", "hunter2", "pa55", "alice"):
        assert secret not in out
    assert "redis://***@redis.internal:6379/0" in out and "RECSTREAM_ADMIN_TOKEN" in out


# -- the OpenAPI description comes from the checks -----------------------------------------------

def test_openapi_is_derived_from_the_schemas():
    doc = params.openapi(now=NOW)
    event = doc["components"]["schemas"]["Event"]
    props = event["properties"]
    assert set(event["required"]) == {"event_id", "user_id", "session_id", "product_id", "event_type", "timestamp"}
    assert event["additionalProperties"] is False
    assert props["event_type"]["enum"] == ["view", "click", "add_to_cart", "purchase"]
    assert props["quantity"] == {**props["quantity"], "type": "integer", "minimum": 1, "maximum": 10_000}
    assert props["event_id"]["maxLength"] == 64 and props["user_id"]["pattern"] == ID_PATTERN
    assert props["timestamp"]["maximum"] >= NOW + 299
    get = doc["paths"]["/api/v1/recommendations/homepage"]["get"]
    by_name = {p["name"]: p["schema"] for p in get["parameters"]}
    assert by_name["count"] == {"type": "integer", "minimum": 1, "maximum": 100}
    assert by_name["device"]["enum"] == ["desktop", "mobile", "tablet", "app", "unknown"]
    assert set(get["responses"]) == {"200", "400", "404", "500"}
    post = doc["paths"]["/api/v1/events"]["post"]
    assert {"202", "400", "413", "415", "422", "503"} <= set(post["responses"])
    assert "Retry-After" in post["responses"]["503"]["headers"]
    put = doc["paths"]["/api/v1/admin/experiments/{id}"]["put"]
    assert put["security"] == [{"bearer": []}] and {"401", "403", "409"} <= set(put["responses"])
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "/healthz" in doc["paths"]
