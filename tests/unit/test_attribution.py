"""Attribution rules and incremental A/B aggregates (pure core)."""
import math
import random
from collections import Counter

import numpy as np
import pytest

from recstream.experiments.attribution import (
    ALL_EXPERIMENT,
    ALL_VARIANT,
    Impression,
    Recent,
    State,
    UnitTotals,
    VariantTotals,
    increments,
    latency_bucket,
    needed_impressions,
    needed_recent,
    order,
    recent_from_json,
    recent_to_json,
    step,
    totals_from_units,
)
from recstream.experiments.stats import user_level, user_level_moments
from recstream.stats import BUCKETS, LatencyHistogram
from schemas import Event, Exposure
from tests import factories
from tests.factories import bind

T0 = 1_764_000_000.0
WINDOW = 1800
ALL = (ALL_EXPERIMENT, ALL_VARIANT)


exposure = bind(factories.exposure, "rid", "user", "ts", "items", "experiments", "status", "latency_ms", ts=T0,
                session_id="s1", latency_ms=20.0)
event = bind(factories.event, "i", "kind", "user", "product", "ts", kind="click", product="p1", ts=T0 + 10)


def run(records, state=None, window=WINDOW):
    state = state or State()
    return state, step(records, state, window)


def totals(ch, arm=("exp", "A")) -> VariantTotals:
    return VariantTotals.from_fields(ch.totals[arm])


def test_click_with_request_id_on_a_listed_product_counts_for_every_arm():
    _, ch = run([exposure("r1", experiments={"exp": "A", "other": "B"}), event("e1", rid="r1")])
    for arm in (("exp", "A"), ("other", "B"), ALL):
        t = totals(ch, arm)
        assert (t.units, t.impressions, t.clicked, t.units_clicked) == (1, 1, 1, 1)
        assert t.moments("ctr") == (1, 1, 1, 1, 1, 1)
    assert ch.counts["attributed"] == 1 and ch.impressions["r1"].clicked


def test_view_with_request_id_is_a_click_and_a_plain_view_is_ignored():
    _, ch = run([exposure("r1"), event("e1", kind="view", rid="r1"), event("e2", kind="view", product="p2")])
    t = totals(ch, ALL)
    assert t.clicked == 1 and t.unattributed == 0
    assert ch.counts["ignored"] == 1


def test_request_id_citing_an_unlisted_product_or_an_unknown_request_is_unattributed():
    _, ch = run([exposure("r1", experiments={"exp": "A"}), event("e1", product="p9", rid="r1"),
                 event("e2", rid="nope")])
    assert totals(ch, ALL).unattributed == 2 and totals(ch, ALL).clicked == 0
    assert totals(ch).unattributed == 1          # the one citing an impression of exp/A
    assert ch.counts["unattributed"] == 2


def test_request_id_event_does_not_fall_back_to_the_window():
    # r2 lists p9 within the window, but e1 cites r1 (which does not list it): no fallback
    _, ch = run([exposure("r1"), exposure("r2", items=("p9",)), event("e1", product="p9", rid="r1")])
    assert totals(ch, ALL).clicked == 0


def test_window_attribution_in_and_out_and_latest_listing_exposure_wins():
    records = [exposure("r1", ts=T0, items=("p1",)), exposure("r2", ts=T0 + 100, items=("p1", "p2")),
               exposure("r3", ts=T0 + 200, items=("p3",)),
               event("e1", product="p1", ts=T0 + 300),                       # latest listing p1: r2
               event("e2", kind="add_to_cart", product="p1", ts=T0 + 100 + WINDOW),   # exactly at the edge: in
               event("e3", kind="purchase", product="p1", ts=T0 + 101 + WINDOW, price=5.0),  # out
               event("e4", product="p1", ts=T0 - 1),                         # before any exposure
               event("e5", product="p1", user="u2", ts=T0 + 300)]            # another shopper
    state, ch = run(records)
    assert state.impressions["r2"].clicked and state.impressions["r2"].carted
    assert not state.impressions["r1"].clicked and not state.impressions["r2"].bought
    t = totals(ch, ALL)
    assert (t.impressions, t.clicked, t.carted, t.bought, t.revenue, t.unattributed) == (3, 1, 1, 0, 0.0, 3)


