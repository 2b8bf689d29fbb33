"""Query parameters of the recommendation endpoints: parsing, errors naming the parameter, OpenAPI."""
from __future__ import annotations

import time

import pytest

from schemas import RecommendationRequest
from serving.params import DEFAULT_COUNT, MAX_CART, PARAMS, PATHS, ParamError, openapi, parse

BASE = {"homepage": {}, "similar": {"product_id": "p1"}, "also-viewed": {"product_id": "p1"},
        "cart": {"cart_items": "p1,p2"}}


def fields(exc: ParamError) -> dict[str, str]:
    return {e.field: e.reason for e in exc.errors}


def bad(path: str, query: dict[str, str]) -> ParamError:
    with pytest.raises(ParamError) as info:
        parse(path, query)
    return info.value


@pytest.mark.parametrize("path,kind", [("homepage", "homepage"), ("similar", "similar"), ("cart", "cart"),
                                       ("also-viewed", "also_viewed")])
def test_each_path_parses_to_its_kind(path, kind):
    r = parse(path, BASE[path])
    assert isinstance(r, RecommendationRequest)
    assert r.kind == kind
    assert r.request_id and len(r.request_id) <= 64
    assert r.debug is False and r.context is None


def test_request_ids_are_unique_and_created_at_is_now():
    now = time.time()
    a, b = parse("homepage", {}, now=now), parse("homepage", {})
    assert a.request_id != b.request_id
    assert a.created_at == now
    assert abs(b.created_at - time.time()) < 5


def test_unknown_kind_is_404_naming_the_kind():
    exc = bad("for-you", {"user_id": "u1"})
    assert exc.status == 404
    assert "kind" in fields(exc) and "for-you" in fields(exc)["kind"]
    assert exc.to_dict()["fields"][0]["field"] == "kind"
    assert bad("also_viewed", {"product_id": "p1"}).status == 404   # the URL spells it also-viewed


@pytest.mark.parametrize("path,missing", [("similar", "product_id"), ("also-viewed", "product_id"),
                                          ("cart", "cart_items")])
def test_required_parameters_per_kind(path, missing):
    exc = bad(path, {"user_id": "u1"})
    assert exc.status == 400
    assert list(fields(exc)) == [missing]
    assert "required" in fields(exc)[missing]


def test_homepage_needs_nothing_and_cart_does_not_need_product_id():
    assert parse("homepage", {}).user_id is None
    assert parse("cart", {"cart_items": "p1"}).product_id is None


def test_identifiers_are_carried_and_must_not_be_empty():
    r = parse("similar", {"product_id": "p1", "user_id": "u1", "session_id": "s1"})
    assert (r.product_id, r.user_id, r.session_id) == ("p1", "u1", "s1")
    exc = bad("similar", {"product_id": " ", "user_id": ""})
    assert set(fields(exc)) == {"product_id", "user_id"}
    assert bad("homepage", {"user_id": "u" * 300}).errors[0].field == "user_id"


@pytest.mark.parametrize("value", ["abc", "1.5", "", "ten"])
def test_count_must_be_an_integer(value):
    exc = bad("homepage", {"count": value})
    assert exc.status == 400 and list(fields(exc)) == ["count"]


@pytest.mark.parametrize("value", ["0", "-3", "10000", "101"])
def test_count_out_of_range_names_count(value):
    exc = bad("homepage", {"count": value})
    assert exc.status == 400 and [e.field for e in exc.errors] == ["count"]


def test_count_in_range_and_default_counts():
    assert parse("homepage", {"count": "1"}).count == 1
    assert parse("homepage", {"count": "100"}).count == 100
    assert parse("similar", {"product_id": "p", "count": "12"}).count == 12
    assert {path: parse(path, BASE[path]).count for path in PATHS} == {
        "homepage": 8, "similar": 8, "also-viewed": 8, "cart": 4}
    assert DEFAULT_COUNT["cart"] == 4


def test_cart_items_are_split_and_deduplicated_not_trimmed():
    assert parse("cart", {"cart_items": "a,b,a,c,b"}).cart_items == ("a", "b", "c")
    assert [e.field for e in bad("cart", {"cart_items": "a, b"}).errors] == ["cart_items[1]"]   # as product_id
    assert parse("cart", {"cart_items": "only"}).cart_items == ("only",)


@pytest.mark.parametrize("value", ["a,,b", "", " ", "a,", ",a"])
def test_cart_items_without_empty_ids(value):
    exc = bad("cart", {"cart_items": value})
    assert exc.status == 400 and list(fields(exc)) == ["cart_items"]


