"""Query parameters of the recommendation endpoints (pure): parsing into a RecommendationRequest,
errors that name the parameter, and the OpenAPI description, all from one table."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from schemas import RecommendationReply, RecommendationRequest, SchemaError
from schemas.base import FieldError
from schemas.events import DEVICES
from schemas.recommendations import MAX_COUNT

# URL path -> request kind
PATHS = {"homepage": "homepage", "similar": "similar", "cart": "cart", "also-viewed": "also_viewed"}
DEFAULT_COUNT = {"homepage": 8, "similar": 8, "cart": 4, "also_viewed": 8}
MAX_CART = 100


@dataclass(frozen=True)
class Param:
    name: str
    type: str                      # OpenAPI type
    doc: str
    required_for: tuple[str, ...] = ()


PARAMS = (
    Param("user_id", "string", "shopper id; absent or unknown: trending items (homepage) and no personal signal"),
    Param("product_id", "string", "the product on screen", required_for=("similar", "also_viewed")),
    Param("cart_items", "string", f"comma-separated product ids in the cart (1-{MAX_CART})", required_for=("cart",)),
    Param("count", "integer", f"items wanted, 1-{MAX_COUNT} (default 8; cart 4)"),
    Param("session_id", "string", "current session id"),
    Param("page", "string", "page the widget is on: home, product, category, search, cart, checkout"),
    Param("device", "string", "one of " + ", ".join(DEVICES)),
    Param("category", "string", "category in view; the fallback's trending items come from it"),
    Param("debug", "boolean", "1: per-stage timings and the session the ranker saw"),
)
_NAMES = {p.name for p in PARAMS}
CONTEXT = ("page", "device", "category")


class ParamError(Exception):
    """A bad parameter: HTTP `status` with the field and the reason."""

    def __init__(self, errors: list[FieldError], status: int = 400, title: str = "invalid request"):
        self.errors, self.status, self.title = errors, status, title
        super().__init__("; ".join(map(str, errors)))

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.title, "fields": [{"field": e.field, "reason": e.reason} for e in self.errors]}


def parse(path_kind: str, query: Mapping[str, str], now: float | None = None) -> RecommendationRequest:
    """The request for GET /api/v1/recommendations/{path_kind}?query; ParamError naming each bad field."""
    kind = PATHS.get(path_kind)
    if kind is None:
        raise ParamError([FieldError("kind", f"{path_kind[:40]!r} is not one of {', '.join(PATHS)}")], status=404,
                         title="unknown recommendation kind")
    errors = [FieldError(k[:40], "unknown parameter") for k in sorted(set(query) - _NAMES)]
    d: dict[str, Any] = {"request_id": uuid.uuid4().hex, "kind": kind, "created_at": time.time() if now is None else now}
    for name in ("user_id", "product_id", "session_id"):
        if name in query:
            d[name] = query[name]
            if not query[name].strip():
                errors.append(FieldError(name, "must not be empty"))
    if "cart_items" in query:
        raw = query["cart_items"]
        items = [x.strip() for x in raw.split(",")]
        if not raw.strip() or any(not x for x in items):
            errors.append(FieldError("cart_items", "expected comma-separated product ids, without empty ones"))
        elif len(items) > MAX_CART:
            errors.append(FieldError("cart_items", f"more than {MAX_CART} items ({len(items)})"))
        d["cart_items"] = list(dict.fromkeys(items))
    d["count"] = DEFAULT_COUNT[kind]
    if "count" in query:
        try:
            d["count"] = int(query["count"])
        except ValueError:
            errors.append(FieldError("count", f"expected an integer, got {query['count'][:20]!r}"))
    if "device" in query and query["device"] not in DEVICES:
        errors.append(FieldError("device", f"{query['device'][:20]!r} is not one of {', '.join(DEVICES)}"))
    context = {k: query[k] for k in CONTEXT if query.get(k)}
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


def openapi(version: str = "1") -> dict[str, Any]:
    """The OpenAPI 3 description of the recommendation endpoints, from PARAMS and the reply schema."""
    reply_props = {name: {"description": doc} for name, _, doc in RecommendationReply.describe()}
    paths = {}
    for path, kind in PATHS.items():
        params = [{"name": p.name, "in": "query", "required": kind in p.required_for, "description": p.doc,
                   "schema": {"type": p.type}} for p in PARAMS]
        paths[f"/api/v1/recommendations/{path}"] = {"get": {
            "summary": f"{path} recommendations",
            "parameters": params,
            "responses": {
                "200": {"description": "recommendations, best first (fallback: true when served by trending)",
                        "content": {"application/json": {"schema": {"type": "object", "properties": reply_props}}}},
                "400": {"description": "a parameter is missing or invalid; the body names it"},
                "404": {"description": "unknown product (or kind); the body names it"},
            }}}
    paths["/api/v1/events"] = {"post": {"summary": "log interaction events (JSON object or array, see schemas.Event)",
                                        "responses": {"202": {"description": "acknowledged by Kafka"},
                                                      "400": {"description": "invalid event; the body names the field"},
                                                      "413": {"description": "too many events or bytes"},
                                                      "503": {"description": "Kafka unavailable; retry"}}}}
    return {"openapi": "3.0.3", "info": {"title": "recstream", "version": version}, "paths": paths}
