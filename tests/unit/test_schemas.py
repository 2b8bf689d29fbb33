import orjson
import pytest

from schemas import Event, Product, RecommendationReply, RecommendationRequest, RecommendedItem, SchemaError
from schemas.base import MAX_TEXT

NOW = 1_764_000_000.0
GOOD = {"event_id": "e1", "user_id": "u1", "session_id": "s1", "product_id": "p1",
        "event_type": "add_to_cart", "timestamp": NOW - 5, "price": 9.5, "quantity": 2}


def bad(**changes):
    data = {**GOOD, **changes}
    return {k: v for k, v in data.items() if v is not ...}


def test_valid_event_round_trips_through_json():
    event = Event.from_dict(GOOD, now=NOW)
    assert event.quantity == 2 and event.device == "unknown" and event.rec_request_id is None
    assert Event.from_json(event.to_json(), now=NOW) == event
    assert orjson.loads(event.to_json())["version"] == Event.VERSION


@pytest.mark.parametrize("data, field, reason", [
    (bad(event_type="wishlist"), "event_type", "'wishlist' is not one of view, click, add_to_cart, purchase"),
    (bad(user_id=...), "user_id", "is required"),
    (bad(event_id=""), "event_id", "must not be empty"),
    (bad(product_id=None), "product_id", "is required"),
    (bad(quantity=-1), "quantity", "must be at least 1"),
    (bad(quantity=1.5), "quantity", "expected an integer"),
    (bad(price=-3), "price", "must be at least 0"),
    (bad(timestamp=NOW + 3600), "timestamp", "in the future"),
    (bad(timestamp=NOW * 1000), "timestamp", "in the future"),
    (bad(timestamp=12.0), "timestamp", "before 1990-01-01"),
    (bad(timestamp="yesterday"), "timestamp", "expected a number, got str"),
    (bad(timestamp=float("nan")), "timestamp", "must be finite"),
    (bad(user_id="x" * (MAX_TEXT + 1)), "user_id", f"longer than {MAX_TEXT} characters"),
    (bad(session_id=["a"]), "session_id", "expected a string, got list"),
    (bad(device="toaster"), "device", "is not one of"),
    (bad(colour="red"), "colour", "unknown field"),
    (bad(version=2), "version", "unsupported version 2"),
])
def test_bad_event_names_the_field_and_reason(data, field, reason):
    with pytest.raises(SchemaError) as info:
        Event.from_dict(data, now=NOW)
    errors = {e.field: e.reason for e in info.value.errors}
    assert field in errors, errors
    assert reason in errors[field]


def test_every_bad_field_is_reported_at_once():
    with pytest.raises(SchemaError) as info:
        Event.from_dict(bad(quantity=0, event_type="x", user_id=...), now=NOW)
    assert {e.field for e in info.value.errors} == {"quantity", "event_type", "user_id"}
    assert info.value.to_dict()["error"] == "invalid event"


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b"", "malformed JSON"),
])
def test_malformed_json_is_a_schema_error(raw, reason):
    with pytest.raises(SchemaError, match=reason):
        Event.from_json(raw, now=NOW)


def test_ids_given_as_numbers_are_refused():
    with pytest.raises(SchemaError) as info:
        Event.from_dict(bad(user_id=42, product_id=7), now=NOW)
    assert {e.field: e.reason for e in info.value.errors} == {"user_id": "expected a string, got int",
                                                              "product_id": "expected a string, got int"}


PRODUCT = {"product_id": "p1", "title": "Kettle", "category_path": ["Home", "Kitchen"], "price": 20.0,
           "created_at": NOW - 86400, "rating": 4.5}


def test_product_defaults_and_leaf_category():
    p = Product.from_dict(PRODUCT, now=NOW)
    assert p.in_stock is True and p.brand == "unknown" and p.category == "Kitchen"
    assert Product.from_json(p.to_json(), now=NOW) == p


@pytest.mark.parametrize("changes, field", [
    ({"category_path": []}, "category_path"),
    ({"category_path": ["ok", ""]}, "category_path"),
    ({"rating": 6}, "rating"),
    ({"in_stock": "yes"}, "in_stock"),
    ({"price": None}, "price"),
])
def test_bad_product(changes, field):
    with pytest.raises(SchemaError) as info:
        Product.from_dict({**PRODUCT, **changes}, now=NOW)
    assert field in {e.field for e in info.value.errors}


REQUEST = {"request_id": "r1", "kind": "homepage", "created_at": NOW, "user_id": "u1"}


@pytest.mark.parametrize("changes, field, reason", [
    ({"kind": "similar"}, "product_id", "is required for kind similar"),
    ({"kind": "also_viewed"}, "product_id", "is required for kind also_viewed"),
    ({"kind": "cart"}, "cart_items", "needs at least 1 item"),
    ({"count": 0}, "count", "must be at least 1"),
    ({"count": 1000}, "count", "must be at most 100"),
    ({"context": {"device": {"os": "ios"}}}, "context", "expected a string, got dict"),
])
def test_bad_request(changes, field, reason):
    with pytest.raises(SchemaError) as info:
        RecommendationRequest.from_dict({**REQUEST, **changes}, now=NOW)
    errors = {e.field: e.reason for e in info.value.errors}
    assert reason in errors[field]


def test_request_and_reply_round_trip():
    req = RecommendationRequest.from_dict({**REQUEST, "kind": "cart", "cart_items": ["p1", "p2"]}, now=NOW)
    assert req.cart_items == ("p1", "p2") and req.count == 8
    reply = RecommendationReply(request_id=req.request_id, kind=req.kind,
                                items=(RecommendedItem(product_id="p9", score=0.7, reason="co-purchase"),),
                                fallback=True, timings_ms={"rank": 1.5})
    back = RecommendationReply.from_json(reply.to_json(), now=NOW)
    assert back == reply and back.items[0].reason == "co-purchase"


def test_reply_item_errors_name_the_item():
    with pytest.raises(SchemaError, match="item 0: score"):
        RecommendationReply.from_dict({"request_id": "r", "kind": "homepage",
                                       "items": [{"product_id": "p", "score": "high", "reason": "x"}]}, now=NOW)
