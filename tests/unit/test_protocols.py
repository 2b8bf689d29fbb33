"""Evaluation protocols: leak-free splits, query construction, seeded determinism, and the real datasets."""
from pathlib import Path

import pytest

from recstream.evaluation.protocols import (
    PROTOCOLS,
    catalogue_from_events,
    fbt,
    homepage,
    make_split,
    movielens,
    new_items,
    session,
    session_from_parts,
)
from recstream.settings import load
from schemas import Event, Product
from tests.factories import bind, event

DAY = 86_400.0
D0 = 1_699_920_000.0   # 2023-11-14 00:00 UTC
H = 3_600.0
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


ev = bind(event, "user", "item", "t", "kind", "session", eid=lambda f: f"{f['user_id']}-{f['product_id']}-{f['timestamp']}",
          session=lambda f: f"{f['user_id']}-s")


def assert_leak_free(split):
    """Every training event is before every query (temporal protocols)."""
    assert split.train and split.queries
    assert max(e.timestamp for e in split.train) < min(q.now_s for q in split.queries)


def assert_well_formed(split):
    assert [q.qid for q in split.queries] == list(range(len(split.queries)))
    assert [q.now_s for q in split.queries] == sorted(q.now_s for q in split.queries)
    assert [e.timestamp for e in split.train] == sorted(e.timestamp for e in split.train)
    for q in split.queries:
        assert q.targets and not (q.targets & q.exclude)
        assert q.new_targets <= q.targets


# -- homepage ------------------------------------------------------------------------------------

def clickstream():
    """Three days; u1 and u2 active on the last day, u3 only before it, u4 only on it; an old outlier."""
    return [ev("u1", "old", D0 - 80 * DAY),
            ev("u1", "a", D0 + 1 * H, "purchase"), ev("u1", "b", D0 + 2 * H), ev("u1", "c", D0 + DAY + H),
            ev("u1", "b", D0 + DAY + 2 * H),
            ev("u2", "a", D0 + DAY + 3 * H), ev("u3", "c", D0 + 5 * H),
            ev("u1", "a", D0 + 2 * DAY + H), ev("u1", "d", D0 + 2 * DAY + 2 * H), ev("u1", "b", D0 + 2 * DAY + 3 * H),
            ev("u2", "e", D0 + 2 * DAY + 4 * H), ev("u4", "a", D0 + 2 * DAY + 5 * H),
            ev("u2", "f", D0 + 3 * DAY - 1)]


def test_homepage_cuts_at_the_last_midnight_and_builds_one_query_per_user():
    split = homepage(clickstream())
    assert_leak_free(split)
    assert_well_formed(split)
    cutoff = D0 + 2 * DAY
    assert {q.now_s for q in split.queries} == {cutoff}
    assert all(e.timestamp < cutoff for e in split.train) and len(split.train) == 7
    q1, q2 = sorted(split.queries, key=lambda q: q.user_id)
    assert [q.user_id for q in split.queries] == ["u1", "u2"]   # u3: no test day, u4: no training
    assert q1.exclude == {"a"}                       # purchased in training
    assert q1.targets == {"d", "b"}                  # "a" is excluded, so it cannot be a target
    assert q1.new_targets == {"d"}
    assert q1.history == ("old", "a", "c", "b")      # distinct, oldest first, an item at its latest touch
    assert q2.targets == {"e", "f"} and q2.exclude == frozenset()
    assert (split.ks, split.primary, split.seed) == ((8, 20, 50), "recall@20", 20261125)


def test_homepage_history_keeps_the_last_20_distinct_items():
    events = [ev("u", f"i{n}", D0 - 100 + n) for n in range(30)] + [ev("u", "x", D0 + DAY - 1)]
    (q,) = homepage(events).queries
    assert q.history == tuple(f"i{n}" for n in range(10, 30))


def test_homepage_aligns_days_to_local_time():
    # China time: the data ends at 23:59 UTC+8 = 15:59 UTC, the test day starts at 16:00 UTC the day before
    end = D0 + 16 * H - 1
    events = [ev("u", "a", end - 2 * DAY), ev("u", "b", end - 3 * H), ev("u", "c", end)]
    split = homepage(events, utc_offset_h=8)
    assert split.queries[0].now_s == D0 - 8 * H
    assert "2023-11-14T00:00:00+08:00" in split.notes[0]


