"""Per-task orderings: which widget a target stands for, each ordering's scores, and the ranker earning its place."""
from __future__ import annotations

import math

import numpy as np
import pytest

from recstream import ordering
from recstream.rules import source_matrix

NAN = math.nan


@pytest.mark.parametrize("event_type, live, basket, task", [
    ("view", False, False, "home"), ("purchase", False, True, "home"),   # a new visit opens on the homepage
    ("view", True, False, "next"), ("view", True, True, "next"), ("purchase", True, False, "next"),
    ("add_to_cart", True, True, "cart"), ("purchase", True, True, "cart"),   # filling the basket it holds
])
def test_a_target_stands_for_the_widget_it_would_be_shown_in(event_type, live, basket, task):
    assert ordering.task_of_target(event_type, live, basket) == task


@pytest.mark.parametrize("kind, live, task", [
    ("homepage", False, "home"), ("homepage", True, "next"), ("similar", False, "next"), ("also_viewed", True, "next"),
    ("cart", False, "cart"), ("cart", True, "cart"),
])
def test_a_request_is_the_task_its_widget_and_session_make_it(kind, live, task):
    assert ordering.task_of_request(kind, live) == task


def _order(name, ranker=None, dot=None):
    sources = source_matrix(3, {"cobuy": [NAN, 2.0, NAN], "popular": [5.0, NAN, 1.0]})
    s = ordering.scores(name, sources, np.array([1.0, 50.0, 900.0]), np.array([0.0, 0.0, 3.0]),
                        np.array([0.9, NAN, 0.1]) if dot is None else dot, ranker)
    return list(np.argsort(-s, kind="stable"))


def test_each_ordering_orders_by_its_own_signal():
    assert _order("popular") == [2, 1, 0]                          # window popularity
    assert _order("als") == [0, 2, 1]                              # dot product; no vector goes last
    assert _order("rules") == [1, 0, 2]                            # co-purchase first, then popular by score
    assert _order("ranker", ranker=np.array([0.0, 1.0, 2.0])) == [2, 1, 0]
    assert _order("fusion") == [0, 1, 2]     # each source's best first (ties by trending), then popular's second


def test_popular_ranks_by_the_training_window_and_breaks_ties_by_the_last_days():
    """A small shop's week is a few hundred baskets: its staples show in the version's window counts."""
    sources = source_matrix(3, {"popular": [1.0, 1.0, 1.0]})
    week, trend = np.array([9.0, 0.0, 3.0]), np.zeros(3)
    window = np.array([100.0, 400.0, 100.0])
    s = ordering.scores("popular", sources, week, trend, None, None, window)
    assert list(np.argsort(-s, kind="stable")) == [1, 0, 2]
    # a version trained before it carried the counts: the last days decide, as before
    s = ordering.scores("popular", sources, week, trend, None, None, None)
    assert list(np.argsort(-s, kind="stable")) == [0, 2, 1]


def test_fusion_puts_what_several_sources_rank_high_first_whatever_their_scales():
    sources = source_matrix(4, {"als": [0.9, 0.8, 0.1, NAN], "knn": [NAN, 40.0, 0.5, 90.0]})
    s = ordering.fusion_scores(sources)
    # b is 2nd in both lists, c 3rd in both: ahead of a and d, each 1st in one list only
    assert list(np.argsort(-s, kind="stable")) == [1, 2, 0, 3]
    k = ordering.FUSION_K
    assert s[1] == pytest.approx(1 / (k + 2) + 1 / (k + 2)) and s[0] == pytest.approx(1 / (k + 1))


def test_orderings_without_their_signal_fall_back_to_the_rules():
    assert _order("ranker", ranker=None) == _order("rules")
    assert _order("als", dot=np.full(3, NAN)) == _order("rules")   # an unknown user without a session