def test_cart_items_at_most_max_cart():
    ids = [f"p{i}" for i in range(MAX_CART)]
    assert len(parse("cart", {"cart_items": ",".join(ids)}).cart_items) == MAX_CART
    exc = bad("cart", {"cart_items": ",".join([*ids, "extra"])})
    assert list(fields(exc)) == ["cart_items"] and str(MAX_CART) in fields(exc)["cart_items"]


def test_device_must_be_known():
    assert parse("homepage", {"device": "mobile"}).ctx("device") == "mobile"
    exc = bad("homepage", {"device": "toaster"})
    assert list(fields(exc)) == ["device"] and "toaster" in fields(exc)["device"]


def test_unknown_parameters_are_refused_by_name():
    exc = bad("homepage", {"user_id": "u1", "colour": "red", "limit": "3"})
    assert exc.status == 400
    assert set(fields(exc)) == {"colour", "limit"}
    assert all(r == "unknown parameter" for r in fields(exc).values())
    assert "colour" in str(exc)


def test_all_errors_are_reported_together():
    exc = bad("similar", {"count": "x", "device": "fax", "debug": "maybe", "nope": "1"})
    assert set(fields(exc)) == {"count", "device", "debug", "nope", "product_id"}
    body = exc.to_dict()
    assert body["error"] == "invalid request"
    assert {f["field"] for f in body["fields"]} == set(fields(exc))


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("TRUE", True), ("0", False),
                                            ("false", False), ("False", False)])
def test_debug_values(value, expected):
    assert parse("homepage", {"debug": value}).debug is expected


@pytest.mark.parametrize("value", ["yes", "2", "on"])
def test_debug_other_values_refused(value):
    assert list(fields(bad("homepage", {"debug": value}))) == ["debug"]


def test_context_carries_page_device_and_category():
    r = parse("similar", {"product_id": "p1", "page": "product", "device": "tablet", "category": "Phones"})
    assert r.context == {"page": "product", "device": "tablet", "category": "Phones"}
    assert r.ctx("category") == "Phones" and r.ctx("page") == "product"
    r = parse("homepage", {"page": "home", "category": ""})
    assert r.context == {"page": "home"}               # empty values are not context
    assert parse("homepage", {"user_id": "u1"}).context is None


def test_parsed_request_round_trips_through_json():
    r = parse("cart", {"cart_items": "a,b", "user_id": "u1", "debug": "1", "device": "app", "count": "3"})
    back = RecommendationRequest.from_json(r.to_json())
    assert back == r


# -- OpenAPI --------------------------------------------------------------------------------------

def test_openapi_lists_the_four_paths_with_their_parameters():
    doc = openapi("7")
    assert doc["openapi"].startswith("3.") and doc["info"]["version"] == "7"
    rec_paths = {p for p in doc["paths"] if p.startswith("/api/v1/recommendations/")}
    assert rec_paths == {f"/api/v1/recommendations/{p}" for p in ("homepage", "similar", "cart", "also-viewed")}
    names = [p.name for p in PARAMS]
    required = {"homepage": set(), "similar": {"product_id"}, "also-viewed": {"product_id"}, "cart": {"cart_items"}}
    for path, req in required.items():
        op = doc["paths"][f"/api/v1/recommendations/{path}"]["get"]
        params = op["parameters"]
        assert [p["name"] for p in params] == names
        assert {p["name"] for p in params if p["required"]} == req
        assert all(p["in"] == "query" and p["description"] for p in params)
        types = {p["name"]: p["schema"]["type"] for p in params}
        assert types["count"] == "integer" and types["debug"] == "boolean" and types["user_id"] == "string"
        assert {"200", "400", "404"} <= set(op["responses"])
        props = op["responses"]["200"]["content"]["application/json"]["schema"]["properties"]
        assert {"request_id", "items", "fallback", "cached", "session_recent"} <= set(props)
    assert "post" in doc["paths"]["/api/v1/events"]


def test_openapi_parameters_are_exactly_what_parse_accepts():
    params = {p["name"] for p in openapi()["paths"]["/api/v1/recommendations/homepage"]["get"]["parameters"]}
    # every documented parameter is accepted (no "unknown parameter" error)...
    query = {"user_id": "u", "product_id": "p", "cart_items": "a", "count": "2", "session_id": "s", "page": "home",
             "device": "desktop", "category": "C", "debug": "0"}
    assert set(query) == params
    assert parse("homepage", query).count == 2
