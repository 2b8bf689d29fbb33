"""Query parameters of the recommendation endpoints (pure): parsing into a RecommendationRequest,
errors that name the parameter, and the OpenAPI description, all from one table."""
from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from schemas import Event, RecommendationReply, RecommendationRequest, SchemaError
from schemas.base import ID_PATTERN, Choice, FieldError, Flag, Id, Invalid, Label, Number, json_schema
from schemas.events import DEVICES
from schemas.jsonschema import published as published_schemas
from schemas.recommendations import MAX_COUNT
from serving import errors
from serving.errors import ApiError

# URL path -> request kind
PATHS = {"homepage": "homepage", "similar": "similar", "cart": "cart", "also-viewed": "also_viewed"}
DEFAULT_COUNT = {"homepage": 8, "similar": 8, "cart": 4, "also_viewed": 8}
MAX_CART = 100
MAX_CART_CHARS = 2048           # the cart_items parameter's length: query strings stay well inside the HTTP server's limits
ID = Id()                       # user, product and session ids: checked here before they become Redis or Kafka keys
_ITEM = ID_PATTERN[1:-1]        # one id, unanchored
# comma-separated ids: the cart's pattern, derived from the id rule
CART_PATTERN = f"^{_ITEM}(,{_ITEM}){{0,{MAX_CART - 1}}}$"
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class QueryInt:
    """An integer query parameter: ASCII digits only (int() would also take " 5", "+5", "5_0" and "٥"),
    then `number`'s range."""
    number: Number

    def __call__(self, v: str, now: float) -> int:
        if not _DIGITS.fullmatch(v):
            raise Invalid(f"expected an integer (digits 0-9 only), got {v[:20]!r}")
        if len(v.lstrip("0")) > 15:       # past any range here, and int() refuses over 4300 digits
            raise Invalid(f"too large ({len(v.lstrip('0'))} digits)")
        return int(self.number(int(v), now))

    def json_schema(self) -> dict[str, Any]:
        return self.number.json_schema()


@dataclass(frozen=True)
class Param:
    name: str
    rule: Any                      # the check (schemas.base) that describes it in OpenAPI; None: `schema` below
    doc: str
    required_for: tuple[str, ...] = ()
    schema: dict[str, Any] | None = None

    def json_schema(self) -> dict[str, Any]:
        return dict(self.schema) if self.schema is not None else json_schema(self.rule)


PARAMS = (
    Param("user_id", ID, "shopper id; absent or unknown: trending items (homepage) and no personal signal"),
    Param("product_id", ID, "the product on screen", required_for=("similar", "also_viewed")),
    Param("cart_items", None, f"comma-separated product ids in the cart (1-{MAX_CART})", required_for=("cart",),
          schema={"type": "string", "pattern": CART_PATTERN, "maxLength": MAX_CART_CHARS}),
    Param("count", QueryInt(Number(lo=1, hi=MAX_COUNT, integer=True)),
          f"items wanted, 1-{MAX_COUNT} (default 8; cart 4)"),
    Param("session_id", ID, "current session id"),
    Param("page", Label(max_len=64, min_len=0),
          "page the widget is on: home, product, category, search, cart, checkout"),
    Param("device", Choice(DEVICES), "one of " + ", ".join(DEVICES)),
    Param("category", Label(min_len=0), "category in view; the fallback's trending items come from it"),
    Param("debug", Flag(), "1: per-stage timings and the session the ranker saw"),
)
RULES = {p.name: p.rule for p in PARAMS}
CONTEXT = ("page", "device", "category")


class ParamError(ApiError):
    """A bad parameter: HTTP `status` with the field and the reason."""

    def __init__(self, errors: list[FieldError], status: int = 400, title: str = "invalid request"):
        super().__init__(status, title, errors)
        self.errors, self.title = self.fields, title

    def __str__(self) -> str:
        return "; ".join(map(str, self.errors))


