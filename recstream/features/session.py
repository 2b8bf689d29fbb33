"""Per-user state: the write half (event -> new state) and the read half (state -> Redis values).

Pure: no Kafka, no Redis. The Faust agent keeps the state in a changelogged table; the batch layer
replays the same function over archived events, so training and serving see the same features.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

from recstream.features import keys
from schemas import Event

SEEN_MAX = 64       # event fingerprints remembered per user for de-duplication (count)
CART_MAX = 50       # products kept in the cart (count)
PURCHASES_MAX = 50  # recent purchases kept (count)
HISTORY_MAX = 30    # the user's last items of any event type across sessions (count)


@dataclass(frozen=True, slots=True)
class FeatureConfig:
    session_idle_timeout_s: float = 1800
    session_recent_max: int = 20
    covisit_window: int = 5
    weights: dict[str, float] = field(default_factory=lambda: {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 5.0})


@dataclass(frozen=True, slots=True)
class UserState:
    session_id: str | None = None
    session_start_s: float = 0.0
    last_s: float = 0.0
    recent: tuple[str, ...] = ()              # viewed or clicked this session, newest first, unique
    touched: tuple[str, ...] = ()             # every event type this session, newest first, unique (item kNN anchors)
    history: tuple[str, ...] = ()             # every event type, across sessions, newest first, unique (re-engagement)
    recent_s: tuple[float, ...] = ()          # event time (Unix s) of each item of `recent`, `touched`, `history`:
    touched_s: tuple[float, ...] = ()         # the lists are ordered by event time, not arrival, so an event that
    history_s: tuple[float, ...] = ()         # arrives late (another partition, re-routed) takes its own place
    categories: dict[str, int] = field(default_factory=dict)  # this session's category counts
    session_purchases: tuple[str, ...] = ()   # bought this session: the "order" for co-purchases
    cart: tuple[str, ...] = ()                # in the cart (outlives sessions until bought), newest first
    purchases: tuple[str, ...] = ()           # recent purchases, newest first
    last_viewed: str | None = None
    seen: tuple[str, ...] = ()                # fingerprints of recent event ids, oldest first
    events: int = 0
    partition: int = -1                       # Kafka position of the last event folded in (streaming only):
    offset: int = -1                          # a redelivered record is recognised however old it is

    def to_dict(self) -> dict[str, Any]:
        # shallow: dataclasses.asdict deep-copies every element and cost 10% of the worker's CPU
        return {f: getattr(self, f) for f in _FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> UserState:
        if not d:
            return cls()
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**values)


_FIELDS = tuple(f.name for f in fields(UserState))


def fingerprint(event_id: str) -> str:
    """48 bits of blake2b: short enough to keep 64 per user in every changelog write, and a
    collision within one user's last 64 events is ~1e-11 likely."""
    return hashlib.blake2b(event_id.encode(), digest_size=6).hexdigest()


@dataclass(frozen=True, slots=True)
class Update:
    state: UserState
    duplicate: bool = False
    covisits: tuple[tuple[str, str], ...] = ()   # (product, product viewed before it in the session)
    copurchases: tuple[tuple[str, str], ...] = ()


def _front(items: tuple[str, ...], item: str, cap: int) -> tuple[str, ...]:
    return (item, *(x for x in items if x != item))[:cap]


def _aligned(times: tuple[float, ...], n: int, unknown_s: float) -> tuple[float, ...]:
    return times[:n] + (unknown_s,) * (n - len(times))


def _place(items: tuple[str, ...], times: tuple[float, ...], item: str, ts: float, cap: int,
           unknown_s: float) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """`item` at its place by event time in a newest-first unique list, each item at its latest touch.
    In arrival order (the usual case) that is the front, as `_front`; an event that arrives after newer
    ones (written by another producer, on another partition, and re-routed) goes behind them. Items of
    a state written before times were kept are taken to be at `unknown_s` (the state's last event)."""
    times = _aligned(times, len(items), unknown_s)
    ts = round(ts, 3)   # milliseconds are enough, and 4 bytes less an item in every state write
    if item in items:
        i = items.index(item)
        if times[i] > ts:
            return items, times          # touched again later: that touch keeps its place
        items, times = items[:i] + items[i + 1:], times[:i] + times[i + 1:]
    at = sum(1 for t in times if t > ts)  # newest first; a tie goes before (arrival order)
    return (*items[:at], item, *items[at:])[:cap], (*times[:at], ts, *times[at:])[:cap]


