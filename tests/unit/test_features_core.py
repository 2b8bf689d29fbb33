import math

import pytest

from recstream.features import FeatureConfig, Incoming, Limits, UserState, apply, keys, plan, popularity
from recstream.features.session import SEEN_MAX, decode_features, decode_state, features_value, newest
from tests.factories import bind, event

CFG = FeatureConfig(session_idle_timeout_s=1800, session_recent_max=3, covisit_window=2)
LIMITS = Limits(session_ttl_s=1800, user_features_ttl_s=86400, window_days=7, trending_half_life_s=3600,
                cooccurrence_max=10)
T = 1_764_000_000.0


ev = bind(event, "i", "kind", "pid", "t", "session", "category", t0=T, user="u", pid="p1", category="c")


def fold(events, state=None):
    state = state or UserState()
    updates = []
    for e in events:
        u = apply(state, e, CFG)
        updates.append(u)
        state = u.state
    return state, updates


def test_views_build_the_session_newest_first_bounded_and_unique():
    state, _ = fold([ev(1, pid="a"), ev(2, pid="b"), ev(3, pid="a"), ev(4, pid="c"), ev(5, pid="d")])
    assert state.recent == ("d", "c", "a") and state.last_viewed == "d" and state.categories == {"c": 5}


@pytest.mark.parametrize("second, new_session", [
    (ev(2, t=T + 1799), False),              # within the idle timeout
    (ev(2, t=T + 1801), True),               # idle too long
    (ev(2, session="s2"), True),             # the producer started a new session
])
def test_session_boundaries(second, new_session):
    state, _ = fold([ev(1, pid="x", t=T), second])
    assert (state.recent == ("p1",)) is new_session


def test_a_late_event_does_not_reset_the_session_but_still_counts():
    state, updates = fold([ev(1, pid="a"), ev(2, pid="b"), ev(3, pid="old", t=T - 5000, session="s0")])
    assert state.recent == ("b", "a") and state.events == 3 and updates[-1].covisits == ()


@pytest.mark.parametrize("arrival", [
    (1, 2, 3, 4),     # in order
    (1, 3, 2, 4),     # two producers, one of them re-routed: its events arrive after newer ones
    (2, 4, 1, 3),
    (4, 3, 2, 1),
])
def test_the_session_is_in_event_time_order_whatever_the_arrival_order(arrival):
    events = {i: ev(i, kind="view" if i % 2 else "click", pid=f"q{i}") for i in (1, 2, 3, 4)}
    state, _ = fold([events[i] for i in arrival])
    wide = FeatureConfig(session_recent_max=10)
    full = UserState()
    for i in arrival:
        full = apply(full, events[i], wide).state
    assert state.recent == ("q4", "q3", "q2") and state.last_viewed == "q4" and state.events == 4
    assert full.touched == full.history == full.recent == ("q4", "q3", "q2", "q1")
    assert full.recent_s == tuple(T + i for i in (4, 3, 2, 1))


def test_a_late_arrival_of_an_item_touched_again_since_keeps_the_newer_touch():
    state, _ = fold([ev(1, pid="a"), ev(3, pid="b"), ev(4, pid="a"), ev(2, pid="a")])
    assert state.recent == ("a", "b") and state.recent_s == (T + 4, T + 3)


def test_a_late_view_pairs_with_the_items_viewed_before_it():
    _, updates = fold([ev(1, pid="a"), ev(3, pid="c"), ev(2, pid="b")])
    assert updates[-1].covisits == (("b", "a"),)


def test_a_state_kept_before_event_times_were_kept_still_takes_events():
    old = UserState(session_id="s1", session_start_s=T, last_s=T + 5, recent=("y", "x"), touched=("y", "x"),
                    history=("y", "x"))
    state, _ = fold([ev(6, pid="z"), ev(3, pid="w")], old)
    assert state.recent == ("z", "y", "x") and state.recent_s == (T + 6, T + 5, T + 5)
    assert state.history == ("z", "y", "x", "w")   # behind the items of unknown time (at the last event)


def test_repeated_event_ids_change_nothing():
    state, _ = fold([ev(1, "add_to_cart", pid="a")])
    again = apply(state, ev(1, "add_to_cart", pid="a"), CFG)
    assert again.duplicate and again.state is state


