"""The ranking features, one behaviour per row: pure inputs in, one matrix column out."""
from __future__ import annotations

import math

import numpy as np
import pytest

from recstream.features.session import FeatureConfig, UserState, apply, decode_features, features_value
from recstream.ranking import FEATURE_NAMES, Candidate, Context, ItemFields, features
from schemas import Product
from streams.online_store import item_fields
from tests.factories import event

T0 = 1_764_000_000.0          # 2025-11-24 16:00 UTC, a Monday
NAN = float("nan")


def col(X: np.ndarray, name: str) -> np.ndarray:
    return X[:, FEATURE_NAMES.index(name)]


def item(price=10.0, category="Phones", **kw) -> ItemFields:
    return ItemFields(price=price, category=category, brand="Nova", rating=4.0, seller_rating=4.5, in_stock=1.0,
                      created_at=T0 - 10 * 86_400, **kw)


def one(ctx: Context, cand: Candidate | None = None) -> dict[str, float]:
    X = features(ctx, [cand or Candidate("p1", item=item())])
    return {n: float(v) for n, v in zip(FEATURE_NAMES, X[0])}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-6)


def test_feature_names_are_many_unique_and_match_the_matrix():
    assert len(FEATURE_NAMES) >= 50 and len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    X = features(Context(now_s=T0), [Candidate("p1", item=item()), Candidate("p2")])
    assert X.shape == (2, len(FEATURE_NAMES)) and X.dtype == np.float32
    assert features(Context(now_s=T0), []).shape == (0, len(FEATURE_NAMES))


@pytest.mark.parametrize("price, median, ratio", [
    (50.0, 100.0, 0.5), (300.0, 100.0, 3.0), (50.0, None, NAN), (50.0, 0.0, NAN), (NAN, 100.0, NAN),
])
def test_price_ratio_is_item_price_over_the_users_median_purchase_price(price, median, ratio):
    f = one(Context(now_s=T0, median_price=median), Candidate("p1", item=item(price=price)))
    assert same(f["price_ratio"], ratio) and same(f["log_price_ratio"], math.log(ratio) if ratio > 0 else NAN)


@pytest.mark.parametrize("affinity, category, match", [
    ({"Phones": 0.6, "Laptops": 0.8}, "Phones", 0.6),      # L2-normalised: the weight itself
    ({"Phones": 3.0, "Laptops": 4.0}, "Phones", 0.6),      # not normalised: still the cosine
    ({"Phones": 0.6, "Laptops": 0.8}, "Cameras", 0.0),
    ({"Phones": 0.6, "Laptops": 0.8}, None, NAN),          # item category unknown
    ({}, "Phones", NAN),                                   # no offline aggregate for this user
])
def test_category_match_is_the_cosine_with_the_items_one_hot_category(affinity, category, match):
    f = one(Context(now_s=T0, category_affinity=affinity), Candidate("p1", item=item(category=category)))
    assert same(f["category_match"], match)


def _events(*rows) -> UserState:
    state = UserState()
    for i, (kind, pid, cat, dt) in enumerate(rows):
        e = event(i, user="u", session="s", pid=pid, kind=kind, ts=T0 + dt, category=cat)
        state = apply(state, e, FeatureConfig()).state
    return state


SESSION = _events(("view", "a", "Phones", 0), ("view", "b", "Phones", 10), ("view", "c", "Laptops", 20),
                  ("add_to_cart", "b", "Phones", 30), ("purchase", "z", "Chargers", 40), ("view", "d", "Phones", 50))


@pytest.mark.parametrize("pid, category, expected", [
    ("d", "Phones", dict(session_category_views=3, session_category_share=0.75, is_last_viewed=1, recent_position=0,
                         in_recent=1, in_cart=0, purchased_before=0, is_session_main_category=1)),
    ("b", "Phones", dict(session_category_views=3, is_last_viewed=0, recent_position=2, in_cart=1)),
    ("c", "Laptops", dict(session_category_views=1, session_category_share=0.25, recent_position=1,
                          is_session_main_category=0)),
    ("z", "Chargers", dict(session_category_views=0, in_recent=0, recent_position=NAN, purchased_before=1)),
    ("q", None, dict(session_category_views=NAN, is_session_main_category=0)),
])
@pytest.mark.parametrize("served", ["state", "redis"])
def test_session_features(pid, category, expected, served):
    if served == "state":
        ctx = Context(now_s=T0 + 60, session=SESSION)
    else:
        ctx = Context(now_s=T0 + 60, session=decode_features(features_value(SESSION)), recent=list(SESSION.recent))
    f = one(ctx, Candidate(pid, item=item(category=category)))
    assert f["session_live"] == 1 and f["session_views"] == 4 and f["cart_size"] == 1 and f["purchases_count"] == 1
    for name, value in expected.items():
        assert same(f[name], value), name


