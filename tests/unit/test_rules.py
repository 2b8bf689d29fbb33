"""Serving's pure core: merging proposals, business rules (select/primary), heuristic ranking, reasons."""
from __future__ import annotations

import math

import numpy as np
import pytest

from recstream.ranking import SOURCES
from recstream.rules import REASON_ORDER, Proposals, Rules, best_source, heuristic_scores, primary, reason, select, source_matrix

NAN = float("nan")


# -- Proposals ------------------------------------------------------------------------------------

def test_proposals_keep_the_best_score_per_source_and_its_anchor():
    p = Proposals()
    p.add("x", "cobuy", 2.0, "a1")
    p.add("x", "cobuy", 5.0, "a2")      # better: score and anchor replaced
    p.add("x", "cobuy", 3.0, "a3")      # worse: ignored
    p.add("x", "covis", 1.0, "a3")      # another source keeps its own
    ids, scores, anchors = p.columns()
    assert ids == ["x"]
    assert scores == {"cobuy": [5.0], "covis": [1.0]}
    assert anchors == {"cobuy": ["a2"], "covis": ["a3"]}
    assert len(p) == 1


def test_proposals_keep_first_proposal_order_and_align_columns():
    p = Proposals()
    p.add_all([("a", 3.0), ("b", 2.0)], "covis", "anchor1")
    p.add_all([("c", 0.9), ("a", 0.8)], "als")
    p.add("d", "popular", 7)
    ids, scores, anchors = p.columns()
    assert ids == ["a", "b", "c", "d"]
    assert all(len(col) == len(ids) for col in (*scores.values(), *anchors.values()))
    assert scores["covis"] == [3.0, 2.0, None, None]
    assert scores["als"] == [0.8, None, 0.9, None]
    assert scores["popular"] == [None, None, None, 7.0]
    assert isinstance(scores["popular"][3], float)
    assert anchors == {"covis": ["anchor1", "anchor1", None, None]}   # sources without anchors: no column


def test_proposals_exclude_ids_ignore_unknown_sources_and_empty_ids():
    p = Proposals(exclude={"on_screen", "in_cart"})
    p.add("on_screen", "covis", 9.0, "on_screen")
    p.add("in_cart", "cobuy", 9.0)
    p.add("ok", "not_a_source", 1.0)
    p.add("", "covis", 1.0)
    p.add(None, "covis", 1.0)
    assert len(p) == 0
    assert p.columns() == ([], {}, {})
    p.add("ok", "covis", 1.0)
    assert p.columns()[0] == ["ok"] and set(p.columns()[1]) == {"covis"}


def test_source_matrix_puts_each_source_in_its_column_and_nan_elsewhere():
    m = source_matrix(2, {"cobuy": [1.0, NAN], "popular": [0.5, 2.0]})
    assert m.shape == (2, len(SOURCES))
    assert m[0, SOURCES.index("cobuy")] == 1.0 and math.isnan(m[1, SOURCES.index("cobuy")])
    assert list(m[:, SOURCES.index("popular")]) == [0.5, 2.0]
    assert np.isnan(m[:, SOURCES.index("als")]).all()


# -- heuristic ranking ----------------------------------------------------------------------------

def test_heuristic_scores_prefer_cobuy_then_covis_then_als_then_popular():
    cols = {"cobuy": [0.1, NAN, NAN, NAN, NAN], "covis": [NAN, 0.1, NAN, NAN, NAN],
            "als": [NAN, NAN, 100.0, NAN, NAN], "popular": [NAN, NAN, NAN, 1e6, NAN]}
    h = heuristic_scores(source_matrix(5, cols), np.array([0.0, 0.0, 0.0, 0.0, 50.0]))
    assert h[0] > h[1] > h[2] > h[3] > h[4]


def test_heuristic_scores_order_within_a_source_by_score_then_trending():
    m = source_matrix(3, {"covis": [5.0, 1.0, 1.0]})
    h = heuristic_scores(m, np.array([0.0, 0.0, 100.0]))
    assert h[0] > h[1] and h[2] > h[1]
    assert h[0] > h[2]            # trending only breaks ties, it does not beat the source's score
    # an item proposed by several sources is scored by its best one
    both = heuristic_scores(source_matrix(2, {"cobuy": [1.0, NAN], "popular": [1.0, 1.0]}), np.zeros(2))
    only_cobuy = heuristic_scores(source_matrix(1, {"cobuy": [1.0]}), np.zeros(1))
    assert both[0] == pytest.approx(only_cobuy[0]) and both[0] > both[1]