def test_only_the_last_seen_max_ids_are_remembered():
    state, _ = fold([ev(i) for i in range(SEEN_MAX + 1)])
    assert len(state.seen) == SEEN_MAX and apply(state, ev(SEEN_MAX), CFG).duplicate  # the newest: remembered
    assert apply(state, ev(0), CFG).duplicate is False  # the oldest: forgotten, the documented limit


def test_covisits_pair_with_the_last_window_views_and_copurchases_within_the_session():
    state, ups = fold([ev(1, pid="a"), ev(2, pid="b"), ev(3, pid="c"),
                       ev(4, "add_to_cart", pid="c"), ev(5, "purchase", pid="c"), ev(6, "purchase", pid="d")])
    assert ups[2].covisits == (("c", "b"), ("c", "a"))
    assert ups[5].copurchases == (("d", "c"),) and state.cart == () and state.purchases == ("d", "c")


def test_features_value_round_trips():
    state, _ = fold([ev(1, pid="a"), ev(2, "add_to_cart", pid="a")])
    f = decode_features(features_value(state))
    assert f["cart_items"] == ["a"] and f["session_categories"] == {"c": 1} and f["events"] == 2


def test_forward_decay_orders_like_exponential_decay():
    h = 3600.0
    now = T + 7200
    a = popularity.trend_increment(5.0, T, h)            # a purchase two hours ago
    b = popularity.trend_increment(1.0, T + 7000, h)     # a view just now
    w = popularity.trend_read_weights(now, h)[popularity.landmark(T)]
    assert a * w == pytest.approx(5.0 * 2 ** (-2), rel=1e-9) and b * w == pytest.approx(2 ** (-200 / h), rel=1e-9)
    assert popularity.log_scaled(math.e - 1) == pytest.approx(1.0)


def test_plan_counts_once_and_skips_offsets_redis_already_holds():
    batch = [Incoming(ev(i, pid=f"p{i % 2}"), partition=0, offset=i) for i in range(6)]
    full = plan(batch, {}, {}, {}, CFG, LIMITS)
    skipped = plan(batch, {}, {0: 3}, {}, CFG, LIMITS)
    day = popularity.day(T)
    assert full.ops.incr[(popularity.count_key("view", day), "p0")] == 3
    assert skipped.ops.incr[(popularity.count_key("view", day), "p0")] == 1  # only offset 4
    assert skipped.ops.offsets == {0: (4, 5)} and skipped.states == full.states  # state still folds all
    assert set(full.ops.set) == {keys.user_session("u"), keys.user_state("u")}
    assert full.ops.trim[keys.neighbours("covis", "p0")] == 10


def test_redis_keeps_the_whole_state_and_the_fold_takes_whichever_copy_folded_more():
    batch = [Incoming(ev(i, pid=f"p{i}", kind="add_to_cart" if i == 2 else "view"), partition=1, offset=10 + i)
             for i in range(4)]
    first = plan(batch[:2], {}, {}, {}, CFG, LIMITS)
    both = plan(batch, {}, {}, {}, CFG, LIMITS)
    stored = decode_state(both.ops.set[keys.user_state("u")][0])
    assert stored == both.states["u"] and both.ops.set[keys.user_state("u")][1] == LIMITS.user_features_ttl_s
    behind = first.states["u"]   # the table lost the write of the batch's last two events
    assert newest(behind, stored) == stored and newest(UserState(), stored) == stored
    assert newest(stored, behind) == stored and newest(behind, None) == behind
    # the fold on the copy takes the next event where the lost write left off: the cart is still there
    after = plan([Incoming(ev(9, pid="p9"), partition=1, offset=20)], {"u": newest(behind, stored)}, {}, {}, CFG, LIMITS)
    assert after.states["u"].cart == ("p2",) and after.states["u"].events == 5


def test_redelivered_records_are_recognised_by_their_offset_however_old():
    batch = [Incoming(ev(i, pid=f"p{i}"), partition=2, offset=100 + i) for i in range(SEEN_MAX + 10)]
    first = plan(batch, {}, {}, {}, CFG, LIMITS)
    again = plan(batch, first.states, {2: 10_000}, {}, CFG, LIMITS)   # all of it redelivered
    assert first.states["u"].offset == 100 + SEEN_MAX + 9 and first.states["u"].partition == 2
    assert again.duplicates == len(batch) and again.states == {} and not again.ops.incr


