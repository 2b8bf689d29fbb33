"""The Spark batch job on real Spark (local[2]): the generated shop's known structure, bad windows, Taobao."""
import dataclasses
import os
from collections import Counter, defaultdict
from datetime import UTC, datetime
from itertools import combinations

import numpy as np
import pytest

from batch.job import TrainingDataError, build, events_to_parquet, load_events
from batch.spark import session
from models.artifacts import BatchOutputs
from recstream.data import ShopConfig, generate, import_events
from recstream.data.shop import COMPLEMENTS, TOP_CATEGORIES
from recstream.settings import Settings
from schemas import Event
from streams.archive import write_batch

pytestmark = pytest.mark.integration

SHOP = ShopConfig(users=150, products=300, seed=5, end_s=1_764_000_000.0)
TOP_OF = {leaf: top for top, leaves in TOP_CATEGORIES.items() for leaf in leaves}


@pytest.fixture(scope="session")
def settings() -> Settings:
    """Defaults, not the environment (a cluster master there must not leak in); small ALS for speed."""
    return dataclasses.replace(Settings(), spark_master="local[2]", spark_driver_memory="2g",
                               als_rank=16, als_iterations=5)


@pytest.fixture(scope="session")
def spark(settings):
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark = session(settings)
    yield spark
    spark.stop()


@pytest.fixture(scope="module")
def shop():
    return generate(SHOP)


def with_duplicates(events: list[Event]) -> tuple[dict[int, list], int]:
    """The events as archive partition 0, and repeats (as after a redelivery) as partition 1."""
    repeats = [e for i, e in enumerate(events) if i % 9 == 0] + [e for i, e in enumerate(events) if i % 45 == 0]
    rows = {0: list(enumerate(events)), 1: list(enumerate(repeats))}
    return rows, len(repeats)


@pytest.fixture(scope="module")
def shop_run(spark, settings, shop, tmp_path_factory):
    """One build on the shop archived as hourly Parquet (streams.archive's layout) with repeats injected."""
    root = tmp_path_factory.mktemp("archive")
    rows, injected = with_duplicates(shop.events)
    write_batch(root, rows)
    lines: list[str] = []
    outputs = build(spark, load_events(spark, root), settings, progress=lines.append)
    return outputs, injected, lines


def test_shop_window_dedupe_embeddings_and_round_trip(shop_run, shop, settings, tmp_path):
    out, injected, lines = shop_run
    w = out.window
    assert w.duplicates == injected > 0
    assert w.events == len(shop.events)
    assert w.end_s == shop.events[-1].timestamp
    assert w.start_s == w.end_s - settings.train_window_days * 86_400
    assert w.users == len({e.user_id for e in shop.events})
    assert w.purchases == sum(e.event_type == "purchase" for e in shop.events)
    assert out.user_embeddings.rank == out.item_embeddings.rank == settings.als_rank
    assert set(out.user_embeddings.ids) == {e.user_id for e in shop.events}
    assert len(out.item_embeddings.ids) == w.items
    purchased = {e.product_id for e in shop.events if e.event_type == "purchase"}
    assert purchased <= set(out.item_embeddings.ids)
    assert np.isfinite(out.item_embeddings.vectors).all() and np.abs(out.item_embeddings.vectors).sum() > 0
    assert {"load_s", "als_s", "cooccurrence_s", "aggregates_s"} <= set(out.metrics)
    assert [line.split(":")[0] for line in lines[:4]] == ["batch load", "batch als", "batch cooccurrence",
                                                         "batch aggregates"]
    assert out.warnings == []  # every shop event has a category, every user several events
    out.save(tmp_path / "outputs")
    again = BatchOutputs.load(tmp_path / "outputs")
    assert again.window == w and again.cobuy == out.cobuy and again.item_embeddings.ids == out.item_embeddings.ids


def test_shop_cobuy_finds_complements(shop_run, shop):
    """Where the job's top co-purchase neighbour of an item in a leaf with a complement (phone -> charger)
    rests on two or more shared sessions, it lies in the complement leaf for a clear majority. (Over all
    items it is about half: at 150 shoppers most pairs are one-offs, and same-category items carted in
    one session are co-bought too.)"""
    out = shop_run[0]
    leaf = {p.product_id: p.category for p in shop.products}
    baskets = defaultdict(set)
    for e in shop.events:
        if e.event_type == "purchase":
            baskets[e.user_id, e.session_id].add(e.product_id)
    shared = Counter(frozenset(pair) for basket in baskets.values() for pair in combinations(basket, 2))
    tops = {a: ns[0][0] for a, ns in out.cobuy.items() if leaf[a] in COMPLEMENTS}
    assert len(tops) >= 30
    backed = {a: b for a, b in tops.items() if shared[frozenset((a, b))] >= 2}
    in_complement = sum(leaf[b] == COMPLEMENTS[leaf[a]] for a, b in backed.items())
    assert len(backed) >= 10 and in_complement >= 0.75 * len(backed), (in_complement, len(backed))
    for ns in out.cobuy.values():
        scores = [score for _, score in ns]
        assert scores == sorted(scores, reverse=True) and all(0 < x <= 1 for x in scores)


def test_shop_category_affinity_follows_taste(shop_run, shop):
    out = shop_run[0]
    assert set(out.category_affinity) == set(shop.user_taste)
    for aff in out.category_affinity.values():
        assert sum(a * a for a in aff.values()) == pytest.approx(1.0)
    strong = [u for u, taste in shop.user_taste.items() if max(taste.values()) >= 0.6]
    hits = 0
    for user in strong:
        by_top = Counter()
        for leaf, a in out.category_affinity[user].items():
            by_top[TOP_OF[leaf]] += a
        taste = shop.user_taste[user]
        hits += by_top.most_common(1)[0][0] == max(taste, key=taste.get)
    assert len(strong) >= 40 and hits >= 0.8 * len(strong), (hits, len(strong))
    assert out.item_category == {p.product_id: p.category for p in shop.products if p.product_id in out.item_category}
    assert set(out.item_category) == set(out.item_embeddings.ids)


