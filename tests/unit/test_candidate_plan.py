"""The candidate stage's plan: which item-kNN lists a request reads, and how many neighbours of each."""
from __future__ import annotations

from recstream import candidates
from recstream.candidates import Ask, Shopper
from schemas.recommendations import SOURCES


def knn_reads(ask: Ask, shopper: Shopper, knn: int = 20) -> list[tuple[str | None, int, float]]:
    return [(r.key, r.n, r.weight) for r in candidates.plan(ask, shopper, [{}], SOURCES, knn) if r.table == "knn"]


def test_the_homepage_reads_knn_of_what_the_session_touched_newest_first():
    live = Shopper(recent=("a",), touched=("b", "a"), history=("b", "a", "old"))
    assert knn_reads(Ask("homepage"), live) == [("b", 20, 1.0), ("a", 20, 0.5)]


def test_an_arriving_shopper_reads_no_knn_lists():
    assert knn_reads(Ask("homepage"), Shopper(history=("x", "y"))) == []


def test_knn_neighbours_per_anchor_follow_the_setting():
    assert {n for _, n, _ in knn_reads(Ask("homepage"), Shopper(touched=("x",)), knn=200)} == {200}
    assert {n for _, n, _ in knn_reads(Ask("similar", product_id="p"), Shopper(), knn=50)} == {50}
