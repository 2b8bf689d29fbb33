"""Attribution of clickstream outcomes to logged impressions, and the A/B aggregates (pure core).

The exposures topic logs every served list (`schemas.Exposure`); the clickstream carries what the
shopper did next (`schemas.Event`). `step` folds a time-ordered batch of both into a `State` and
returns the `Changes` a store must write; streams/attribution.py is the Kafka + Redis edge.

Counting rules (this docstring is their documentation)
------------------------------------------------------
- Impression: one Exposure (one served list), identified by its request_id. An exposure whose
  request_id is already known is a duplicate and is dropped.
- Arms: an impression counts for every (experiment, variant) of its `experiments`, and always for
  the pseudo experiment "_all" / variant "all" (overall health, experiments or not).
- Outcome events: click, add_to_cart, purchase, and a view that carries rec_request_id (the landing
  on the product page from a recommendation: it counts as a click). A view without rec_request_id
  is not an outcome and is ignored.
- Duplicates: an outcome event whose event_id was already counted (within a day: `SEEN_TTL_S`)
  counts once.
- Attribution, (a) by request id: the event carries rec_request_id R, R's exposure is known (logged
  and within `attribution_ttl_s`) and lists the event's product -> attributed to R. An event citing
  an unknown request, or a known one that does not list the product, is unattributed (no fallback
  to the window rule).
- Attribution, (b) by time window: the event carries no rec_request_id -> attributed to the same
  shopper's latest exposure listing the product served at most `attribution_window_s` before the
  event (0 <= event time - served time <= window). The shopper of an exposure is its user_id, else
  its unit (the exposure's Kafka key); of an event, its user_id (the clickstream key).
- Events are taken in order of time, exposures before events of the same timestamp; an event is
  only matched against exposures taken before it (one that arrives later does not reclaim it).
- Per impression: clicked = at least one click on a listed product; carted = at least one
  add_to_cart; bought = at least one purchase; revenue = sum of price * quantity over its
  attributed purchases (a purchase without a price adds 0 revenue but still makes `bought`).
- Per (experiment, variant, unit) `UnitTotals`: impressions, and of them clicked / carted / bought
  (counts of impressions), revenue. The unit is the exposure's assignment unit ("u:<user>", ...).
- Per (experiment, variant) `VariantTotals`: the sums of the unit totals, units, units with at
  least one clicked / carted / bought impression (per-user binary outcomes for `chi2_rates`), the
  user-level moments for the delta method (x = impressions, y = clicked / carted / bought /
  revenue: sum x^2, sum y^2, sum x*y), and guardrails from the exposures: cached,
  fallback_deadline, fallback_error counts and a latency histogram (`recstream.stats.BUCKETS`).
  `unattributed` counts outcome events that could not be attributed: under "_all" every one;
  under an experiment's variant those citing an impression of that variant that does not list the
  product.
- Day buckets (`Changes.daily`): the same increments filed under the UTC day of the exposure (for
  impressions, units, guardrails) or of the event (for outcomes); the days' sums up to D are the
  totals as of the end of D (a unit is counted on the day of its first impression).

Aggregates are incremental: `increments(before, after)` turns one unit's change into
VariantTotals increments, so nothing ever scans the units.
"""
from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import orjson

from recstream.stats import BUCKETS, GROWTH, LOWEST_S, percentiles_ms
from schemas import Event, Exposure

ALL_EXPERIMENT, ALL_VARIANT = "_all", "all"
OUTCOMES = ("clicked", "carted", "bought", "revenue")
METRICS = {"ctr": "clicked", "add_to_cart_rate": "carted", "conversion_rate": "bought",
           "revenue_per_impression": "revenue"}
FLAG_OF_EVENT = {"click": "clicked", "view": "clicked", "add_to_cart": "carted", "purchase": "bought"}
RECENT_MAX = 50          # exposures remembered per shopper for window attribution
SEEN_TTL_S = 86400       # an event id is remembered this long for dedupe
LATENCY_FIELD = "lat:"   # VariantTotals latency bucket i is the field "lat:<i>"

UnitKey = tuple[str, str, str]      # (experiment, variant, unit)
ArmKey = tuple[str, str]            # (experiment, variant)
DayKey = tuple[str, str, str]       # (experiment, variant, "YYYY-MM-DD")
Logged = Exposure | Event
# A totals hash as stored (a Redis hash: bytes, or str when decoded) or an increments dict.
Fields = Mapping[str, object] | Mapping[bytes, object]


