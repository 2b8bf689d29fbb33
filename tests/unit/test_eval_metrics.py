import math

import numpy as np
import pytest

from recstream.evaluation.core import Query
from recstream.evaluation.metrics import coverage, evaluate, per_query


def query(qid: int, targets: set[str], new: set[str] = frozenset()) -> Query:
    return Query(qid=qid, kind="homepage", user_id=f"u{qid}", now_s=0.0, history=(),
                 targets=frozenset(targets), new_targets=frozenset(new))


# q0: targets a (rank 2) and b (rank 4), b is new; q1: target c at rank 1, a list shorter than K.
QUERIES = [query(0, {"a", "b"}, {"b"}), query(1, {"c"})]
RANKED = [["x", "a", "y", "b", "z"], ["c", "d"]]
UNIVERSE = {"a", "b", "c", "d", "w", "x", "y", "z"}


def test_per_query_values_match_hand_computation():
    v = per_query(QUERIES, RANKED, (1, 3, 5))
    d2, d4 = 1 / math.log2(3), 1 / math.log2(5)        # discounts of ranks 2 and 4
    expected = {
        "recall@1": [0, 1], "hitrate@1": [0, 1], "mrr@1": [0, 1], "ndcg@1": [0, 1],
        "recall@3": [0.5, 1], "hitrate@3": [1, 1], "mrr@3": [0.5, 1], "ndcg@3": [d2 / (1 + d2), 1],
        "recall@5": [1, 1], "hitrate@5": [1, 1], "mrr@5": [0.5, 1], "ndcg@5": [(d2 + d4) / (1 + d2), 1],
    }
    for name, values in expected.items():
        np.testing.assert_allclose(v[name], values, err_msg=name)
    np.testing.assert_allclose(v["recall_new@3"], [0, np.nan])
    np.testing.assert_allclose(v["recall_new@5"], [1, np.nan])
    np.testing.assert_allclose(v["ndcg_new@5"], [d4, np.nan])   # one new target: IDCG is a hit at rank 1


def test_idcg_counts_at_most_k_ideal_hits():
    # 3 targets, K = 2, both top-2 items right: a perfect list at K = 2, so NDCG 1 while recall is 2/3.
    v = per_query([query(0, {"a", "b", "c"})], [["a", "b", "x"]], (2,))
    assert v["ndcg@2"][0] == pytest.approx(1.0) and v["recall@2"][0] == pytest.approx(2 / 3)


def test_evaluate_means_ci_counts_and_coverage():
    out = evaluate(QUERIES, RANKED, (1, 5), UNIVERSE)
    assert out["queries"] == 2 and out["queries_new"] == 1
    assert out["hitrate@1"] == pytest.approx(0.5)
    # values 0 and 1: sample std sqrt(0.5), half-width 1.96 * sqrt(0.5) / sqrt(2) = 0.98
    assert out["hitrate@1_ci95"] == pytest.approx(0.98)
    assert out["mrr@5"] == pytest.approx(0.75) and out["mrr@5_ci95"] == pytest.approx(1.96 * 0.5 / 2)
    assert out["recall_new@5"] == pytest.approx(1.0)          # over the one query with new targets
    assert out["recall_new@5_ci95"] == 0.0
    assert out["coverage@1"] == pytest.approx(2 / 8)           # x and c
    assert out["coverage@5"] == pytest.approx(7 / 8)           # all but w


def test_new_metrics_are_left_out_without_new_targets():
    out = evaluate([query(0, {"a"})], [["a"]], (10,), {"a"})
    assert out["queries_new"] == 0 and "recall_new@10" not in out and out["recall@10"] == 1.0


def test_coverage_ignores_items_outside_the_universe_and_beyond_k():
    assert coverage([["a", "zz"], ["b", "c"]], {"a", "b", "c", "d"}, 1) == pytest.approx(0.5)
    assert coverage([], {"a"}, 5) == 0.0


@pytest.mark.parametrize("queries, ranked, error", [
    ([query(0, {"a"})], [["a", "a"]], "repeats"),
    ([query(0, {"a"})], [], "ranked lists"),
    ([query(0, set())], [["a"]], "no targets"),
])
def test_refuses_what_would_bias_the_figures(queries, ranked, error):
    with pytest.raises(ValueError, match=error):
        per_query(queries, ranked, (5,))
