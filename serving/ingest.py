"""HTTP ingest, the pure part: checks headers and turns a request body into validated Events."""
from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson

from schemas import Event, FieldError, SchemaError
from serving.errors import ApiError

MEDIA_TYPE = "application/json"


class IngestError(ApiError):
    """A request the endpoint refuses: the HTTP status, a message, and the bad fields (for 422)."""

    def __init__(self, status: HTTPStatus, message: str, fields: list[FieldError] | None = None):
        super().__init__(status, message, fields or [])


def check_content_type(value: str | None) -> None:
    """Only JSON is taken; parameters such as `charset=utf-8` are allowed."""
    media_type = (value or "").split(";", 1)[0].strip().lower()
    if media_type != MEDIA_TYPE:
        raise IngestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                          f"Content-Type must be {MEDIA_TYPE}, got {value[:60]!r}" if value else
                          f"Content-Type must be {MEDIA_TYPE}, got none")


def check_content_length(value: str | None, max_body_bytes: int) -> None:
    """Refuse a declared body over the limit before reading any of it (absent: chunked, checked as read)."""
    if value is None:
        return
    if not (value.strip().isascii() and value.strip().isdigit()):
        raise IngestError(HTTPStatus.BAD_REQUEST, f"Content-Length is not a number: {value[:40]!r}")
    check_body_size(int(value), max_body_bytes)


def check_body_size(size: int, max_body_bytes: int) -> None:
    """Called with the declared length and again with the bytes read so far, chunk by chunk."""
    if size > max_body_bytes:
        raise IngestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"body over the limit of {max_body_bytes} bytes per request")


def parse_events(body: bytes, *, max_events: int, now: float | None = None) -> list[Event]:
    """The events in `body`, all valid, or IngestError; a batch is refused whole (all-or-nothing).

    The body is one event object, a JSON array of events, or {"events": [...]}. Errors in a batch
    name the event by position (`events[3].quantity`); a lone event's errors name the bare field.
    A repeated event_id within one batch is an error too: the second copy would be dropped
    downstream (consumers deduplicate by event_id), which is a client bug worth reporting."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise IngestError(HTTPStatus.BAD_REQUEST, f"malformed JSON: {exc}") from None
    items = _batch_items(data)
    if items is None:
        try:
            return [Event.from_dict(data, now=now)]
        except SchemaError as exc:
            raise IngestError(HTTPStatus.UNPROCESSABLE_ENTITY, "invalid event", exc.errors) from None
    if not items:
        raise IngestError(HTTPStatus.BAD_REQUEST, "empty batch: send at least one event")
    if len(items) > max_events:
        raise IngestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"{len(items)} events in one request; the limit is {max_events} events per request")
    return _validate_batch(items, now)


def _batch_items(data: Any) -> list[Any] | None:
    """The items of a batch, or None when the body is a single event."""
    if isinstance(data, list):
        return data
    if not (isinstance(data, dict) and "events" in data):
        return None
    errors = [FieldError(str(k)[:40], 'unknown field; a batch object is {"events": [...]}')
              for k in sorted(map(str, data)) if k != "events"]
    if not isinstance(data["events"], list):
        errors.insert(0, FieldError("events", f"expected a list, got {type(data['events']).__name__}"))
    if errors:
        raise IngestError(HTTPStatus.UNPROCESSABLE_ENTITY, "invalid batch", errors)
    return data["events"]


def _validate_batch(items: list[Any], now: float | None) -> list[Event]:
    events: list[Event] = []
    errors: list[FieldError] = []
    bad = 0
    first_with_id: dict[str, int] = {}
    for i, item in enumerate(items):
        try:
            event = Event.from_dict(item, now=now)
        except SchemaError as exc:
            bad += 1
            errors.extend(FieldError(_prefixed(i, e.field), e.reason) for e in exc.errors)
            continue
        first = first_with_id.setdefault(event.event_id, i)
        if first != i:
            bad += 1
            errors.append(FieldError(f"events[{i}].event_id", f"repeats events[{first}].event_id {event.event_id!r}"))
            continue
        events.append(event)
    if errors:
        raise IngestError(HTTPStatus.UNPROCESSABLE_ENTITY,
                          f"{bad} of {len(items)} events invalid; none was accepted", errors)
    return events


def _prefixed(i: int, field: str) -> str:
    # schemas name a non-object record "<record>"; in a batch the position says it better
    return f"events[{i}]" if field == "<record>" else f"events[{i}].{field}"