def test_the_ranker_serves_a_task_only_where_it_clearly_beats_every_simpler_ordering():
    rng = np.random.default_rng(0)
    base = rng.random(400)
    simple = {"popular": base * 0.5, "als": base * 0.8, "rules": base}
    assert ordering.choose({**simple, "ranker": base + 0.1}) == "ranker"
    assert ordering.choose({**simple, "ranker": base * 0.9}) == "rules"
    # better on average, but within the noise of the paired difference: the simpler ordering serves
    assert ordering.choose({**simple, "ranker": base + rng.normal(0.002, 0.2, 400)}) == "rules"
    assert ordering.choose({"popular": base, "als": base, "rules": base, "ranker": base}) == "popular"   # ties
    assert ordering.choose({**simple, "ranker": base + 0.5}, min_groups=401) == "rules"   # too few groups
    assert ordering.choose({}) == "rules"


def test_a_served_version_resolves_each_request_to_its_tasks_ordering():
    chosen = {"home": "ranker", "next": "als", "cart": "rules"}
    assert [ordering.resolve(chosen, t, True) for t in ("home", "next", "cart")] == ["ranker", "als", "rules"]
    assert ordering.resolve(chosen, "home", has_ranker=False) == "rules"   # the choice needs its booster
    assert ordering.resolve({}, "cart", True) == "ranker"    # a version from before per-task choices
    assert ordering.resolve({}, "cart", False) == "rules"


def test_pins_name_a_task_and_an_ordering():
    assert ordering.parse_pins("") == {}
    assert ordering.parse_pins(" next=rules , cart=popular") == {"next": "rules", "cart": "popular"}
    for bad in ("next", "page=rules", "next=random", "next=rules,next=als"):
        with pytest.raises(ValueError):
            ordering.parse_pins(bad)


def test_item_lists_from_a_saved_tables_columns_answer_as_from_the_mapping():
    from recstream.candidates import ItemLists

    mapping = {"a": [("b", 0.9), ("c", 0.5)], "b": [("a", 0.9)]}
    columns = ItemLists.from_columns(["a", "a", "b"], ["b", "c", "a"], [0.9, 0.5, 0.9])
    for item in ("a", "b", "z", None):
        assert ItemLists(mapping).get(item, 5) == columns.get(item, 5)
    assert columns.get("a", 1) == [("b", 0.9)] and len(columns) == 2


def test_weighted_fusion_counts_each_source_by_its_weight_and_leaves_out_a_zero():
    from schemas.recommendations import SOURCES

    sources = source_matrix(3, {"als": [0.9, 0.5, NAN], "knn": [NAN, 2.0, 1.0], "popular": [NAN, NAN, 7.0]})
    w = ordering.parse_weights("als=1, knn=2", SOURCES)
    assert w is not None and w[SOURCES.index("popular")] == 0.0
    s = ordering.fusion_scores(sources, w)
    k = ordering.FUSION_K
    assert s[0] == pytest.approx(1 / (k + 1)) and s[1] == pytest.approx(1 / (k + 2) + 2 / (k + 1))
    assert s[2] == pytest.approx(2 / (k + 2))          # popular's first place counts nothing
    assert ordering.parse_weights(" ", SOURCES) is None
    assert list(ordering.fusion_scores(sources, None)) == list(ordering.fusion_scores(sources, np.ones(len(SOURCES))))


@pytest.mark.parametrize("text, message", [
    ("als", "is not SOURCE=WEIGHT"), ("bogus=1", "is not SOURCE=WEIGHT"), ("als=x", "is not a number"),
    ("als=-1", "0 or more"), ("als=inf", "0 or more"), ("als=0,knn=0", "every source weight 0"),
])
def test_bad_fusion_weights_are_refused_naming_the_part(text, message):
    import recstream.settings
    from schemas.recommendations import SOURCES

    with pytest.raises(ValueError, match=message):
        ordering.parse_weights(text, SOURCES)
    with pytest.raises(recstream.settings.SettingsError, match="FUSION_WEIGHTS"):
        recstream.settings.load({"RECSTREAM_FUSION_WEIGHTS": text})
