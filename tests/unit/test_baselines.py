import numpy as np
import pytest
import scipy.sparse as sp

from recstream.evaluation.baselines import (
    POSITION_WEIGHTS,
    GenreProfile,
    ImplicitALS,
    ItemKNN,
    Popularity,
    Random,
    SessionKNN,
    SessionPopularity,
    _cosine_top,
)
from recstream.evaluation.core import Query, Split
from schemas import Event, Product
from tests.factories import event, product

T0 = 1_700_000_000.0
DAY = 86_400.0


class Events:
    """Builds a time-ordered training log: one session per call to `session`."""

    def __init__(self):
        self.events: list[Event] = []

    def add(self, user: str, session: str, item: str, kind: str = "click", t: float | None = None) -> None:
        t = T0 + len(self.events) if t is None else t
        self.events.append(event(len(self.events), user=user, session=session, item=item, kind=kind, ts=t))

    def session(self, user: str, session: str, items: str, kind: str = "click") -> None:
        for item in items.split():
            self.add(user, session, item, kind)


def split(events: list[Event], queries=(), products=(), held_out=frozenset()) -> Split:
    return Split(protocol="test", dataset="hand-made", train=sorted(events, key=lambda e: e.timestamp),
                 products=list(products), queries=list(queries), ks=(5,), primary="recall@5", seed=3,
                 held_out_items=frozenset(held_out))


def q(qid=0, user="new", history="", cart="", kind="homepage", exclude="", universe=None) -> Query:
    return Query(qid=qid, kind=kind, user_id=user, now_s=T0 + 10 * DAY, history=tuple(history.split()),
                 targets=frozenset({"?"}), cart=tuple(cart.split()), exclude=frozenset(exclude.split()),
                 universe=None if universe is None else frozenset(universe.split()))


def fitted(method, events, **kw):
    method.fit(split(events, **kw))
    return method


def test_popularity_ranks_by_summed_event_weight_and_window():
    log = Events()
    log.add("u1", "s1", "old", "purchase", T0)                 # 5, but long ago
    for i in range(3):
        log.add(f"u{i}", "s", "viewed", "view", T0 + 9 * DAY + i)   # 3 x 1
    log.add("u1", "s2", "clicked", "click", T0 + 9 * DAY + 9)  # 2
    assert fitted(Popularity(), log.events).recommend([q()], 3) == [["old", "viewed", "clicked"]]
    # the last day only: "old" has no weight there, and pads the list (global popularity) at the end
    assert fitted(Popularity(window_days=1), log.events).recommend([q()], 3) == [["viewed", "clicked", "old"]]


def test_session_popularity_repeats_the_sessions_most_frequent_items():
    log = Events()
    log.session("u1", "s1", "p p p p q q q c c a")             # global: p, q, c, a, b
    log.session("u2", "s2", "b")
    (ranked,) = fitted(SessionPopularity(), log.events).recommend([q(history="a b a")], 5)
    assert ranked == ["a", "b", "p", "q", "c"]
    (ranked,) = fitted(SessionPopularity(), log.events).recommend([q(history="c a")], 3)
    assert ranked == ["c", "a", "p"]                            # a tie in the session: the more popular first


def test_item_knn_recommends_the_co_occurring_item_normalised_by_popularity():
    log = Events()
    for i in range(2):
        log.session(f"u{i}", "s", "a b")                        # c_ab = 2, c_b = 2
        log.session(f"v{i}", "s", "a pop")                      # c_a,pop = 2, but pop is everywhere
    for i in range(6):
        log.session(f"w{i}", "s", "pop z")
    (ranked,) = fitted(ItemKNN(), log.events).recommend([q(history="a")], 2)
    assert ranked == ["b", "pop"]                               # cos(a,b) = 2/sqrt(4*2) > cos(a,pop) = 2/sqrt(4*8)


def test_item_knn_cart_queries_use_purchase_baskets():
    log = Events()
    for i in range(5):
        log.session(f"u{i}", "browse", "a seen")                # all events: cos(a, seen) 5/sqrt(8*5) wins
        if i < 3:
            log.session(f"u{i}", "buy", "a bought", "purchase")  # over cos(a, bought) 3/sqrt(8*3)
    m = fitted(ItemKNN(), log.events)
    cart, home = m.recommend([q(kind="cart", cart="a"), q(history="a")], 1)
    assert cart == ["bought"] and home == ["seen"]