def test_homepage_validation_is_the_day_before_and_never_reads_the_test_day():
    split = homepage(clickstream(), validation=True)
    assert_leak_free(split)
    cutoff = D0 + DAY
    assert {q.now_s for q in split.queries} == {cutoff}
    assert all(e.timestamp < cutoff for e in split.train)
    (q,) = split.queries
    assert q.user_id == "u1" and q.targets == {"c", "b"}          # nothing of the test day (d, e, f)


# -- session -------------------------------------------------------------------------------------

def sessions():
    return [ev("a", "x", D0 + H, session="s1"), ev("a", "y", D0 + 2 * H, session="s1"),
            ev("b", "z", D0 + 3 * H, session="s2"),
            ev("c", "w", D0 + DAY - 60, session="s3"), ev("c", "x", D0 + DAY + 60, session="s3"),  # straddles
            ev("d", "x", D0 + DAY + H, session="s4"), ev("d", "new", D0 + DAY + H + 1, session="s4"),
            ev("d", "y", D0 + DAY + H + 2, session="s4"), ev("d", "x", D0 + DAY + H + 3, session="s4"),
            ev("e", "y", D0 + DAY + 2 * H, session="s5"), ev("e", "new", D0 + DAY + 2 * H + 1, session="s5"),
            ev("f", "z", D0 + 2 * DAY - 1, session="s6")]   # the data ends at midnight: the test day is whole


def test_session_queries_are_the_prefixes_of_each_test_session():
    split = session(sessions())
    assert_leak_free(split)
    assert_well_formed(split)
    assert len(split.train) == 4            # the straddling session trains on its early click, tests on nothing
    # s4 without the unknown item: x, y, x -> two prefixes; s5 is a single known click -> dropped
    assert [(q.history, set(q.targets)) for q in split.queries] == [(("x",), {"y"}), (("x", "y"), {"x"})]
    first, second = split.queries
    assert first.user_id == "d" and first.kind == "homepage" and first.exclude == frozenset()
    assert first.now_s == D0 + DAY + H and [e.product_id for e in first.apply] == ["x"]
    assert second.now_s == D0 + DAY + H + 2 and second.apply[0].timestamp == second.now_s
    assert (split.ks, split.primary) == ((20,), "hitrate@20")


def test_session_validation_uses_the_day_before():
    events = [ev("v", "x", D0 - DAY + H, session="v1"), ev("v", "y", D0 - DAY + 2 * H, session="v1")] + sessions()
    split = session(events, validation=True)
    assert_leak_free(split)
    assert split.queries[0].history == ("x",) and split.queries[0].targets == {"y"}      # session s1
    assert all(q.now_s < D0 + DAY for q in split.queries)
    assert all(e.timestamp < D0 for e in split.train)


def test_session_from_parts_drops_sessions_that_start_before_training_ends():
    train = [ev("t", "x", D0), ev("t", "y", D0 + 100)]
    test = [ev("a", "x", D0 + 50, session="a"), ev("a", "y", D0 + 150, session="a"),
            ev("b", "y", D0 + 200, session="b"), ev("b", "x", D0 + 210, session="b")]
    split = session_from_parts(train, test)
    assert_leak_free(split)
    assert [q.user_id for q in split.queries] == ["b"]


# -- fbt -----------------------------------------------------------------------------------------

def baskets(days=10):
    """One basket a day per member; items cycle so every test item is known from training."""
    out = []
    for d in range(days):
        for m in range(3):
            for i in range(3):
                out.append(ev(f"m{m}", f"item{(d + m + i) % 5}", D0 + d * DAY + 12 * H, "purchase", f"m{m}-{d}"))
    out.append(ev("m0", "view-only", D0 + 9 * DAY + 12 * H, "view", "m0-9"))
    out.append(ev("m1", "unknown", D0 + 9 * DAY + 12 * H, "purchase", "m1-9"))
    return out


def test_fbt_hides_one_known_item_per_test_basket():
    split = fbt(baskets())
    assert_leak_free(split)
    assert_well_formed(split)
    assert len(split.queries) == 6         # the last 2 of 10 days, 3 baskets each
    assert all(e.timestamp < D0 + 8 * DAY for e in split.train)
    for q in split.queries:
        (hidden,) = q.targets
        assert q.kind == "cart" and hidden not in q.cart and len(q.cart) == 2
        assert q.exclude == frozenset(q.cart) and "unknown" not in q.cart and "view-only" not in q.cart
    assert (split.ks, split.primary) == ((4,), "hitrate@4")