def test_exposure_before_event_of_the_same_timestamp_whatever_the_arrival_order():
    records = [event("e1", ts=T0), exposure("r1", ts=T0)]
    assert [type(r).__name__ for r in order(records)] == ["Exposure", "Event"]
    _, ch = run(records)
    assert totals(ch, ALL).clicked == 1


def test_duplicate_events_and_exposures_count_once_across_batches():
    state, ch = run([exposure("r1"), event("e1", kind="purchase", rid="r1", price=10.0, quantity=2),
                     event("e1", kind="purchase", rid="r1", price=10.0, quantity=2)])
    _, ch2 = run([exposure("r1"), event("e1", kind="purchase", rid="r1", price=10.0, quantity=2)], state)
    assert totals(ch, ALL).revenue == 20.0 and totals(ch, ALL).bought == 1
    assert ch.counts["duplicates"] == 1 and ch2.counts["duplicates"] == 1 and ch2.counts["duplicate_exposures"] == 1
    assert not ch2.totals


def test_revenue_sums_purchases_flags_count_once_and_missing_price_counts_zero():
    records = [exposure("r1", experiments={"exp": "A"}, items=("p1", "p2")),
               event("e1", kind="purchase", rid="r1", price=10.0, quantity=3),
               event("e2", kind="purchase", product="p2", rid="r1", price=2.5),
               event("e3", kind="click", rid="r1"), event("e4", kind="click", product="p2", rid="r1"),
               exposure("r2", experiments={"exp": "A"}, ts=T0 + 1, items=("p7",)),
               event("e5", kind="purchase", product="p7", rid="r2")]           # no price: bought, 0 revenue
    _, ch = run(records)
    t = totals(ch)
    assert (t.units, t.impressions, t.clicked, t.bought, t.revenue) == (1, 2, 1, 2, 32.5)
    assert (t.sum_x2, t.sum_bought2, t.sum_x_bought, t.sum_revenue2, t.sum_x_revenue) == (4, 4, 4, 32.5 ** 2, 65.0)
    assert t.rates()["revenue_per_impression"] == 16.25 and t.rates()["conversion_rate"] == 1.0
    assert ch.units[("exp", "A", "u:u1")] == UnitTotals(2, 1, 0, 2, 32.5)


def test_guardrails_and_latency_histogram():
    records = [exposure(f"r{i}", ts=T0 + i, status=s, latency_ms=ms, experiments={"exp": "A"})
               for i, (s, ms) in enumerate([("ok", 10), ("ok", 30), ("cached", 1), ("fallback_deadline", 250),
                                            ("fallback_error", 5)])]
    _, ch = run(records)
    t = totals(ch)
    assert (t.cached, t.fallback_deadline, t.fallback_error) == (1, 1, 1)
    r = t.rates()
    assert r["fallback_rate"] == pytest.approx(0.4) and r["error_rate"] == pytest.approx(0.2)
    h = LatencyHistogram()
    h.extend(np.array([10, 30, 1, 250, 5]) / 1000)
    assert list(t.latency) == h.counts.tolist() and len(t.latency) == BUCKETS
    assert r["p99_latency_ms"] == h.percentiles_ms((99,))["p99"]
    assert math.isnan(VariantTotals().rates()["ctr"])


@pytest.mark.parametrize("ms", [0.0, 0.05, 0.1, 1.0, 7.3, 100.0, 5e3, 1e9])
def test_latency_bucket_matches_the_histogram(ms):
    h = LatencyHistogram()
    h.add(ms / 1000)
    assert latency_bucket(ms) == int(np.argmax(h.counts))


def test_daily_buckets_use_the_exposure_and_event_days_and_sum_to_the_totals():
    day = 86400
    records = [exposure("r1", ts=T0, experiments={"exp": "A"}), event("e1", rid="r1", ts=T0 + 2 * day)]
    _, ch = run(records, window=10 * day)
    days = {k[2]: VariantTotals.from_fields(v) for k, v in ch.daily.items() if k[:2] == ("exp", "A")}
    assert sorted(days) == ["2025-11-24", "2025-11-26"]
    assert days["2025-11-24"].impressions == 1 and days["2025-11-26"].clicked == 1
    assert days["2025-11-24"] + days["2025-11-26"] == totals(ch)


