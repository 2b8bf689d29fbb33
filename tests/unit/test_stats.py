import numpy as np
import pytest

from recstream.stats import LatencyHistogram, percentiles_ms


def test_percentiles_are_within_five_percent_and_never_below_the_truth():
    rng = np.random.default_rng(1)
    x = rng.lognormal(np.log(0.02), 0.8, 50_000)
    h = LatencyHistogram()
    h.extend(x)
    for q in (50, 99):
        true_ms = np.percentile(x, q) * 1000
        got = h.percentiles_ms((q,))[f"p{q}"]
        assert true_ms <= got <= true_ms * 1.05 + 1e-9


def test_snapshots_subtract_to_the_window_between_them():
    h = LatencyHistogram()
    h.extend([0.001] * 1000)
    before = h.counts.copy()
    h.extend([0.5] * 100)
    window = percentiles_ms(h.counts - before)
    assert 500 <= window["p50"] <= 525 and len(h) == 1100


@pytest.mark.parametrize("values", [[], [0.0], [1e-9], [1e6]])
def test_edges(values):
    h = LatencyHistogram()
    h.extend(values)
    p = h.percentiles_ms()
    assert len(h) == len(values) and (np.isnan(p["p50"]) if not values else p["p50"] > 0)


from recstream.stats import StallWatch  # noqa: E402


@pytest.mark.parametrize("steps, stalled", [
    # (committed, processed, now) per check
    ([({0: 10}, {0: 20}, 0), ({0: 15}, {0: 30}, 40), ({0: 25}, {0: 40}, 80)], []),   # commits move
    ([({0: 10}, {0: 20}, 0), ({0: 10}, {0: 30}, 40), ({0: 10}, {0: 40}, 80)], [0]),  # stuck at 10
    ([({0: 21}, {0: 20}, 0), ({0: 21}, {0: 20}, 100)], []),                            # idle, all committed
    ([({}, {1: 5}, 0), ({}, {1: 5}, 61)], [1]),                                        # never committed
])
def test_stall_watch(steps, stalled):
    watch = StallWatch(timeout_s=60)
    result = [watch.check(c, p, t) for c, p, t in steps][-1]
    assert result == stalled


def test_stages_time_each_named_stage_and_add_up_repeats():
    from recstream.stats import Stages

    ticks = iter([0.0, 0.002, 0.010, 0.013, 0.020, 0.021])
    stage = Stages(clock=lambda: next(ticks))
    with stage("read"):
        pass
    with stage("score"):
        pass
    with stage("read"):   # a stage run twice adds up
        pass
    assert stage.ms == pytest.approx({"read": 3.0, "score": 3.0})


def test_a_stage_that_raises_is_still_timed():
    from recstream.stats import Stages

    ticks = iter([1.0, 1.5])
    stage = Stages(clock=lambda: next(ticks))
    with pytest.raises(KeyError), stage("read"):
        raise KeyError("x")
    assert stage.ms == {"read": 500.0}