def test_heuristic_scores_handle_negative_scores_and_nan_trending():
    m = source_matrix(2, {"als": [-3.0, 3.0]})
    h = heuristic_scores(m, np.array([NAN, 0.0]))
    assert np.isfinite(h).all() and h[1] > h[0] > 2.0   # negative ALS still above lower-weight sources


# -- primary (tiers) ------------------------------------------------------------------------------

def test_primary_also_viewed_tiers_covisited_items():
    scores = {"covis": [1.0, NAN, 2.0], "cobuy": [NAN, 3.0, NAN]}
    assert primary("also_viewed", scores, ["A", "B", "C"], None).tolist() == [True, False, True]
    assert primary("also_viewed", {"cobuy": [1.0, 1.0]}, ["A", "B"], None).tolist() == [False, False]


def test_primary_cart_tiers_copurchased_items():
    scores = {"covis": [1.0, NAN, 2.0], "cobuy": [NAN, 3.0, NAN]}
    assert primary("cart", scores, ["A", "B", "C"], None).tolist() == [False, True, False]
    assert primary("cart", {}, ["A"], None).tolist() == [False]


def test_primary_similar_tiers_the_category_and_homepage_has_no_tier():
    cats = ["Phones", "Cases", None, "Phones"]
    assert primary("similar", {}, cats, "Phones").tolist() == [True, False, False, True]
    assert primary("similar", {}, cats, None) is None
    assert primary("similar", {}, cats, "") is None
    assert primary("homepage", {"covis": [1.0] * 4}, cats, "Phones") is None


# -- select ---------------------------------------------------------------------------------------

def sel(ids, scores, cats=None, stock=None, count=10, cap=0, exclude=(), first=None):
    n = len(ids)
    return select(ids, np.asarray(scores, float), cats or [None] * n, stock or [True] * n,
                  Rules(count, cap, frozenset(exclude)), first)


def test_select_orders_best_first_and_keeps_ties_in_retrieval_order():
    assert sel(list("abcd"), [0.1, 0.9, 0.5, 0.9]) == [1, 3, 2, 0]


def test_select_drops_out_of_stock_excluded_and_repeated_ids():
    ids = ["a", "b", "a", "c", "d"]
    rows = sel(ids, [5, 4, 3, 2, 1], stock=[True, True, True, False, True], exclude={"b"})
    assert rows == [0, 4]
    # the better copy of a repeated id wins
    assert sel(["a", "b", "a"], [1, 2, 3]) == [2, 1]


def test_select_respects_count():
    assert sel(list("abcdef"), [6, 5, 4, 3, 2, 1], count=3) == [0, 1, 2]
    assert len(sel(list("abcdef"), [6, 5, 4, 3, 2, 1], cats=list("AAABBB"), count=4, cap=2)) == 4
    assert sel(list("ab"), [1, 2], count=5) == [1, 0]


def test_select_puts_nan_scores_last():
    assert sel(list("abcd"), [NAN, 1.0, NAN, -5.0]) == [1, 3, 0, 2]
    assert sel(list("abc"), [NAN, -1e300, NAN]) == [1, 0, 2]   # NaN below any number; NaNs in retrieval order


def test_select_caps_items_per_category_while_others_are_left():
    ids = list("abcdefg")
    cats = ["A", "A", "A", "A", "B", "B", "C"]
    rows = sel(ids, [7, 6, 5, 4, 3, 2, 1], cats=cats, count=5, cap=2)
    assert rows == [0, 1, 4, 5, 6]
    assert [cats[i] for i in rows].count("A") == 2


def test_select_cap_gives_way_when_too_few_other_categories():
    cats = ["A", "A", "A", "A", "B"]
    rows = sel(list("abcde"), [5, 4, 3, 2, 1], cats=cats, count=4, cap=2)
    assert rows == [0, 1, 4, 2]       # diversity first, then the best held-back items fill the list
    assert len(rows) == 4


