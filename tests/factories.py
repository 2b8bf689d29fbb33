"""Record builders for the tests, on the schemas' dataclasses (schemas/: the single source of truth).

Each builder makes one record with plain defaults that any field overrides, by its name or, for
events, a short alias (`user`, `kind`, `pid`, `ts`, ...). A test module binds its own defaults and
argument order once with `bind`, and its calls stay short:

    ev = bind(event, "i", "user", "kind", "pid", t0=T0, category="Audio")
    ev(3, "u1", "view", "p1")   # Event e3: u1 viewed p1 at T0 + 3, category Audio, session s1

An event's default may be a function of its other fields and its number `i`
(`session=lambda f: f"s-{f['user_id']}"`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from schemas import Event, Exposure, Product, RecommendationRequest

T0 = 1_764_000_000.0   # 2025-11-24T16:00:00Z

EVENT_ALIASES = {"eid": "event_id", "user": "user_id", "session": "session_id", "product": "product_id",
                 "pid": "product_id", "item": "product_id", "kind": "event_type", "ts": "timestamp", "t": "timestamp",
                 "rid": "rec_request_id"}


def bind(factory: Callable[..., Any], *names: str, **defaults: Any) -> Callable[..., Any]:
    """`factory` taking its arguments positionally in the order `names`, over `defaults`."""
    def build(*args: Any, **fields: Any) -> Any:
        if len(args) > len(names):
            raise TypeError(f"at most {len(names)} positional arguments ({', '.join(names)}), got {len(args)}")
        return factory(**{**defaults, **dict(zip(names, args)), **fields})
    return build


def _resolved(fields: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    """Aliases to field names; of two spellings of one field the later wins (`bind` puts the call's last)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        name = aliases.get(key, key)
        out.pop(name, None)
        out[name] = value
    return out


def _derived(record: dict[str, Any], i: int | str) -> dict[str, Any]:
    """Defaults that are functions of the other fields (and of the number `i`), computed from those given."""
    plain = {"i": i, **{k: v for k, v in record.items() if not callable(v)}}
    return {k: (v(plain) if callable(v) else v) for k, v in record.items()}


def event_fields(i: int | str = 0, *, t0: float = T0, dt: float = 1.0, **fields: Any) -> dict[str, Any]:
    """An event's fields: number `i` is e{i} (i itself when a string), shopper u1 in session s1 viewing
    p{i} at t0 + i * dt. A timestamp given as None takes that default."""
    out: dict[str, Any] = {"event_id": i if isinstance(i, str) else f"e{i}", "user_id": "u1", "session_id": "s1",
                           "product_id": f"p{i}", "event_type": "view"}
    given = _resolved(fields, EVENT_ALIASES)
    if given.get("timestamp") is None:
        given.pop("timestamp", None)
        if not isinstance(i, str):
            out["timestamp"] = t0 + i * dt
    return _derived({**out, **given}, i)


def event(i: int | str = 0, *, t0: float = T0, dt: float = 1.0, **fields: Any) -> Event:
    """schemas.Event from `event_fields`; the timestamp a float, as the wire's JSON gives it."""
    f = event_fields(i, t0=t0, dt=dt, **fields)
    return Event(**{**f, "timestamp": float(f["timestamp"])})


def event_json(i: int = 0, *, t0: float = T0, dt: float = 1.0, **fields: Any) -> dict[str, Any]:
    """An event as a JSON body sends it (HTTP tests): the required fields and those given; a field
    given as ... is left out (a missing field), one given as None is sent as null."""
    f = event_fields(i, t0=t0, dt=dt, **fields)
    return {k: v for k, v in f.items() if v is not ...}


def product(pid: str = "p1", category: str = "Audio", **fields: Any) -> Product:
    """schemas.Product: "Item {pid}" by Nova in Shop > `category` at 10.0, listed a day before T0."""
    return Product(**{"product_id": pid, "title": f"Item {pid}", "category_path": ("Shop", category),
                      "brand": "Nova", "price": 10.0, "created_at": T0 - 86400, **fields})


def request(**fields: Any) -> RecommendationRequest:
    """schemas.RecommendationRequest, validated as a topic's consumer reads it: request r1 for a
    homepage, created now."""
    return RecommendationRequest.from_dict({"request_id": "r1", "kind": "homepage", "created_at": time.time(),
                                            **fields})


def exposure(rid: str = "r1", user: str = "u1", items: Iterable[str] = ("p1", "p2"), **fields: Any) -> Exposure:
    """schemas.Exposure: homepage list `items` (positions 1..n) served to `user` at T0 as request `rid`."""
    items = tuple(items)
    return Exposure(**{"request_id": rid, "ts": T0, "kind": "homepage", "unit": f"u:{user}", "user_id": user,
                       "items": items, "positions": tuple(range(1, len(items) + 1)), "status": "ok", "latency_ms": 10.0,
                       **fields})