def test_session_knn_weights_recent_items_and_samples_recent_sessions():
    log = Events()
    log.session("o", "old", "a b old")                          # shares a and b: similarity 1/2 + 2/2
    log.session("n", "new", "b new")                            # shares b only: 1, but is more recent
    log.session("x", "x", "zz zz zz zz")                       # the most popular item, in no neighbour
    query = q(history="a b", exclude="a b")
    assert fitted(SessionKNN(), log.events).recommend([query], 2) == [["old", "new"]]
    # only the most recent session sharing an item is a candidate neighbour: "old" falls back to popularity
    assert fitted(SessionKNN(sample=1), log.events).recommend([query], 2) == [["new", "zz"]]


def test_session_knn_position_weight_prefers_the_latest_click():
    log = Events()
    log.session("0", "0", "after_a")                            # after_a the more popular
    log.session("2", "2", "b after_b")
    log.session("1", "1", "a after_a")                          # the more recent: equal similarities favour it
    (ranked,) = fitted(SessionKNN(), log.events).recommend([q(history="a b", exclude="a b")], 2)
    assert ranked == ["after_b", "after_a"]


def block_log(seed: int = 0) -> tuple[list[Event], dict[str, str]]:
    """20 users, two blocks of 6 items; each user touched 5 of their block's 6 (the missing one is known)."""
    rng = np.random.default_rng(seed)
    log, missing = Events(), {}
    for u in range(20):
        block = "A" if u < 10 else "B"
        skip = int(rng.integers(6))
        missing[f"u{u}"] = f"{block}{skip}"
        for j in range(6):
            if j != skip:
                log.add(f"u{u}", "s", f"{block}{j}")
    return log.events, missing


def test_als_recovers_a_block_structure_for_known_and_folded_in_users():
    events, missing = block_log()
    seen = {u: " ".join(e.product_id for e in events if e.user_id == u) for u in missing}
    m = fitted(ImplicitALS(factors=2, iterations=15), events)
    ranked = m.recommend([q(i, user=u, exclude=seen[u]) for i, u in enumerate(missing)], 1)
    assert [r[0] for r in ranked] == list(missing.values())
    # a user unseen in training, folded in from their session: their block's items come first
    (new,) = m.recommend([q(history="B1 B2", exclude="B1 B2")], 4)
    assert sorted(new) == ["B0", "B3", "B4", "B5"]


def test_als_is_deterministic_for_a_seed():
    events, _ = block_log()
    a = fitted(ImplicitALS(factors=4, iterations=3, seed=1), events).model.item_factors
    b = fitted(ImplicitALS(factors=4, iterations=3, seed=1), events).model.item_factors
    np.testing.assert_array_equal(a, b)


def movie(pid: str, *genres: str) -> Product:
    return product(pid, title=pid, category_path=genres, brand="unknown", price=0.0, created_at=T0)


def test_genre_profile_ranks_new_items_by_cosine_to_the_users_genres():
    log = Events()
    log.session("fan", "s", "c1 c2", "purchase")
    log.session("fan", "s", "d1", "view")                       # profile: comedy 10, drama 1
    products = [movie("c1", "Comedy"), movie("c2", "Comedy"), movie("d1", "Drama"),
                movie("n_comedy", "Comedy"), movie("n_mixed", "Comedy", "Drama", "War"), movie("n_drama", "Drama"),
                movie("n_horror", "Horror")]
    m = fitted(GenreProfile(), log.events, products=products, held_out={"n_comedy", "n_mixed", "n_drama", "n_horror"})
    new_items = "n_horror n_drama n_mixed n_comedy"
    (ranked,) = m.recommend([q(user="fan", universe=new_items)], 4)
    assert ranked == ["n_comedy", "n_mixed", "n_drama", "n_horror"]
    (ranked,) = m.recommend([q(user="stranger", history="d1", universe=new_items)], 2)
    assert ranked == ["n_drama", "n_mixed"]                     # a new user: the session's genres


def test_random_is_seeded_per_query_and_not_by_batch():
    log = Events()
    log.session("u", "s", " ".join(f"i{j}" for j in range(50)))
    queries = [q(i) for i in range(4)]
    a = fitted(Random(seed=1), log.events).recommend(queries, 10)
    assert fitted(Random(seed=1), log.events).recommend(queries[2:], 10) == a[2:]
    assert fitted(Random(seed=2), log.events).recommend(queries, 10) != a
    assert a[0] != a[1]


METHODS = [Popularity, lambda: Popularity(window_days=0.5), SessionPopularity, ItemKNN, lambda: ItemKNN(shrink=50),
           SessionKNN, lambda: SessionKNN(weighting="log"),
           lambda: ImplicitALS(factors=4, iterations=2), GenreProfile, Random]