def test_select_cap_ignores_unknown_categories_and_zero_disables_it():
    cats = [None, None, None, "A", "A", "A"]
    rows = sel(list("abcdef"), [6, 5, 4, 3, 2, 1], cats=cats, count=5, cap=1)
    assert rows == [0, 1, 2, 3, 4]     # None is not a category; A capped at 1 then backfilled
    assert sel(list("abc"), [3, 2, 1], cats=list("AAA"), count=3, cap=0) == [0, 1, 2]


def test_select_puts_tier_rows_first_and_drops_the_cap():
    ids = list("abcde")
    scores = [9, 8, 1, 2, 3]
    first = np.array([False, False, True, True, True])
    cats = list("AAAAA")
    assert sel(ids, scores, cats=cats, count=4, cap=1, first=first) == [4, 3, 2, 0]
    # the tier's own order is by score, and filters still apply within it
    rows = sel(ids, scores, cats=cats, count=5, cap=1, first=first, stock=[True, True, True, False, True],
               exclude={"c"})
    assert rows == [4, 0, 1]


# -- reasons --------------------------------------------------------------------------------------

def test_best_source_follows_the_reason_priority():
    scores = {"popular": [1.0, 1.0, 1.0, NAN], "als": [0.5, 0.5, NAN, NAN], "covis": [NAN, 2.0, NAN, NAN],
              "cobuy": [3.0, 3.0, NAN, NAN], "session": [NAN, 1.0, NAN, NAN]}
    assert best_source(0, scores) == "cobuy"
    assert best_source(1, scores, "also_viewed") == "covis"   # the widget's own source when it proposed the item
    assert best_source(0, scores, "also_viewed") == "cobuy"   # ... else the most specific
    assert best_source(1, scores) == "cobuy"
    assert best_source(2, scores) == "popular"
    assert best_source(3, scores) is None
    assert best_source(0, {"covis": [1.0], "session": [1.0], "als": [1.0]}) == "covis"
    assert best_source(0, {"session": [1.0], "als": [1.0]}) == "session"
    assert best_source(0, {"same_brand": [1.0], "same_category": [1.0], "popular": [1.0]}) == "same_brand"
    assert best_source(0, {}) is None
    assert set(REASON_ORDER) == set(SOURCES)


@pytest.mark.parametrize("source,kw,expected", [
    ("cobuy", dict(anchor_title="X", score=12), "bought together with “X” in 12 orders"),
    ("cobuy", dict(anchor_title="X", score=1), "bought together with “X” in 1 order"),
    ("cobuy", dict(anchor_title="X", score=1.4), "bought together with “X” in 1 order"),
    ("cobuy", dict(anchor_title="X", score=0.5), "often bought with “X”"),
    ("cobuy", dict(), "often bought with an item you viewed"),
    ("covis", dict(anchor_title="X", score=3), "customers who viewed “X” also viewed this (3 times)"),
    ("covis", dict(anchor_title="X", score=1), "customers who viewed “X” also viewed this (1 time)"),
    ("covis", dict(anchor_title="X", score=0.2), "customers who viewed “X” also viewed this"),
    ("covis", dict(), "customers who viewed an item you viewed also viewed this"),
    ("session", dict(anchor_title="X"), "you viewed this recently"),
    ("same_brand", dict(brand="Nova"), "more from Nova"),
    ("same_brand", dict(category="Phones"), "trending in Phones"),
    ("same_category", dict(category="Phones"), "popular in Phones"),
    ("same_category", dict(), "trending now"),
    ("popular", dict(category="Phones"), "trending in Phones"),
    ("popular", dict(), "trending now"),
    (None, dict(), "trending now"),
])
def test_reason_texts_per_source(source, kw, expected):
    assert reason(source, kind="homepage", **kw) == expected


@pytest.mark.parametrize("kind,query_source,expected", [
    ("similar", "product", "similar to “X”"),
    ("also_viewed", "product", "similar to “X”"),
    ("cart", "cart", "goes with “X” in your cart"),
    ("homepage", "session", "similar to “X” you viewed"),
    ("homepage", "user", "picked for you from your shopping history"),
])
def test_reason_texts_for_als_per_kind(kind, query_source, expected):
    assert reason("als", kind=kind, anchor_title="X", score=0.9, query_source=query_source) == expected


def test_reason_cobuy_count_from_nan_score_is_not_a_number_of_orders():
    assert reason("cobuy", kind="cart", anchor_title="X") == "often bought with “X”"
    assert reason("cobuy", kind="cart", anchor_title="X", score=NAN) == "often bought with “X”"
