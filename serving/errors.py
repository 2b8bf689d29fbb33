"""The one JSON error body of every HTTP route, public and admin, and the one place that builds it.

    {"error": "what went wrong", "fields": [{"field": "events[3].quantity", "reason": "must be at least 1"}]}

`error` is always there; `fields` only when the request named something bad (a parameter, a body
field, an experiment's `location`). Every 4xx and 5xx answer goes through `error_response`: the
app's exception handlers (serving/app.py), the admin API's refusals (serving/admin.py), the
readiness probes' 503 (which add their own `status`), and Starlette's own 404/405 and a 500.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from starlette.responses import JSONResponse

from schemas import FieldError

SCHEMA: dict[str, Any] = {   # the OpenAPI description of the body (serving/params.py openapi)
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "string"},
                   "fields": {"type": "array", "items": {
                       "type": "object", "required": ["field", "reason"],
                       "properties": {"field": {"type": "string"}, "reason": {"type": "string"}}}}}}


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ApiError(Exception):
    """A request answered with an error `status`, a message and, when it names them, the bad fields."""

    def __init__(self, status: int, message: str, fields: Iterable[FieldError] = (),
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.fields, self.headers = int(status), message, list(fields), headers

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.message, self.fields)

    def response(self) -> OrjsonResponse:
        return error_response(self.status, self.message, self.fields, self.headers)


def error_body(message: str, fields: Iterable[FieldError] = ()) -> dict[str, Any]:
    body: dict[str, Any] = {"error": message}
    listed = [{"field": f.field, "reason": f.reason} for f in fields]
    if listed:
        body["fields"] = listed
    return body


def error_response(status_code: int, message: str, fields: Iterable[FieldError] = (),
                   headers: Mapping[str, str] | None = None, **extra: Any) -> OrjsonResponse:
    """The error answer; `extra` keys (the probes' `status`) come after `error` and `fields`."""
    return OrjsonResponse({**error_body(message, fields), **extra}, status_code=int(status_code),
                          headers=dict(headers) if headers else None)


def located(problems: Iterable[str]) -> list[FieldError]:
    """Experiment problems ('location: message', recstream.experiments.definition) as fields."""
    out = []
    for p in problems:
        field, sep, reason = p.partition(": ")
        out.append(FieldError(field, reason) if sep else FieldError("", p))
    return out
