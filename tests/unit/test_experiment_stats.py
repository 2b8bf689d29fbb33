"""A/B statistics: hand-checked values, CI coverage, SRM, promotion gate, replays of real users."""
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from recstream.experiments.stats import (
    analytic_power,
    chi2_rates,
    promotion_decision,
    session_impressions,
    simulate,
    srm,
    user_level,
)

DATA = (Path(__file__).resolve().parents[2].parent / "shared" / "data"
        / "yoochoose-clicks-100k" / "yoochoose-clicks-100k_train_full.txt")


def test_chi2_rates_matches_the_hand_formula():
    sa, na, sb, nb = 120, 2400, 160, 2500
    a, b, c, d = sa, na - sa, sb, nb - sb
    n = a + b + c + d
    chi2 = n * (a * d - b * c) ** 2 / ((a + b) * (c + d) * (a + c) * (b + d))  # no Yates
    r = chi2_rates(sa, na, sb, nb)
    assert r.statistic == pytest.approx(chi2, rel=1e-12)
    assert r.p_value == pytest.approx(math.erfc(math.sqrt(chi2 / 2)), rel=1e-9)  # chi2(1 df) tail
    assert r.diff == pytest.approx(sb / nb - sa / na)
    assert r.ci_low < r.diff < r.ci_high


def test_chi2_rates_ci_is_newcombes_published_example():
    # Newcombe (1998), Stat Med 17:873, example 56/70 vs 48/80: method 10 gives 0.0524 to 0.3339.
    r = chi2_rates(48, 80, 56, 70)
    assert r.diff == pytest.approx(0.2)
    assert (round(r.ci_low, 4), round(r.ci_high, 4)) == (0.0524, 0.3339)


def test_chi2_rates_degenerate_and_invalid_tables():
    assert chi2_rates(0, 100, 0, 120).p_value == 1.0
    with pytest.raises(ValueError):
        chi2_rates(5, 4, 1, 10)
    with pytest.raises(ValueError):
        chi2_rates(0, 0, 1, 10)


def test_user_level_on_plain_values_is_welchs_statistic():
    rng = np.random.default_rng(3)
    a, b = rng.exponential(1.0, 800), rng.exponential(1.15, 900)
    r = user_level(a, b)
    welch = stats.ttest_ind(b, a, equal_var=False)
    assert r.statistic == pytest.approx(welch.statistic, rel=1e-9)
    assert r.p_value == pytest.approx(welch.pvalue, abs=2e-3)  # normal vs t tail at ~1700 df
    with pytest.raises(ValueError):
        user_level(([1.0, 2.0], [1.0]), ([1.0, 2.0], [1.0, 1.0]))


def test_delta_method_ci_covers_the_true_ratio_difference():
    # Revenue per impression: per-user impressions vary, clicks share a user propensity, revenue
    # per click is lognormal. True ratio = E[revenue]/E[impressions] = mean CTR * mean revenue/click.
    rng = np.random.default_rng(7)
    reps, users, covered = 1000, 2000, 0
    true_a, true_b = 0.10 * 20.0, 0.11 * 20.0
    for _ in range(reps):
        arms = []
        for ctr in (0.10, 0.11):
            x = 1 + rng.poisson(3, users)
            clicks = rng.binomial(x, rng.beta(ctr * 2, (1 - ctr) * 2, users))
            revenue = clicks * rng.lognormal(math.log(20.0) - 0.5, 1.0, users)  # mean 20 per click
            arms.append((revenue, x))
        r = user_level(*arms)
        covered += r.ci_low <= true_b - true_a <= r.ci_high
    print(f"\ndelta-method 95% CI coverage over {reps} synthetic experiments: {covered / reps:.3f}")
    assert 0.93 <= covered / reps <= 0.97


def test_srm_flags_a_52_48_split_but_not_a_fair_one():
    p, flagged = srm({"A": 52_000, "B": 48_000}, {"A": 0.5, "B": 0.5})
    assert flagged and p < 1e-30
    p, flagged = srm({"A": 50_100, "B": 49_900}, {"A": 0.5, "B": 0.5})
    assert not flagged and p > 0.3
    assert not srm({"A": 90_050, "B": 9_950}, {"A": 9, "B": 1})[1]  # unequal weights honoured
    with pytest.raises(ValueError):
        srm({"A": 10}, {"B": 1.0})


def test_promotion_is_refused_with_reasons_unless_forced():
    ok, why = promotion_decision(3, 0.01, 0.5)
    assert not ok and "too young" in why
    ok, why = promotion_decision(10, 0.2, 0.5)
    assert not ok and "not significant" in why
    ok, why = promotion_decision(10, 0.01, 1e-6)
    assert not ok and "sample ratio mismatch" in why
    ok, why = promotion_decision(2, 0.3, 1e-9)
    assert not ok and all(s in why for s in ("too young", "not significant", "sample ratio mismatch"))
    ok, why = promotion_decision(2, 0.3, 0.5, force=True)
    assert ok and why.startswith("forced despite") and "too young" in why
    assert promotion_decision(7, 0.01, 0.5) == (True, "significant (p=0.01) after 7 days, no SRM")


@pytest.fixture(scope="module")
def impressions():
    assert DATA.is_file(), f"real replay data missing: {DATA}"  # fail, never skip
    imp = session_impressions(DATA)
    assert len(imp) > 10_000 and imp.min() >= 1
    return imp


BASE_CTR, LIFT = 0.10, 0.10  # +10% relative lift on a 10% per-impression CTR


def test_aa_false_positive_rate_user_level_vs_naive(impressions):
    runs = 2000
    p = simulate(impressions, runs, BASE_CTR, lift=0.0, seed=11)
    fpr_user, fpr_naive = (p["user_level"] < 0.05).mean(), (p["naive"] < 0.05).mean()
    print(f"\nA/A over {runs} runs, {len(impressions)} real users, mean {impressions.mean():.2f} "
          f"impressions/user: user-level (delta) FPR={fpr_user:.4f}, "
          f"naive per-impression chi-squared FPR={fpr_naive:.4f} (alpha=0.05)")
    assert 0.03 <= fpr_user <= 0.07
    assert fpr_naive > 0.10 and fpr_naive > fpr_user + 0.05  # correlated impressions inflate it


def test_power_with_a_known_lift_matches_the_analytic_power(impressions):
    runs = 1000
    p = simulate(impressions, runs, BASE_CTR, lift=LIFT, seed=12)
    power = (p["user_level"] < 0.05).mean()
    expected = analytic_power(impressions, BASE_CTR, LIFT)
    print(f"\n+{LIFT:.0%} relative lift over {runs} runs: empirical power={power:.3f}, "
          f"analytic power={expected:.3f}")
    assert 0.3 < expected < 0.9  # a regime where the comparison is informative
    assert abs(power - expected) <= 0.08


def test_user_level_moments_equals_user_level_on_arrays():
    from recstream.experiments.stats import _moments, user_level_moments

    rng = np.random.default_rng(11)
    arms = []
    for ctr in (0.10, 0.12):
        x = (1 + rng.poisson(3, 700)).astype(float)
        arms.append((rng.binomial(x.astype(int), ctr).astype(float), x))
    ref = user_level(*arms)
    got = user_level_moments(_moments(*arms[0]), _moments(*arms[1]))
    for f in ("rate_a", "rate_b", "diff", "ci_low", "ci_high", "statistic", "p_value"):
        assert getattr(got, f) == pytest.approx(getattr(ref, f), rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError):
        user_level_moments((1, 1, 1, 1, 1, 1), _moments(*arms[1]))
