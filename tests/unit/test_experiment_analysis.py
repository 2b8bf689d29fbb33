"""The experiment analysis (pure): tests per metric, guardrails, SRM, the promotion decision, the report."""

import pytest

from recstream.experiments import analysis
from recstream.experiments.attribution import VariantTotals
from recstream.experiments.definition import loads
from recstream.stats import BUCKETS

DAY = 86_400.0
START = 1_700_000_000.0
EXP = loads(f"""
version = 1
[[experiments]]
id = "x"
description = "a test"
layer = "l"
start = {START}
end = {START + 30 * DAY}
traffic = 1.0
[[experiments.variants]]
name = "control"
weight = 0.5
[[experiments.variants]]
name = "b"
weight = 0.5
""").get("x")


def totals(units: int, per_user_clicks: float, fallback_error: int = 0, impressions_per_user: int = 4) -> VariantTotals:
    """`units` users with `impressions_per_user` impressions each; a share `per_user_clicks` of users
    clicked one impression."""
    clickers = int(units * per_user_clicks)
    imps = units * impressions_per_user
    latency = [0] * BUCKETS
    latency[40] = imps
    return VariantTotals(units=units, impressions=imps, clicked=clickers, units_clicked=clickers,
                         sum_x2=units * impressions_per_user ** 2, sum_clicked2=clickers,
                         sum_x_clicked=clickers * impressions_per_user, fallback_error=fallback_error,
                         latency=tuple(latency))


def test_a_clear_winner_after_7_days_may_be_promoted():
    an = analysis.analyse(EXP, {"control": totals(5000, 0.10), "b": totals(5000, 0.13)}, START + 8 * DAY)
    t = an.test("ctr", "b")
    assert t.test == "chi2 on users" and t.comparison.p_value < 0.001 and t.comparison.diff > 0
    assert an.test("revenue_per_impression", "b").test == "delta method (user level)"
    d = analysis.decide(an, "b")
    assert d.allowed and "significant" in d.reason


def test_refused_while_young_or_not_significant_unless_forced():
    young = analysis.analyse(EXP, {"control": totals(5000, 0.10), "b": totals(5000, 0.13)}, START + 2 * DAY)
    d = analysis.decide(young, "b")
    assert not d.allowed and "too young" in d.reason
    forced = analysis.decide(young, "b", force=True)
    assert forced.allowed and "forced despite" in forced.reason and "too young" in forced.reason
    flat = analysis.analyse(EXP, {"control": totals(5000, 0.10), "b": totals(5000, 0.10)}, START + 8 * DAY)
    d = analysis.decide(flat, "b")
    assert not d.allowed and "not better" in d.reason and "not significant" in d.reason


def test_a_worse_guardrail_blocks_and_srm_is_flagged():
    an = analysis.analyse(EXP, {"control": totals(5000, 0.10), "b": totals(5000, 0.13, fallback_error=300)},
                          START + 8 * DAY)
    d = analysis.decide(an, "b")
    assert not d.allowed and "guardrail error_rate" in d.reason
    skewed = analysis.analyse(EXP, {"control": totals(5000, 0.10), "b": totals(4500, 0.13)}, START + 8 * DAY)
    assert skewed.srm_flagged
    assert "sample ratio mismatch" in analysis.decide(skewed, "b").reason
    assert "FLAGGED" in analysis.table(skewed)


def test_the_control_may_always_be_promoted_and_missing_data_is_not_a_win():
    an = analysis.analyse(EXP, {"control": totals(100, 0.1)}, START + 8 * DAY)
    assert analysis.decide(an, "control").allowed
    assert an.units == {"control": 100, "b": 0}
    d = analysis.decide(an, "b")
    assert not d.allowed and "no data" in d.reason


def test_an_unknown_metric_is_an_error():
    with pytest.raises(ValueError, match="unknown metric"):
        analysis.analyse(EXP, {}, START, metric="happiness")


def test_the_plot_shows_cumulative_days(tmp_path):
    day1 = {"control": totals(1000, 0.10), "b": totals(1000, 0.12)}
    day2 = {"control": totals(1000, 0.10), "b": totals(1000, 0.14)}
    daily = {v: {"2023-11-14": day1[v], "2023-11-15": day2[v]} for v in day1}
    s = analysis.series(daily, ["ctr"])
    (d1, first), (d2, second) = s["ctr"]["b"]
    assert (d1, d2) == ("2023-11-14", "2023-11-15")
    assert first == pytest.approx(120 / 4000) and second == pytest.approx((120 + 140) / 8000)
    an = analysis.analyse(EXP, {v: day1[v] + day2[v] for v in day1}, START + DAY)
    path = tmp_path / "x.png"
    analysis.plot(an, daily, path)
    assert path.stat().st_size > 10_000