@pytest.mark.parametrize("make", METHODS)
def test_lists_are_full_distinct_and_respect_exclude_and_universe(make):
    rng = np.random.default_rng(7)
    log = Events()
    for s in range(40):
        items = " ".join(f"i{j}" for j in rng.integers(0, 30, size=4))
        log.session(f"u{s % 7}", f"s{s}", items, kind=str(rng.choice(["view", "click", "purchase"])))
    trained = {e.product_id for e in log.events}
    products = [movie(f"i{j}", f"g{j % 3}") for j in range(35)]   # i30..i34: catalogue only
    queries = [q(0, user="u1", history="i1 i2 i2", exclude="i3 i4"),
               q(1, user="nobody", cart="i5", kind="cart", exclude=" ".join(f"i{j}" for j in range(20))),
               q(2, user="u2", universe="i1 i2 i31 i32 unknown", exclude="i2"),
               q(3, user="u3", history="never_seen")]
    m = make()
    m.fit(split(log.events, products=products))
    for k in (1, 5, 100):
        for query, ranked in zip(queries, m.recommend(queries, k)):
            allowed = (trained if query.universe is None else query.universe) - query.exclude
            assert len(ranked) == len(set(ranked)) == min(k, len(allowed)), (query.qid, ranked)
            assert set(ranked) <= allowed, query.qid


def test_item_knn_shrinkage_divides_by_the_norms_plus_shrink():
    # sessions x items (a, b, c): a in 4 sessions, once with b (b's only session), three times with c (c in 16)
    rows = [[1, 1, 0]] + [[1, 0, 1]] * 3 + [[0, 0, 1]] * 13
    x = sp.csr_matrix(np.array(rows, dtype=float))
    plain, shrunk = (_cosine_top(x, 10, shrink).toarray() for shrink in (0.0, 10.0))
    assert plain[0, 1] == pytest.approx(1 / np.sqrt(4 * 1)) and plain[0, 2] == pytest.approx(3 / np.sqrt(4 * 16))
    assert shrunk[0, 1] == pytest.approx(1 / (2 + 10)) and shrunk[0, 2] == pytest.approx(3 / (8 + 10))
    assert shrunk[1, 2] == plain[1, 2] == 0.0 and np.all(np.diag(shrunk) == 0.0)
    np.testing.assert_allclose(shrunk, shrunk.T)


def test_item_knn_shrinkage_prefers_the_pair_seen_together_more_often():
    log = Events()
    log.session("u", "s0", "a rare")                            # cos(a, rare) = 1/sqrt(4*1) = 0.5
    for i in range(3):
        log.session(f"v{i}", "s", "a often")                    # cos(a, often) = 3/sqrt(4*16) = 0.375
    for i in range(13):
        log.session(f"w{i}", "s", "often")
    assert fitted(ItemKNN(), log.events).recommend([q(history="a")], 1) == [["rare"]]
    # shrink 10: 1/(2+10) = 0.083 against 3/(8+10) = 0.167
    assert fitted(ItemKNN(shrink=10), log.events).recommend([q(history="a")], 1) == [["often"]]


@pytest.mark.parametrize("weighting, expected", [
    ("same", [1.0, 1.0, 1.0]),
    ("div", [1 / 3, 2 / 3, 1.0]),
    ("linear", [0.8, 0.9, 1.0]),
    ("log", [1 / np.log10(3.7), 1 / np.log10(2.7), 1 / np.log10(1.7)]),
    ("quadratic", [1 / 9, 4 / 9, 1.0]),
])
def test_session_knn_position_weights_of_a_three_item_session(weighting, expected):
    assert [POSITION_WEIGHTS[weighting](p, 3) for p in (1, 2, 3)] == pytest.approx(expected)


def test_session_knn_linear_weight_stops_at_zero_after_ten_items():
    assert POSITION_WEIGHTS["linear"](1, 12) == 0.0 and POSITION_WEIGHTS["linear"](12, 12) == 1.0


def test_session_knn_weighting_changes_the_neighbours_similarity():
    log = Events()
    log.session("0", "0", "after_a")                            # after_a the more popular
    log.session("2", "2", "b after_b")
    log.session("1", "1", "a after_a")
    query = q(history="a b", exclude="a b")
    # div: the session sharing b (the newest click, weight 1) beats the one sharing a (1/2)
    assert fitted(SessionKNN(weighting="div"), log.events).recommend([query], 2) == [["after_b", "after_a"]]
    # same: both neighbours weigh 1; the tie goes to the more popular item
    assert fitted(SessionKNN(weighting="same"), log.events).recommend([query], 2) == [["after_a", "after_b"]]
    with pytest.raises(ValueError, match="weighting"):
        SessionKNN(weighting="cubic")