def test_shop_popularity_and_median_price(shop_run, shop, settings):
    out = shop_run[0]
    weights = settings.event_weights
    expected = Counter()
    for e in shop.events:  # popularity counts the whole training window, which holds the shop
        expected[e.product_id] += weights[e.event_type]
    assert out.item_popularity == pytest.approx(dict(expected))
    prices = defaultdict(list)
    for e in shop.events:
        if e.event_type == "purchase":
            prices[e.user_id].append(e.price)
    assert out.user_median_price == pytest.approx({u: float(np.median(p)) for u, p in prices.items()})


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def test_empty_window_and_missing_input_raise_clear_errors(spark, settings, shop, tmp_path):
    path = events_to_parquet(shop.events, tmp_path / "shop.parquet")
    end = SHOP.end_s - 400 * 86_400
    start = end - settings.train_window_days * 86_400
    message = (f"no events in the training window {utc(start)} .. {utc(end)} (30 days back from the given end): "
               f"{len(shop.events):,} rows read, 0 invalid, valid events from {utc(shop.events[0].timestamp)}")
    with pytest.raises(TrainingDataError) as info:
        build(spark, load_events(spark, path), settings, end_s=end, progress=lambda _: None)
    assert str(info.value).startswith(message)
    with pytest.raises(TrainingDataError, match="no such file or folder"):
        load_events(spark, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingDataError, match="no events to train on: 0 rows read"):
        build(spark, load_events(spark, tmp_path / "empty"), settings, progress=lambda _: None)


def test_no_purchases_single_event_users_and_uncategorised_items(spark, settings, tmp_path):
    small = generate(ShopConfig(users=40, products=120, seed=5, end_s=SHOP.end_s))
    events = [e for e in small.events if e.event_type != "purchase"]
    lonely = Event(event_id="lonely-1", user_id="lonely", session_id="x", product_id="no-category",
                   event_type="view", timestamp=events[-1].timestamp - 60)
    path = events_to_parquet([*events, lonely], tmp_path / "no-purchases.parquet")
    out = build(spark, load_events(spark, path), settings, progress=lambda _: None)
    assert out.window.purchases == 0 and out.cobuy == {} and out.user_median_price == {}
    assert out.knn and "lonely" in out.user_embeddings.ids and "no-category" in out.item_embeddings.ids
    assert "no-category" not in out.item_category and out.category_affinity.get("lonely") is None
    assert "no purchases in the window: cobuy (frequently bought together) is empty" in out.warnings
    assert any(w.startswith(f"1 of {out.window.items:,} items have no category") for w in out.warnings)
    assert any(w.startswith(f"1 of {out.window.users:,} users have a single event") for w in out.warnings)


def test_item_knn_is_cosine_over_sessions_with_shrinkage(spark, settings, tmp_path):
    """c_ab / (sqrt(c_a c_b) + shrink) over distinct sessions: a pair of rare items seen together once
    tops a's list without shrinkage and falls behind a pair seen in three sessions with it."""
    def session(user: str, items: str) -> list[Event]:
        return [Event(event_id=f"{user}-{p}", user_id=user, session_id="s", product_id=p, event_type="view",
                      timestamp=SHOP.end_s - 3600 + i) for i, p in enumerate(items.split())]
    events = session("u0", "a rare") + [e for i in range(1, 4) for e in session(f"u{i}", "a often")]
    events += [e for i in range(4, 17) for e in session(f"u{i}", "often")]        # c_a 4, c_rare 1, c_often 16
    path = events_to_parquet(events, tmp_path / "knn.parquet")
    for shrink, order in ((0.0, ["rare", "often"]), (10.0, ["often", "rare"])):
        out = build(spark, load_events(spark, path), dataclasses.replace(settings, knn_shrink=shrink),
                    progress=lambda _: None)
        got = dict(out.knn["a"])
        assert got == pytest.approx({"rare": 1 / (np.sqrt(4 * 1) + shrink), "often": 3 / (np.sqrt(4 * 16) + shrink)})
        assert [b for b, _ in out.knn["a"]] == order


def test_taobao_head(spark, settings, shared_data, tmp_path):
    """The real Taobao head file: 84,287 events of 814 users. The window is 90 days so that every row
    is in it: the oldest outlier goes back to 2017-09-11 (its SOURCE.md); 30 days would leave out one."""
    data = import_events("taobao", shared_data / "taobao-userbehavior-head" / "UserBehavior_head.csv")
    assert not data.errors
    path = events_to_parquet(data.events, tmp_path / "taobao.parquet")
    lines: list[str] = []
    out = build(spark, load_events(spark, path), dataclasses.replace(settings, train_window_days=90),
                progress=lines.append)
    w = out.window
    assert (w.events, w.duplicates, w.users, w.items, w.purchases) == (84_287, 0, 814, 55_233, 1_749)
    assert len(out.user_embeddings.ids) == 814 and len(out.item_embeddings.ids) == 55_233
    assert len(out.item_category) == 55_233 and len(out.category_affinity) == 814
    assert out.cobuy and out.knn and out.user_median_price == {}
    assert "no purchase carries a price: user_median_price is empty" in out.warnings
    print("\n".join(lines))