def parse(path_kind: str, query: Mapping[str, str] | Iterable[tuple[str, str]],
          now: float | None = None) -> RecommendationRequest:
    """The request for GET /api/v1/recommendations/{path_kind}?query; ParamError naming each bad field.
    `query`: a mapping, or the (name, value) pairs as sent (Starlette's multi_items()): a parameter
    given twice is refused, not resolved to one of its values."""
    kind = PATHS.get(path_kind)
    if kind is None:
        raise ParamError([FieldError("kind", f"{path_kind[:40]!r} is not one of {', '.join(PATHS)}")], status=404,
                         title="unknown recommendation kind")
    pairs = list(query.items()) if isinstance(query, Mapping) else list(query)
    query = dict(pairs)
    errors = [FieldError(k[:40], "unknown parameter") for k in sorted(set(query) - RULES.keys())]
    errors += [FieldError(k, f"given {n} times; give it once") for k, n in sorted(Counter(k for k, _ in pairs).items())
               if n > 1 and k in RULES]
    d: dict[str, Any] = {"request_id": uuid.uuid4().hex, "kind": kind, "created_at": time.time() if now is None else now}
    for name in ("user_id", "product_id", "session_id"):
        if name in query:
            d[name] = query[name]
            if not query[name].strip():
                errors.append(FieldError(name, "must not be empty"))
                continue
            _check(name, query[name], errors)
    if "cart_items" in query:
        raw = query["cart_items"]
        items = raw.split(",")   # each item as given: the product_id rule, no trimming
        if len(raw) > MAX_CART_CHARS:
            errors.append(FieldError("cart_items", f"longer than {MAX_CART_CHARS} characters ({len(raw)})"))
        elif not raw.strip() or any(not x for x in items):
            errors.append(FieldError("cart_items", "expected comma-separated product ids, without empty ones"))
        elif len(items) > MAX_CART:
            errors.append(FieldError("cart_items", f"more than {MAX_CART} items ({len(items)})"))
        else:
            for i, item in enumerate(items):
                _check(f"cart_items[{i}]", item, errors, ID)
        d["cart_items"] = list(dict.fromkeys(items))
    d["count"] = DEFAULT_COUNT[kind]
    for p in PARAMS:
        if isinstance(p.rule, QueryInt) and p.name in query:
            d[p.name] = _check(p.name, query[p.name], errors)
    context = {}
    for name in CONTEXT:
        if name in query and _check(name, query[name], errors) is not None and query[name]:
            context[name] = query[name]   # empty values are no context
    if context:
        d["context"] = context
    debug = query.get("debug", "0").lower()
    if debug not in ("0", "1", "true", "false"):
        errors.append(FieldError("debug", "expected 0, 1, true or false"))
    d["debug"] = debug in ("1", "true")
    for p in PARAMS:
        if kind in p.required_for and p.name not in query:
            errors.append(FieldError(p.name, f"is required for {path_kind}"))
    if errors:
        raise ParamError(errors)
    try:
        return RecommendationRequest.from_dict(d)
    except SchemaError as exc:
        raise ParamError(exc.errors) from None


def _check(name: str, value: Any, errors: list[FieldError], rule: Any = None) -> Any:
    """`value` checked by its parameter's rule (or `rule`); None, with the error noted under `name`, if bad."""
    try:
        return (rule or RULES[name])(value, 0.0)
    except Invalid as exc:
        errors.append(FieldError(name, str(exc)))
        return None


# -- the OpenAPI description: generated from PARAMS and the schemas' checks, never by hand per field --