def test_fbt_is_seeded():
    def hidden(s):
        return [tuple(q.targets) for q in s.queries]
    assert hidden(fbt(baskets(), seed=1)) == hidden(fbt(baskets(), seed=1))
    assert any(hidden(fbt(baskets(), seed=s)) != hidden(fbt(baskets(), seed=1)) for s in range(2, 6))
    assert "random.Random(7)" in " ".join(fbt(baskets(), seed=7).notes)


def test_fbt_validation_takes_the_days_before_the_test_days():
    split = fbt(baskets(), validation=True)
    assert_leak_free(split)
    assert {q.now_s for q in split.queries} == {D0 + 6 * DAY + 12 * H, D0 + 7 * DAY + 12 * H}
    assert all(e.timestamp < D0 + 6 * DAY for e in split.train)


def test_fbt_refuses_data_without_baskets_or_days():
    with pytest.raises(ValueError, match="'fbt'.*no purchase"):
        fbt([ev("u", "a", D0), ev("u", "b", D0 + 1)])
    with pytest.raises(ValueError, match="'fbt'.*too few"):
        fbt([ev("u", "a", D0, "purchase")])
    single = [ev(f"u{d}", "a", D0 + d * DAY, "purchase", f"s{d}") for d in range(10)]
    with pytest.raises(ValueError, match="'fbt'.*no query"):
        fbt(single)


# -- movielens and new_items ---------------------------------------------------------------------

def ratings(users=6, per_user=10, items=30):
    return [ev(f"u{u}", f"m{(u * 7 + n * 3) % items}", D0 + n * DAY + u * 60, "purchase")
            for u in range(users) for n in range(per_user)]


def test_movielens_splits_each_user_in_time():
    events = ratings() + [ev("lone", "m1", D0)]
    split = movielens(events)
    assert_well_formed(split)
    assert len(split.queries) == 6 and len(split.train) == 6 * 8     # the last 2 of 10 are test; "lone" tests only
    train_by_user = {}
    for e in split.train:
        train_by_user.setdefault(e.user_id, []).append(e)
    for q in split.queries:
        past = train_by_user[q.user_id]
        assert max(e.timestamp for e in past) < q.now_s
        assert q.exclude == {e.product_id for e in past}
        assert len(q.targets) == 2 and q.new_targets == q.targets
        assert q.history == tuple(e.product_id for e in past)
    assert (split.ks, split.primary) == ((10, 20, 50), "recall@20")


def test_movielens_validation_splits_inside_the_training_part():
    test, val = movielens(ratings()), movielens(ratings(), validation=True)
    assert len(val.train) == 6 * 6          # 8 training events: 2 validation targets, 6 train
    for qv, qt in zip(sorted(val.queries, key=lambda q: q.user_id), sorted(test.queries, key=lambda q: q.user_id)):
        assert qv.now_s < qt.now_s and qv.targets <= qt.exclude     # validation targets are the test's training
    test_events = {(q.user_id, t) for q in test.queries for t in q.targets}
    assert not {(e.user_id, e.product_id) for e in val.train} & test_events


def test_new_items_never_trains_on_held_out_items():
    events = ratings(users=20, items=40)
    split = new_items(events)
    assert_well_formed(split)
    assert len(split.held_out_items) == 4
    assert not {e.product_id for e in split.train} & split.held_out_items
    for q in split.queries:
        assert q.universe == split.held_out_items and q.targets <= split.held_out_items
        assert q.exclude <= split.held_out_items and not q.targets & q.exclude
    again = new_items(events)
    assert again.held_out_items == split.held_out_items and again.queries == split.queries
    assert new_items(events, seed=3).held_out_items != split.held_out_items
    assert (split.ks, split.primary) == ((10, 20), "recall@20")


def test_new_items_validation_reads_no_test_part():
    events = ratings(users=20, items=40)
    test_part = {(q.user_id, t) for q in movielens(events).queries for t in q.targets}
    split = new_items(events, validation=True)
    assert not {(e.user_id, e.product_id) for e in split.train} & test_part
    assert not {(q.user_id, t) for q in split.queries for t in q.targets} & test_part


# -- errors, catalogue, make_split -----------------------------------------------------------------