def test_increments_of_one_unit():
    inc = increments(UnitTotals(2, 1, 0, 0, 0.0), UnitTotals(3, 1, 1, 0, 4.0))
    assert inc == {"impressions": 1, "sum_x2": 5, "sum_x_clicked": 1, "carted": 1, "sum_carted2": 1,
                   "sum_x_carted": 3, "units_carted": 1, "revenue": 4.0, "sum_revenue2": 16.0, "sum_x_revenue": 12.0}
    assert increments(UnitTotals(), UnitTotals(1))["units"] == 1


def test_serialisations_round_trip():
    imp = Impression.of(exposure("r1", experiments={"b": "x", "a": "y"}))
    imp.clicked = True
    back = Impression.from_json("r1", imp.to_json())
    assert back == imp and back.arms == (("a", "y"), ("b", "x"), ALL)
    rec = [Recent("r1", T0, ("p1",)), Recent("r2", T0 + 1, ())]
    assert recent_from_json(recent_to_json(rec)) == rec
    u = UnitTotals(3, 1, 1, 0, 2.5)
    assert UnitTotals.from_fields({k.encode(): v.encode() for k, v in u.to_fields().items()}) == u
    t = VariantTotals(units=2, revenue=1.5, latency=(0, 3) + (0,) * (BUCKETS - 2))
    assert VariantTotals.from_fields(t.to_fields()) == t


# -- property: incremental aggregates equal aggregates from the final unit totals ----------------

def random_records(rng: random.Random, n_users=6, n_products=8, n=120):
    products = [f"p{i}" for i in range(n_products)]
    records, rids, eids = [], [], []
    t = T0
    for i in range(n):
        t += rng.choice([1, 30, 400, 2000])  # strictly later: batches split no ties
        user = f"u{rng.randrange(n_users)}"
        if rng.random() < 0.35:
            exps = rng.choice([None, {"exp": rng.choice("AB")}, {"exp": rng.choice("AB"), "e2": rng.choice("xy")}])
            status = rng.choice(["ok", "ok", "cached", "fallback_deadline", "fallback_error"])
            rid = f"r{i}"
            rids.append(rid)
            records.append(exposure(rid, user=user, ts=t, items=rng.sample(products, 3), experiments=exps,
                                    status=status, latency_ms=rng.expovariate(1 / 50)))
        else:
            eid = rng.choice(eids) if eids and rng.random() < 0.1 else f"e{i}"   # some duplicates
            eids.append(eid)
            rid = rng.choice(rids + [None, None, "unknown"]) if rids else None
            records.append(event(eid, kind=rng.choice(["view", "click", "add_to_cart", "purchase"]), user=user,
                                 product=rng.choice(products), ts=t, rid=rid,
                                 price=rng.choice([None, 9.99, 25.0]), quantity=rng.randint(1, 3)))
    return records


def _sum(counters):
    out = Counter()
    for c in counters:
        out.update(c)
    return out


@pytest.mark.parametrize("seed", range(25))
def test_incremental_moments_equal_moments_from_the_final_unit_totals(seed):
    rng = random.Random(seed)
    records = random_records(rng)
    state, changes = State(), []
    i = 0
    while i < len(records):          # arbitrary batches, one state carried along (as the store does)
        size = rng.randint(1, 15)
        changes.append(step(records[i:i + size], state, WINDOW))
        i += size
    arms = {a for ch in changes for a in ch.totals}
    incremental = {a: VariantTotals.from_fields(_sum(ch.totals[a] for ch in changes if a in ch.totals)) for a in arms}
    scratch = totals_from_units(state.units)
    unit_fields = ["units", "impressions", "clicked", "carted", "bought", "units_clicked", "units_carted",
                   "units_bought", "sum_x2", "sum_clicked2", "sum_x_clicked", "sum_carted2", "sum_x_carted",
                   "sum_bought2", "sum_x_bought"]
    assert set(scratch) <= arms
    for arm in arms:
        inc, ref = incremental[arm], scratch.get(arm, VariantTotals())
        assert {f: getattr(inc, f) for f in unit_fields} == {f: getattr(ref, f) for f in unit_fields}
        for f in ("revenue", "sum_revenue2", "sum_x_revenue"):
            assert getattr(inc, f) == pytest.approx(getattr(ref, f), rel=1e-9, abs=1e-9)
    # ... and one batch gives what many batches give
    whole = step(records, State(), WINDOW)
    for arm in arms:
        assert VariantTotals.from_fields(whole.totals[arm]).to_fields() == pytest.approx(incremental[arm].to_fields())
    # ... and the daily buckets add up to the totals
    for arm in arms:
        days = _sum(c for ch in changes for k, c in ch.daily.items() if k[:2] == arm)
        assert VariantTotals.from_fields(days).to_fields() == pytest.approx(incremental[arm].to_fields())