# -- per unit ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class UnitTotals:
    """One unit's totals in one (experiment, variant): x = impressions, y = the outcomes."""
    impressions: int = 0
    clicked: int = 0
    carted: int = 0
    bought: int = 0
    revenue: float = 0.0

    def to_fields(self) -> dict[str, str]:
        return {f.name: repr(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_fields(cls, data: Fields) -> UnitTotals:
        d = {_text(k): _text(v) for k, v in data.items()}
        return cls(impressions=int(d.get("impressions", 0)), clicked=int(d.get("clicked", 0)),
                   carted=int(d.get("carted", 0)), bought=int(d.get("bought", 0)),
                   revenue=float(d.get("revenue", 0.0)))


def increments(before: UnitTotals, after: UnitTotals) -> dict[str, float]:
    """The VariantTotals increments (unit-level fields only) when one unit goes from before to after."""
    out: dict[str, float] = {
        "units": int(after.impressions > 0) - int(before.impressions > 0),
        "impressions": after.impressions - before.impressions,
        "sum_x2": after.impressions ** 2 - before.impressions ** 2,
    }
    for y in OUTCOMES:
        a, b = getattr(after, y), getattr(before, y)
        out[y] = a - b
        out[f"sum_{y}2"] = a * a - b * b
        out[f"sum_x_{y}"] = after.impressions * a - before.impressions * b
        if y != "revenue":
            out[f"units_{y}"] = int(a > 0) - int(b > 0)
    return {k: v for k, v in out.items() if v}


# -- per variant ---------------------------------------------------------------------------------

FLOAT_FIELDS = ("revenue", "sum_revenue2", "sum_x_revenue")


@dataclass(frozen=True, slots=True)
class VariantTotals:
    units: int = 0
    impressions: int = 0
    clicked: int = 0
    carted: int = 0
    bought: int = 0
    revenue: float = 0.0
    units_clicked: int = 0
    units_carted: int = 0
    units_bought: int = 0
    sum_x2: int = 0
    sum_clicked2: int = 0
    sum_x_clicked: int = 0
    sum_carted2: int = 0
    sum_x_carted: int = 0
    sum_bought2: int = 0
    sum_x_bought: int = 0
    sum_revenue2: float = 0.0
    sum_x_revenue: float = 0.0
    cached: int = 0
    fallback_deadline: int = 0
    fallback_error: int = 0
    unattributed: int = 0
    latency: tuple[int, ...] = (0,) * BUCKETS   # counts per recstream.stats bucket of latency_ms

    @classmethod
    def from_fields(cls, data: Fields) -> VariantTotals:
        """From a Redis hash (bytes or str) or an increments dict; unknown fields are ignored."""
        values: dict[str, Any] = {}   # field -> int or float, as its FLOAT_FIELDS membership says
        latency = [0] * BUCKETS
        names = {f.name for f in fields(cls)} - {"latency"}
        for raw, v in data.items():
            k = _text(raw)
            if k.startswith(LATENCY_FIELD):
                latency[int(k[len(LATENCY_FIELD):])] += int(float(_text(v)))
            elif k in names:
                values[k] = float(_text(v)) if k in FLOAT_FIELDS else int(float(_text(v)))
        return cls(**values, latency=tuple(latency))

    def to_fields(self) -> dict[str, float]:
        out: dict[str, float] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "latency"}
        out.update({f"{LATENCY_FIELD}{i}": c for i, c in enumerate(self.latency) if c})
        return out

    def __add__(self, other: VariantTotals) -> VariantTotals:
        a, b = self.to_fields(), other.to_fields()
        return VariantTotals.from_fields({k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()})

    def rates(self) -> dict[str, float]:
        """Per-impression metrics and guardrails; NaN without impressions."""
        n = self.impressions

        def per(v: float) -> float:
            return v / n if n else math.nan

        return {"ctr": per(self.clicked), "add_to_cart_rate": per(self.carted), "conversion_rate": per(self.bought),
                "revenue_per_impression": per(self.revenue),
                "p99_latency_ms": percentiles_ms(list(self.latency), (99,))["p99"],
                "fallback_rate": per(self.fallback_deadline + self.fallback_error),
                "error_rate": per(self.fallback_error)}

    def moments(self, metric: str) -> tuple[float, float, float, float, float, float]:
        """(n, sum y, sum x, sum y^2, sum x^2, sum x*y) over units for `user_level_moments`:
        metric is one of ctr, add_to_cart_rate, conversion_rate, revenue_per_impression."""
        y = METRICS[metric]
        return (self.units, getattr(self, y), self.impressions, getattr(self, f"sum_{y}2"), self.sum_x2,
                getattr(self, f"sum_x_{y}"))


def totals_from_units(units: Mapping[UnitKey, UnitTotals]) -> dict[ArmKey, VariantTotals]:
    """The unit-level fields of VariantTotals computed from scratch (the check of `increments`)."""
    acc: dict[ArmKey, Counter[str]] = defaultdict(Counter)
    for (exp, variant, _), u in units.items():
        acc[(exp, variant)].update(increments(UnitTotals(), u))
    return {k: VariantTotals.from_fields(v) for k, v in acc.items()}


def latency_bucket(latency_ms: float) -> int:
    """The recstream.stats.LatencyHistogram bucket of a latency."""
    x = max(latency_ms / 1000, LOWEST_S)
    return min(int(math.ceil(math.log(x / LOWEST_S) / math.log(GROWTH))), BUCKETS - 1)


def utc_day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


# -- state ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class Impression:
    """What is remembered of an exposure (abx:imp:{request_id}): enough to attribute and count."""
    request_id: str
    unit: str
    shopper: str
    ts: float
    items: tuple[str, ...]
    arms: tuple[ArmKey, ...]
    clicked: bool = False
    carted: bool = False
    bought: bool = False

    @classmethod
    def of(cls, e: Exposure) -> Impression:
        arms = tuple(sorted((e.experiments or {}).items())) + ((ALL_EXPERIMENT, ALL_VARIANT),)
        return cls(e.request_id, e.unit, shopper_of(e), e.ts, tuple(e.items), arms)

    def to_json(self) -> bytes:
        return orjson.dumps({"unit": self.unit, "shopper": self.shopper, "ts": self.ts, "items": self.items,
                             "arms": self.arms, "flags": [self.clicked, self.carted, self.bought]})

    @classmethod
    def from_json(cls, request_id: str, raw: bytes | str) -> Impression:
        d = orjson.loads(raw)
        c, a, b = d["flags"]
        return cls(request_id, d["unit"], d["shopper"], d["ts"], tuple(d["items"]),
                   tuple((e, v) for e, v in d["arms"]), c, a, b)


@dataclass(frozen=True, slots=True)
class Recent:
    """One entry of a shopper's recent exposures (abx:recent:{shopper}), for window attribution."""
    request_id: str
    ts: float
    items: tuple[str, ...]


def recent_to_json(entries: Sequence[Recent]) -> bytes:
    return orjson.dumps([[r.request_id, r.ts, r.items] for r in entries])


def recent_from_json(raw: bytes | str) -> list[Recent]:
    return [Recent(rid, ts, tuple(items)) for rid, ts, items in orjson.loads(raw)]


@dataclass
class State:
    """The slice of the store a batch needs (the edge loads it; tests keep one in memory)."""
    seen: set[str] = field(default_factory=set)                       # counted event ids
    impressions: dict[str, Impression] = field(default_factory=dict)  # request_id -> impression
    recent: dict[str, list[Recent]] = field(default_factory=dict)     # shopper -> exposures, by time
    units: dict[UnitKey, UnitTotals] = field(default_factory=dict)


@dataclass
class Changes:
    """What a batch changed: the writes, and counts for the worker's metrics."""
    impressions: dict[str, Impression] = field(default_factory=dict)  # new or updated
    new_impressions: set[str] = field(default_factory=set)
    recent: dict[str, list[Recent]] = field(default_factory=dict)     # shoppers whose list changed
    units: dict[UnitKey, UnitTotals] = field(default_factory=dict)    # changed units (their new totals)
    totals: dict[ArmKey, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    daily: dict[DayKey, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    seen: set[str] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, arm: ArmKey, day: str, inc: Mapping[str, float]) -> None:
        self.totals[arm].update(inc)
        self.daily[(arm[0], arm[1], day)].update(inc)


# -- the fold ------------------------------------------------------------------------------------

def record_time(r: Logged) -> float:
    return r.ts if isinstance(r, Exposure) else r.timestamp


def order(records: Iterable[Logged]) -> list[Logged]:
    """By time, exposures before events of the same timestamp; stable otherwise (arrival order)."""
    return sorted(records, key=lambda r: (record_time(r), 0 if isinstance(r, Exposure) else 1))


def is_outcome(e: Event) -> bool:
    return e.event_type != "view" or e.rec_request_id is not None


def shopper_of(e: Exposure) -> str:
    """Whose recent exposures an exposure joins: its user_id, else its unit (its Kafka key)."""
    return e.user_id or e.unit


def needed_recent(records: Iterable[Logged]) -> set[str]:
    """Shoppers whose recent exposures a batch needs: authors of outcome events without request id
    (to attribute) and shoppers of its exposures (to extend their lists)."""
    return ({r.user_id for r in records if isinstance(r, Event) and is_outcome(r) and r.rec_request_id is None}
            | {shopper_of(r) for r in records if isinstance(r, Exposure)})


def needed_impressions(records: Sequence[Logged], recent: Mapping[str, Sequence[Recent]],
                       window_s: float) -> set[str]:
    """Request ids a batch may touch: its exposures (dedupe), cited ones, and window candidates."""
    out = {r.request_id for r in records if isinstance(r, Exposure)}
    for r in records:
        if isinstance(r, Event) and is_outcome(r):
            if r.rec_request_id is not None:
                out.add(r.rec_request_id)
            else:
                out.update(x.request_id for x in recent.get(r.user_id, ())
                           if r.product_id in x.items and 0 <= r.timestamp - x.ts <= window_s)
    return out


def step(records: Sequence[Logged], state: State, window_s: float) -> Changes:
    """Fold one batch into `state` (mutated) and return the changes to write.

    `state` must hold, for this batch: the seen ids among its events, the impressions of
    `needed_impressions`, the recent lists of `needed_recent`, and the unit totals of every arm x
    unit of those impressions (absent: no totals yet)."""
    ch = Changes()
    for r in order(records):
        if isinstance(r, Exposure):
            _expose(r, state, ch, window_s)
        elif is_outcome(r):
            _event(r, state, ch, window_s)
        else:
            ch.counts["ignored"] += 1
    return ch


def _unit_change(state: State, ch: Changes, imp: Impression, day: str, change: Mapping[str, float]) -> None:
    for arm in imp.arms:
        key = (arm[0], arm[1], imp.unit)
        before = state.units.get(key, UnitTotals())
        after = replace(before, **{k: getattr(before, k) + v for k, v in change.items()})
        state.units[key] = ch.units[key] = after
        ch.add(arm, day, increments(before, after))


def _expose(e: Exposure, state: State, ch: Changes, window_s: float) -> None:
    if e.request_id in state.impressions:
        ch.counts["duplicate_exposures"] += 1
        return
    ch.counts["exposures"] += 1
    imp = Impression.of(e)
    state.impressions[e.request_id] = ch.impressions[e.request_id] = imp
    ch.new_impressions.add(e.request_id)
    day = utc_day(e.ts)
    _unit_change(state, ch, imp, day, {"impressions": 1})
    guard: dict[str, float] = {f"{LATENCY_FIELD}{latency_bucket(e.latency_ms)}": 1}
    if e.status != "ok":
        guard[e.status] = 1
    for arm in imp.arms:
        ch.add(arm, day, guard)
    entries = state.recent.get(imp.shopper, [])
    entries = sorted([*entries, Recent(e.request_id, e.ts, imp.items)], key=lambda x: x.ts)
    newest = entries[-1].ts
    entries = [x for x in entries if x.ts >= newest - 2 * window_s][-RECENT_MAX:]
    state.recent[imp.shopper] = ch.recent[imp.shopper] = entries


def _attribute(ev: Event, state: State, window_s: float) -> tuple[Impression | None, Impression | None]:
    """(impression credited, cited impression that does not list the product)."""
    if ev.rec_request_id is not None:
        imp = state.impressions.get(ev.rec_request_id)
        if imp is None:
            return None, None
        return (imp, None) if ev.product_id in imp.items else (None, imp)
    best = None
    for x in state.recent.get(ev.user_id, ()):
        if ev.product_id in x.items and 0 <= ev.timestamp - x.ts <= window_s and (best is None or x.ts >= best.ts):
            best = x
    return (state.impressions.get(best.request_id), None) if best else (None, None)


def _event(ev: Event, state: State, ch: Changes, window_s: float) -> None:
    if ev.event_id in state.seen:
        ch.counts["duplicates"] += 1
        return
    state.seen.add(ev.event_id)
    ch.seen.add(ev.event_id)
    ch.counts["events"] += 1
    day = utc_day(ev.timestamp)
    imp, cited = _attribute(ev, state, window_s)
    if imp is None:
        ch.counts["unattributed"] += 1
        ch.add((ALL_EXPERIMENT, ALL_VARIANT), day, {"unattributed": 1})
        for arm in (cited.arms if cited else ()):
            if arm != (ALL_EXPERIMENT, ALL_VARIANT):
                ch.add(arm, day, {"unattributed": 1})
        return
    ch.counts["attributed"] += 1
    flag = FLAG_OF_EVENT[ev.event_type]
    change: dict[str, float] = {}
    if not getattr(imp, flag):
        setattr(imp, flag, True)
        ch.impressions[imp.request_id] = imp
        change[flag] = 1
    if ev.event_type == "purchase":
        revenue = (ev.price or 0.0) * ev.quantity
        if revenue:
            change["revenue"] = revenue
    if change:
        _unit_change(state, ch, imp, day, change)


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