def apply(state: UserState, event: Event, cfg: FeatureConfig, category: str | None = None) -> Update:
    """Fold one event into a user's state. A repeated event_id changes nothing (idempotent)."""
    fp = fingerprint(event.event_id)
    if fp in state.seen:
        return Update(state, duplicate=True)
    category = event.category or category
    ts = event.timestamp
    # the new state's fields, changed in place and built once (dataclasses.replace per step cost 4
    # copies of the whole state an event)
    s = {name: getattr(state, name) for name in _FIELDS}
    # An event older than the current session counts, but leaves the session as it is; one of this
    # session that arrives after later ones (another producer's partition, re-routed) takes its place.
    same = s["session_id"] == event.session_id
    late = ts < s["session_start_s"] and not (same and s["session_start_s"] - ts <= cfg.session_idle_timeout_s)
    if not late and (not same or ts - s["last_s"] > cfg.session_idle_timeout_s):
        s.update(session_id=event.session_id, session_start_s=ts, recent=(), touched=(), recent_s=(),
                 touched_s=(), categories={}, session_purchases=())
    elif not late and ts < s["session_start_s"]:
        s["session_start_s"] = ts
    covisits: tuple[tuple[str, str], ...] = ()
    copurchases: tuple[tuple[str, str], ...] = ()
    pid = event.product_id
    if not late:
        s["touched"], s["touched_s"] = _place(s["touched"], s["touched_s"], pid, ts, cfg.session_recent_max, s["last_s"])
        s["history"], s["history_s"] = _place(s["history"], s["history_s"], pid, ts, HISTORY_MAX, s["last_s"])
    if event.event_type in ("view", "click") and not late:
        # pairs with the items viewed before it (in event time): in arrival order, the previous ones
        older = [x for x, t in zip(s["recent"], _aligned(s["recent_s"], len(s["recent"]), s["last_s"])) if t <= ts]
        covisits = tuple((pid, prev) for prev in older[: cfg.covisit_window] if prev != pid)
        categories = dict(s["categories"])
        if category:
            categories[category] = categories.get(category, 0) + 1
        recent, recent_s = _place(s["recent"], s["recent_s"], pid, ts, cfg.session_recent_max, s["last_s"])
        s.update(recent=recent, recent_s=recent_s, categories=categories, last_viewed=recent[0] if recent else pid)
    elif event.event_type == "add_to_cart":
        s["cart"] = _front(s["cart"], pid, CART_MAX)
    elif event.event_type == "purchase":
        if not late:
            copurchases = tuple((pid, other) for other in s["session_purchases"] if other != pid)
            s["session_purchases"] = _front(s["session_purchases"], pid, CART_MAX)
        s["purchases"] = _front(s["purchases"], pid, PURCHASES_MAX)
        s["cart"] = tuple(x for x in s["cart"] if x != pid)
    s.update(last_s=max(s["last_s"], ts), seen=(*s["seen"], fp)[-SEEN_MAX:], events=s["events"] + 1)
    return Update(UserState(**s), covisits=covisits, copurchases=copurchases)


# -- read half: what serving reads from Redis ----------------------------------------------------

def session_key(user_id: str) -> str:
    return keys.user_session(user_id)


def features_key(user_id: str) -> str:
    return keys.user_features(user_id)


def state_key(user_id: str) -> str:
    return keys.user_state(user_id)


def state_value(state: UserState) -> bytes:
    """user_state:{id}: the session table's row (UserState.to_dict) as JSON."""
    return orjson.dumps(state.to_dict())


def decode_state(raw: bytes | None) -> UserState | None:
    return UserState.from_dict(orjson.loads(raw)) if raw else None


def newest(table: UserState, stored: UserState | None) -> UserState:
    """The state to fold the next event into: the session table's row, or the copy Redis holds
    (user_state, written atomically with the features and the offset guard) where that copy has
    folded more of the user's partition. Redis is written before the table, so the copy is never
    behind, unless it expired; the table is behind when Faust lost a write in a rebalance."""
    if stored is None or stored.partition < 0:
        return table
    if table.partition < 0 or (stored.partition == table.partition and stored.offset > table.offset):
        return stored
    return table


def session_value(state: UserState) -> bytes:
    """user_session:{id}: the last products viewed or clicked this session, newest first (JSON list)."""
    return orjson.dumps(list(state.recent))


def features_value(state: UserState) -> dict[str, str]:
    """user_features:{id}: a hash of JSON values."""
    return {
        "session_id": state.session_id or "",
        "last_viewed": state.last_viewed or "",
        "session_categories": orjson.dumps(state.categories).decode(),
        "cart_items": orjson.dumps(list(state.cart)).decode(),
        "session_purchases": orjson.dumps(list(state.session_purchases)).decode(),
        "session_items": orjson.dumps(list(state.touched)).decode(),
        "history": orjson.dumps(list(state.history)).decode(),
        "purchases": orjson.dumps(list(state.purchases)).decode(),
        "last_event_s": repr(state.last_s),
        "events": str(state.events),
    }


def decode_features(raw: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    """Inverse of features_value, for serving and tests."""
    d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}
    return {
        "session_id": d.get("session_id") or None,
        "last_viewed": d.get("last_viewed") or None,
        "session_categories": orjson.loads(d.get("session_categories", "{}")),
        "cart_items": orjson.loads(d.get("cart_items", "[]")),
        "session_purchases": orjson.loads(d.get("session_purchases", "[]")),
        "session_items": orjson.loads(d.get("session_items", "[]")),
        "history": orjson.loads(d.get("history", "[]")),
        "purchases": orjson.loads(d.get("purchases", "[]")),
        "last_event_s": float(d.get("last_event_s", 0)),
        "events": int(d.get("events", 0)),
    }