ADMIN_PREFIX = "/api/v1/admin"
EXPERIMENT_ID = {"type": "string", "pattern": r"^[A-Za-z0-9_.-]+$", "maxLength": 64}  # recstream.experiments.definition
_ERROR = {"$ref": "#/components/schemas/Error"}   # every route's error body (serving/errors.py)
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def _json(description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _reply_schema() -> dict[str, Any]:
    """The 200 body: RecommendationReply without the wire format's version fields (serving.recommend.reply_body)."""
    schema = RecommendationReply.json_schema(strict=False)
    schema["properties"].pop("version", None)
    return schema


def _events_body(max_events: int, now: float) -> dict[str, Any]:
    event = Event.json_schema()
    event["properties"]["timestamp"] = {**event["properties"]["timestamp"],
                                        **Event.__dataclass_fields__["timestamp"].metadata["check"].json_schema(now)}
    batch = {"type": "array", "items": {"$ref": "#/components/schemas/Event"}, "minItems": 1, "maxItems": max_events,
             "description": "a batch, all-or-nothing; event_ids unique within it"}
    return {"event": event, "body": {"anyOf": [
        {"$ref": "#/components/schemas/Event"}, batch,
        {"type": "object", "properties": {"events": batch}, "required": ["events"], "additionalProperties": False}]}}


def _admin_paths() -> dict[str, Any]:
    secured = [{"bearer": []}]
    id_param = [{"name": "id", "in": "path", "required": True, "description": "experiment id", "schema": EXPERIMENT_ID}]
    force = [{"name": "force", "in": "query", "required": False, "schema": {"type": "boolean"},
              "description": "1: allow changing or deleting a running experiment"}]
    refusals = {
        "401": _json("missing or wrong token (Authorization: Bearer <token>)", _ERROR,
                     {"WWW-Authenticate": {"schema": {"type": "string"}}}),
        "403": _json("admin API disabled: no admin token configured", _ERROR),
    }
    body = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
    bad = {"400": _json("invalid body or not JSON; `fields` locates each problem", _ERROR),
           "409": _json("conflicts with the stored experiments (running, overlapping layer, ...)", _ERROR),
           "413": _json("body too large", _ERROR)}
    obj = {"type": "object"}
    return {
        f"{ADMIN_PREFIX}/experiments": {"get": {
            "summary": "the experiments file: revision, defaults, experiments", "security": secured,
            "responses": {"200": _json("the experiments", obj), **refusals}}},
        f"{ADMIN_PREFIX}/experiments/{{id}}": {
            "get": {"summary": "one experiment", "security": secured, "parameters": id_param,
                    "responses": {"200": _json("the experiment", obj), **refusals,
                                  "404": _json("no such experiment", _ERROR)}},
            "put": {"summary": "create or replace an experiment", "security": secured, "parameters": id_param + force,
                    "requestBody": body,
                    "responses": {"200": _json("replaced", obj), "201": _json("created", obj), **refusals, **bad}},
            "delete": {"summary": "delete an experiment", "security": secured, "parameters": id_param + force,
                       "responses": {"200": _json("deleted", obj), **refusals,
                                     "404": _json("no such experiment", _ERROR),
                                     "409": bad["409"]}}},
        f"{ADMIN_PREFIX}/defaults": {"put": {
            "summary": "set the serving defaults every request runs with", "security": secured, "requestBody": body,
            "responses": {"200": _json("the new defaults and revision", obj), **refusals, **bad}}},
    }


def openapi(version: str = "1", *, max_events: int = 500, max_body_bytes: int = 1024 * 1024,
            now: float | None = None) -> dict[str, Any]:
    """The OpenAPI 3 description of every route, from PARAMS and the schemas' checks (schemas.base
    json_schema): types, enums, bounds and id patterns are the validators' own. max_events and
    max_body_bytes: the Settings' http_max_batch_events and http_max_body_bytes (defaults: theirs).
    Timestamps' upper bound is as of `now` (default: when generated)."""
    now = time.time() if now is None else now
    error = {"400": _json("a parameter is missing or invalid; `fields` names it", _ERROR)}
    paths: dict[str, Any] = {}
    for path, kind in PATHS.items():
        params = [{"name": p.name, "in": "query", "required": kind in p.required_for, "description": p.doc,
                   "schema": p.json_schema()} for p in PARAMS]
        paths[f"/api/v1/recommendations/{path}"] = {"get": {
            "summary": f"{path} recommendations",
            "parameters": params,
            "responses": {
                "200": _json("recommendations, best first (fallback: true when served by trending)", _reply_schema()),
                **error,
                "404": _json("unknown product (or kind); `fields` names it", _ERROR),
            }}}
    events = _events_body(max_events, now)
    paths["/api/v1/events"] = {"post": {
        "summary": "log interaction events (JSON object, array, or {\"events\": [...]}; see schemas.Event)",
        "requestBody": {"required": True, "content": {"application/json": {"schema": events["body"]}}},
        "responses": {
            "202": _json("acknowledged by Kafka (every event)", {"type": "object", "required": ["accepted"],
                                                                  "properties": {"accepted": {"type": "integer"}}}),
            **error,
            "413": _json(f"more than {max_events} events or {max_body_bytes} bytes", _ERROR),
            "415": _json("Content-Type is not application/json", _ERROR),
            "422": _json("an event is invalid; nothing of the request was sent; `fields` names each", _ERROR),
            "503": _json("Kafka unavailable; retry", _ERROR, _RETRY_AFTER)}}}
    paths["/healthz"] = {"get": {"summary": "liveness: 200 once the Kafka producer is connected", "responses": {
        "200": _json("ok", {"type": "object", "properties": {"status": {"type": "string"}}}),
        "503": _json("Kafka not connected yet", {"allOf": [_ERROR, {"type": "object", "properties": {
            "status": {"type": "string"}}}]}, _RETRY_AFTER)}}}
    ready = {"type": "object", "required": ["status", "model_version"],
             "properties": {"status": {"type": "string"}, "model_version": {"type": "string"}}}
    paths["/readyz"] = {"get": {"summary": "readiness: 200 when the agents can answer (every retrieval shard and the "
                                           "ranking agents reported within 10 s, with a model once one is published)",
                                "responses": {
        "200": _json("ready; model_version: the version the agents serve", ready),
        "503": _json("not ready; error and status say why (Kafka, no agent alive, no model loaded yet)",
                     {"allOf": [_ERROR, ready]}, _RETRY_AFTER)}}}
    paths["/openapi.json"] = {"get": {"summary": "this description", "responses": {
        "200": _json("OpenAPI 3.0 document", {"type": "object"})}}}
    for name in published_schemas():
        paths[f"/schemas/{name}"] = {"get": {"summary": f"JSON Schema of the {name.split('.')[0]} record on Kafka "
                                                        "(docs/publishing.md)", "responses": {
            "200": {"description": "JSON Schema, draft 2020-12",
                    "content": {"application/schema+json": {"schema": {"type": "object"}}}}}}}
    paths.update(_admin_paths())
    for operations in paths.values():
        for operation in operations.values():
            operation["responses"]["500"] = _json("internal error (a bug: the log has it)", _ERROR)
    return {"openapi": "3.0.3", "info": {"title": "recstream", "version": version}, "paths": paths,
            "components": {"schemas": {"Event": events["event"], "Error": errors.SCHEMA},
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                          "description": "RECSTREAM_ADMIN_TOKEN"}}}}