def test_a_batch_folds_in_offset_order_when_refilled_records_come_ahead_of_delivered_ones():
    """The rebalance test's loss (one user one event short, Redis and table alike): after a seek the
    consumer delivered 815 and 819 and skipped 816-818; the agent read those again and put them at
    the head of the batch. Folded in that order, 815 came after 818 of its user and read as a
    redelivery. In offset order every record counts, once, as in the topic's fold."""
    records = [Incoming(ev(i, pid=f"p{i}", user="u" if i % 2 else "v"), partition=0, offset=810 + i)
               for i in range(10)]
    delivered, skipped = records[:6] + records[9:], records[6:9]
    topic = plan(records, {}, {}, {}, CFG, LIMITS)
    first = plan(delivered[:5], {}, {}, {}, CFG, LIMITS)                      # 810-814
    refilled = plan(skipped + delivered[5:], first.states, {0: 814}, {}, CFG, LIMITS)   # 816-818, then 815, 819
    assert refilled.duplicates == 0 and len(refilled.processed) == 5
    assert [i.offset for i in refilled.processed] == [815, 816, 817, 818, 819]
    assert {**first.states, **refilled.states} == topic.states and topic.states["u"].events == 5
    assert refilled.ops.offsets == {0: (815, 819)}
    day = popularity.day(T)
    assert all(refilled.ops.incr[(popularity.count_key("view", day), f"p{i}")] == 1 for i in range(5, 10))
    # a record delivered twice in one batch is still a redelivery, wherever it lands
    again = plan(delivered[5:] + skipped + delivered[5:6], first.states, {0: 814}, {}, CFG, LIMITS)
    assert again.duplicates == 1 and again.states == refilled.states


def test_missing_offsets_finds_the_holes_after_the_baseline_and_ignores_redeliveries():
    from recstream.features.plan import missing_offsets

    batch = [(0, 12), (0, 10), (0, 5), (0, 15), (1, 3), (2, 7)]
    assert missing_offsets({0: 9, 1: 2}, batch) == {0: [(11, 12), (13, 15)]}   # 5 is a redelivery
    assert missing_offsets({0: 9}, [(0, 10), (0, 11)]) == {}                   # offsets follow on
    assert missing_offsets({0: -1, 2: -1}, [(0, 40), (2, 7)]) == {}            # no baseline: not checked
    assert missing_offsets({1: 0}, [(1, 4), (1, 4)]) == {1: [(1, 4)]}


def test_the_batch_window_is_short_while_the_agent_keeps_up_and_grows_while_it_is_behind():
    from recstream.features.plan import batch_window

    assert batch_window(0.0, 0.02, 0.02, 1.0) == 0.02      # caught up: the shortest window
    assert batch_window(-3.0, 0.02, 0.02, 1.0) == 0.02     # a producer's clock ahead of ours
    assert batch_window(1.9, 1.0, 0.02, 1.0) == 0.02       # it arrived while the last window gathered
    assert batch_window(1.82, 0.02, 0.02, 1.0) == 0.4      # 0.8 s behind (past delivery): half of it
    assert batch_window(60.0, 1.0, 0.02, 1.0) == 1.0       # never longer than the longest


def test_records_re_routed_elsewhere_move_the_guard_and_fold_nothing():
    batch = [Incoming(ev(1, pid="a"), 2, 7)]
    result = plan(batch, {}, {2: 4, 5: 9}, {}, CFG, LIMITS, passed=[(2, 5), (2, 6), (5, 8), (5, 10)])
    assert result.ops.offsets == {2: (5, 7), 5: (10, 10)}   # offsets Redis already holds are left out
    assert [i.offset for i in result.processed] == [7]
    only = plan([], {}, {}, {}, CFG, LIMITS, passed=[(3, 0)])
    assert only.ops.offsets == {3: (0, 0)} and not only.states and not only.ops.set


@pytest.mark.parametrize("headers, copy", [
    (None, False), ([], False), ([("x-other", b"1")], False),
    ([("x-recstream-rerouted-from", b"2:7")], True), ({"x-recstream-rerouted-from": b"2:7"}, True),
])
def test_a_re_routed_copy_is_recognised_by_its_header(headers, copy):
    from streams.reroute import is_copy
    assert is_copy(headers) is copy