@pytest.mark.parametrize("served", ["state", "redis"])
def test_an_idle_session_is_forgotten_but_the_cart_is_not(served):
    later = T0 + 50 + 1801    # past the idle timeout: Redis has expired user_session
    ctx = (Context(now_s=later, session=SESSION) if served == "state"
           else Context(now_s=later, session=decode_features(features_value(SESSION)), recent=None))
    f = one(ctx, Candidate("b", item=item()))
    assert f["session_live"] == 0 and f["session_views"] == 0 and f["in_recent"] == 0 and f["in_cart"] == 1


@pytest.mark.parametrize("offset_h, hour_sin, hour_cos", [(0, 0.0, 1.0), (6, 1.0, 0.0), (12, 0.0, -1.0),
                                                         (18, -1.0, 0.0)])
def test_time_of_day_is_cyclical(offset_h, hour_sin, hour_cos):
    midnight = T0 - T0 % 86_400
    f = one(Context(now_s=midnight + offset_h * 3600))
    assert f["hour_sin"] == pytest.approx(hour_sin, abs=1e-6) and f["hour_cos"] == pytest.approx(hour_cos, abs=1e-6)


@pytest.mark.parametrize("day, dow", [(0, 3), (4, 0), (10, 6)])   # 1970-01-01 a Thursday; Monday = 0
def test_day_of_week_is_cyclical(day, dow):
    f = one(Context(now_s=day * 86_400 + 3600.0))
    assert f["dow_sin"] == pytest.approx(math.sin(2 * math.pi * dow / 7), abs=1e-6)
    assert f["dow_cos"] == pytest.approx(math.cos(2 * math.pi * dow / 7), abs=1e-6)


@pytest.mark.parametrize("device, page, hot", [
    ("mobile", "product", ("device_mobile", "page_product")), ("watch", "wishlist", ("device_unknown", "page_other")),
])
def test_device_and_page_are_one_hot(device, page, hot):
    f = one(Context(now_s=T0, device=device, page=page))
    on = {n for n, v in f.items() if n.startswith(("device_", "page_")) and v == 1}
    assert on == set(hot)


def test_missing_user_embedding_gives_nan_dot_and_known_ones_the_dot_and_cosine():
    cands = [Candidate("p1", embedding=np.array([1, 0], np.float32)),
             Candidate("p2", embedding=np.array([3, 4], np.float32)), Candidate("p3")]
    X = features(Context(now_s=T0), cands)
    assert np.isnan(col(X, "ui_dot")).all() and np.isnan(col(X, "ui_cosine")).all()
    X = features(Context(now_s=T0, user_embedding=np.array([0, 2], np.float32)), cands)
    assert np.array_equal(col(X, "ui_dot"), [0, 8, NAN], equal_nan=True)
    assert np.allclose(col(X, "ui_cosine"), [0, 0.8, NAN], equal_nan=True)
    assert np.array_equal(col(X, "ui_dot_rank_pct"), [1, 0, NAN], equal_nan=True)
    assert np.array_equal(col(X, "ui_dot_gap_to_best"), [-8, 0, NAN], equal_nan=True)


def test_popularity_is_log_scaled_and_sources_are_flags_scores_and_a_count():
    cands = [Candidate("p1", popularity_7d=99.0, sources={"als": 0.9, "covis": 0.2, "no_such_source": 1.0}),
             Candidate("p2", popularity_7d=0.0, sources={"popular": 12.0})]
    X = features(Context(now_s=T0), cands)
    assert np.allclose(col(X, "log_popularity_7d"), [math.log(100), 0])
    assert list(col(X, "source_als")) == [1, 0] and list(col(X, "n_sources")) == [2, 1]
    assert np.allclose(col(X, "score_covis"), [0.2, NAN], equal_nan=True)


@pytest.mark.parametrize("rating", [4.3, None])
def test_item_fields_read_back_from_redis_strings_equal_the_products(rating):
    p = Product(product_id="p1", title="t", category_path=("Electronics", "Phones"), price=199.99, rating=rating,
                seller_rating=None, created_at=T0 - 1234.5678, in_stock=False)
    raw = {k.encode(): v.encode() for k, v in item_fields(p).items()}
    online, offline = ItemFields.from_redis(raw), ItemFields.from_product(p)
    assert all(same(getattr(online, a), getattr(offline, a)) for a in ("price", "rating", "seller_rating",
                                                                       "in_stock", "created_at"))
    assert (online.category, online.brand) == (offline.category, offline.brand)