@pytest.mark.parametrize("seed", range(5))
def test_a_store_loaded_slice_gives_the_same_result_as_the_full_state(seed):
    """What the worker does: per batch, load only the needed slice of the store, fold, write back."""
    rng = random.Random(100 + seed)
    records = random_records(rng)
    full, store = State(), State()
    i = 0
    while i < len(records):
        batch = records[i:i + rng.randint(1, 15)]
        i += len(batch)
        ref = step(batch, full, WINDOW)
        users = needed_recent(batch)
        recent = {u: list(store.recent[u]) for u in users if u in store.recent}
        rids = needed_impressions(batch, recent, WINDOW)
        imps = {r: Impression.from_json(r, store.impressions[r].to_json()) for r in rids if r in store.impressions}
        keys = {(e, v, imp.unit) for imp in imps.values() for e, v in imp.arms}
        keys |= {(e, v, x.unit) for x in batch if isinstance(x, Exposure) for e, v in Impression.of(x).arms}
        sl = State(seen={x.event_id for x in batch if isinstance(x, Event)} & store.seen, impressions=imps,
                   recent=recent, units={k: store.units[k] for k in keys if k in store.units})
        ch = step(batch, sl, WINDOW)
        assert ch.totals == ref.totals and ch.daily == ref.daily
        store.seen |= ch.seen
        store.impressions.update({r: Impression.from_json(r, v.to_json()) for r, v in ch.impressions.items()})
        store.recent.update(ch.recent)
        store.units.update(ch.units)
    assert store.units == full.units and store.recent == full.recent and store.seen == full.seen


def test_user_level_moments_from_variant_totals_equal_the_array_test():
    rng = random.Random(5)
    state = State()
    records = [exposure(f"r{u}-{k}", user=f"u{u}", ts=T0 + k, experiments={"exp": "AB"[u % 2]})
               for u in range(40) for k in range(1 + u % 4)]
    records += [event(f"e{u}-{k}", user=f"u{u}", rid=f"r{u}-{k}", ts=T0 + 50)
                for u in range(40) for k in range(1 + u % 4) if rng.random() < 0.4]
    ch = step(records, state, WINDOW)
    a, b = totals(ch, ("exp", "A")), totals(ch, ("exp", "B"))
    per = {arm: ([], []) for arm in "AB"}
    for (e, v, _), u in state.units.items():
        if e == "exp":
            per[v][0].append(u.clicked)
            per[v][1].append(u.impressions)
    ref = user_level(tuple(map(np.array, per["A"])), tuple(map(np.array, per["B"])))
    got = user_level_moments(a.moments("ctr"), b.moments("ctr"))
    assert got.p_value == pytest.approx(ref.p_value, rel=1e-9) and got.diff == pytest.approx(ref.diff, rel=1e-12)


def test_exposures_watermark_holds_events_until_exposures_are_read():
    from streams.attribution import watermark

    assert watermark([]) == math.inf
    assert watermark([(5, 5, T0), (0, 0, None)]) == math.inf                  # all read to the end
    assert watermark([(3, 5, T0), (2, 9, T0 + 50), (7, 7, T0 - 99)]) == T0    # slowest partition not at its end
    assert watermark([(0, None, None)]) == -math.inf                          # nothing fetched yet: wait