def test_unusable_data_is_refused_with_the_protocol_named():
    with pytest.raises(ValueError, match="'homepage'.*no events"):
        homepage([])
    with pytest.raises(ValueError, match="'homepage'.*no query"):
        homepage([ev("u", "a", D0), ev("v", "b", D0 + DAY)])
    with pytest.raises(ValueError, match="'session'.*no query"):      # only sessions of length 1
        session([ev("u", "a", D0 - H), ev("v", "a", D0 + DAY - 1), ev("w", "a", D0 + DAY - 1)])
    with pytest.raises(ValueError, match="'session'.*no training events"):   # nothing before the test day
        session([ev("u", "a", D0), ev("u", "b", D0 + DAY - 1)])
    with pytest.raises(ValueError, match="unknown protocol"):
        make_split("nope", DATA)


def test_catalogue_from_events_fills_only_what_is_missing():
    known = Product(product_id="a", title="A", category_path=("x",), price=2.0, created_at=D0)
    events = [ev("u", "a", D0), ev("u", "b", D0 + 5),
              Event(event_id="p1", user_id="u", session_id="s", product_id="c", event_type="view",
                    timestamp=D0 + 9, price=4.0, category="shoes"),
              Event(event_id="p2", user_id="u", session_id="s", product_id="c", event_type="purchase",
                    timestamp=D0 + 7, price=2.0)]
    cat = {p.product_id: p for p in catalogue_from_events(events, [known])}
    assert cat["a"] is known
    b, c = cat["b"], cat["c"]
    assert (b.title, b.category_path, b.brand, b.price, b.created_at) == ("b", ("unknown",), "unknown", 0.0, D0 + 5)
    assert (c.category_path, c.price, c.created_at) == (("shoes",), 3.0, D0 + 7)   # median price, first seen


def test_make_split_reads_a_file_and_samples_whole_users(tmp_path):
    path = tmp_path / "e.csv"
    rows = [f"u{u},m{(u * 7 + n * 3) % 30},purchase,{D0 + n * DAY + u * 60:.0f}" for u in range(40) for n in range(10)]
    path.write_text("user_id,product_id,event_type,timestamp\n" + "\n".join(rows) + "\n")
    full = make_split("movielens", path, "csv")
    few = make_split("movielens", path, "csv", max_queries=10)
    assert len(full.queries) == 40 and len(few.queries) == 10 and len(few.train) == len(full.train)
    assert [q.qid for q in few.queries] == list(range(10))
    assert few.queries == make_split("movielens", path, "csv", max_queries=10).queries
    assert few.dataset == str(path) and "sampled 10 of 40 users" in few.notes[-1]


# -- the real datasets ---------------------------------------------------------------------------

def real(protocol, validation=False):
    return make_split(protocol, DATA / PROTOCOLS[protocol].path, validation=validation)


def test_registry_points_at_the_shared_data():
    for name, (function, fmt, path, settings) in PROTOCOLS.items():
        assert callable(function) and fmt and (DATA / path).exists(), name
        load({f"RECSTREAM_{k.upper()}": str(v) for k, v in settings.items()})   # settings it may carry are real ones


def test_homepage_on_taobao():
    test, val = real("homepage"), real("homepage", validation=True)
    for split in (test, val):
        assert_leak_free(split)
        assert 500 < len(split.queries) <= 814
    assert test.queries[0].now_s == 1512230400.0     # 2017-12-03 00:00 China time
    assert val.queries[0].now_s == 1512230400.0 - DAY and max(e.timestamp for e in val.train) < val.queries[0].now_s


def test_session_on_yoochoose():
    test, val = real("session"), real("session", validation=True)
    for split in (test, val):
        assert_leak_free(split)
        assert 8_000 < len(split.queries) < 15_000
    assert len(test.train) == 70_278 and len(val.train) == 53_254
    assert max(q.now_s for q in val.queries) < min(q.now_s for q in test.queries)


def test_fbt_on_groceries():
    test, val = real("fbt"), real("fbt", validation=True)
    for split in (test, val):
        assert_leak_free(split)
        assert 1_000 < len(split.queries) < 5_000
    assert max(q.now_s for q in val.queries) < min(q.now_s for q in test.queries)


def test_movielens_and_new_items_on_movielens():
    ml, cold = real("movielens"), real("new_items")
    assert len(ml.queries) == 610 and 70_000 < len(ml.train) < 90_000 and len(ml.products) == 9_742
    assert 900 < len(cold.held_out_items) < 1_000 and 200 < len(cold.queries) < 610
    assert not {e.product_id for e in cold.train} & cold.held_out_items
