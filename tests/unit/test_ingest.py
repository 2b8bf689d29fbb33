from http import HTTPStatus

import orjson
import pytest

from serving.ingest import IngestError, check_body_size, check_content_length, check_content_type, parse_events
from tests.factories import bind, event_json

NOW = 1_764_000_000.0
LIMIT = 5  # events per request in these tests


event = bind(event_json, "i", user=lambda f: f"u{f['i'] % 3}", ts=NOW - 10)


def body(value) -> bytes:
    return orjson.dumps(value)


def refused(fn, *args, **kwargs) -> IngestError:
    with pytest.raises(IngestError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("raw, count, first_id", [
    (body(event(0)), 1, "e0"),
    (body([event(0), event(1), event(2)]), 3, "e0"),
    (body({"events": [event(7), event(8)]}), 2, "e7"),
    (body([event(i) for i in range(LIMIT)]), LIMIT, "e0"),  # exactly at the limit
    (body([event(4)]), 1, "e4"),  # a batch of one
    ("  {\"event_id\": \"é1\", \"user_id\": \"ü\", \"session_id\": \"s\", \"product_id\": \"p\", "
     "\"event_type\": \"click\", \"timestamp\": 1763999999}".encode(), 1, "é1"),
])
def test_valid_bodies_give_events_in_order(raw, count, first_id):
    events = parse_events(raw, max_events=LIMIT, now=NOW)
    assert len(events) == count and events[0].event_id == first_id


@pytest.mark.parametrize("raw, status, message", [
    (b"{not json", HTTPStatus.BAD_REQUEST, "malformed JSON"),
    (b"", HTTPStatus.BAD_REQUEST, "malformed JSON"),
    (b"\xff\xfe{}", HTTPStatus.BAD_REQUEST, "malformed JSON"),
    (body([event(0)])[:-1], HTTPStatus.BAD_REQUEST, "malformed JSON"),
    (b"[]", HTTPStatus.BAD_REQUEST, "empty batch"),
    (body({"events": []}), HTTPStatus.BAD_REQUEST, "empty batch"),
    (body([event(i) for i in range(LIMIT + 1)]), HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
     f"{LIMIT + 1} events in one request; the limit is {LIMIT} events per request"),
    (body({"events": [event(i) for i in range(LIMIT + 1)]}), HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
     f"the limit is {LIMIT} events"),
    # the limit is checked before validation: a huge batch of junk is not validated at all
    (body([1] * (LIMIT + 1)), HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the limit is {LIMIT} events"),
])
def test_bodies_refused_without_field_errors(raw, status, message):
    error = refused(parse_events, raw, max_events=LIMIT, now=NOW)
    assert error.status == status and message in error.message and error.fields == []
    assert error.to_dict() == {"error": error.message}


@pytest.mark.parametrize("raw, field, reason", [
    # a lone event: bare field names
    (body(event(0, quantity=-2)), "quantity", "must be at least 1, got -2"),
    (body(event(0, user_id=...)), "user_id", "is required"),
    (body(event(0, event_type="wishlist")), "event_type", "'wishlist' is not one of view, click, add_to_cart, purchase"),
    (body(event(0, timestamp=NOW + 3600)), "timestamp", "3600 s in the future"),
    (body(event(0, colour="red")), "colour", "unknown field"),
    (body(event(0, version=2)), "version", "unsupported version 2"),
    (body("hello"), "<record>", "expected a JSON object, got str"),
    (body(42), "<record>", "expected a JSON object, got int"),
    # a batch: fields named by position
    (body([event(0), event(1), event(2), event(3, quantity=-2)]), "events[3].quantity", "must be at least 1, got -2"),
    (body({"events": [event(0), event(1, price="free")]}), "events[1].price", "expected a number, got str"),
    (body([event(0), 7]), "events[1]", "expected a JSON object, got int"),
    (body([event(0, session_id=...)]), "events[0].session_id", "is required"),
    (body([event(0), event(1), event(0)]), "events[2].event_id", "repeats events[0].event_id 'e0'"),
    (body([event(5, user_id="a"), event(5, user_id="b")]), "events[1].event_id", "repeats events[0].event_id 'e5'"),
    # the batch envelope
    (body({"events": {"event_id": "e1"}}), "events", "expected a list, got dict"),
    (body({"events": [event(0)], "source": "web"}), "source", "unknown field"),
])
def test_invalid_events_are_422_naming_field_and_reason(raw, field, reason):
    error = refused(parse_events, raw, max_events=LIMIT, now=NOW)
    assert error.status == HTTPStatus.UNPROCESSABLE_ENTITY
    reasons = {f.field: f.reason for f in error.fields}
    assert field in reasons, reasons
    assert reason in reasons[field]
    assert {"field": field, "reason": reasons[field]} in error.to_dict()["fields"]


def test_every_bad_event_of_a_batch_is_reported_and_none_accepted():
    raw = body([event(0), event(1, quantity=0, device="toaster"), event(2), event(3, product_id=...), event(0)])
    error = refused(parse_events, raw, max_events=LIMIT, now=NOW)
    assert error.message == "3 of 5 events invalid; none was accepted"
    assert [f.field for f in error.fields] == [
        "events[1].device", "events[1].quantity", "events[3].product_id", "events[4].event_id"]


@pytest.mark.parametrize("value", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_json_content_types_are_taken(value):
    check_content_type(value)


@pytest.mark.parametrize("value, message", [
    (None, "Content-Type must be application/json, got none"),
    ("", "Content-Type must be application/json, got none"),
    ("text/plain", "got 'text/plain'"),
    ("application/x-www-form-urlencoded", "got 'application/x-www-form-urlencoded'"),
    ("application/jsonl", "got 'application/jsonl'"),
    ("multipart/form-data; boundary=x", "got 'multipart/form-data; boundary=x'"),
])
def test_other_content_types_are_415(value, message):
    error = refused(check_content_type, value)
    assert error.status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE and message in error.message


@pytest.mark.parametrize("value", [None, "0", "1000", " 1000 "])
def test_declared_lengths_within_the_limit_are_taken(value):
    check_content_length(value, 1000)


@pytest.mark.parametrize("value, status, message", [
    ("1001", HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body over the limit of 1000 bytes"),
    ("99999999999999999999", HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "over the limit of 1000 bytes"),
    ("12ab", HTTPStatus.BAD_REQUEST, "Content-Length is not a number"),
    ("-5", HTTPStatus.BAD_REQUEST, "Content-Length is not a number"),
    ("١٢", HTTPStatus.BAD_REQUEST, "Content-Length is not a number"),  # non-ASCII digits
])
def test_bad_declared_lengths_are_refused(value, status, message):
    error = refused(check_content_length, value, 1000)
    assert error.status == status and message in error.message


@pytest.mark.parametrize("size, ok", [(0, True), (1000, True), (1001, False)])
def test_bytes_read_are_held_to_the_limit(size, ok):
    if ok:
        check_body_size(size, 1000)
    else:
        assert refused(check_body_size, size, 1000).status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
