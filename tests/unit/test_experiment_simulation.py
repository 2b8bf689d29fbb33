"""A/B validation by simulation: real users replayed through two variants with a click model.

Users are the sessions of the YooChoose sample in ../shared/data, each with its real number of
clicks as impressions. Each run is a new experiment (a new id, so the hash assignment reshuffles
the users), and each user gets a click propensity from a Beta around the variant's CTR, so one
user's impressions are correlated, as real users' are.

1. The whole path, on a few runs: exposures and click events through the attribution core, the
   totals it keeps, the analysis the report prints; its p-values must equal the tests computed
   directly on the simulated per-user arrays.
2. Many runs (recstream.experiments.simulation: the same hash assignment and tests): over A/A runs the false-
   positive rate of the tests the analysis uses is close to 5%, the naive per-impression test's
   is not; with a known lift the user-level test's power matches the analytic power.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from recstream.experiments import analysis
from recstream.experiments.assignment import unit_for
from recstream.experiments.attribution import ALL_EXPERIMENT, State, VariantTotals, step
from recstream.experiments.definition import loads
from recstream.experiments.simulation import clicks as draw_clicks
from recstream.experiments.simulation import in_b, replay_runs
from recstream.experiments.stats import analytic_power, chi2_rates, session_impressions, user_level
from schemas import Event, Exposure

DATA = (Path(__file__).resolve().parents[2].parent / "shared" / "data"
        / "yoochoose-clicks-100k" / "yoochoose-clicks-100k_train_full.txt")
T0 = 1_700_000_000.0
BASE_CTR, CONCENTRATION = 0.10, 2.0


@pytest.fixture(scope="module")
def impressions() -> np.ndarray:
    assert DATA.is_file(), f"real replay data missing: {DATA}"   # fail, never skip
    imp = session_impressions(DATA)
    assert len(imp) > 10_000
    return imp


def experiment(eid: str):
    return loads(f"""
version = 1
[[experiments]]
id = "{eid}"
layer = "sim"
start = {T0 - 86400}
end = {T0 + 30 * 86400}
traffic = 1.0
[[experiments.variants]]
name = "A"
weight = 0.5
[[experiments.variants]]
name = "B"
weight = 0.5
""").get(eid)


def replay(eid: str, imp: np.ndarray, b: np.ndarray, clicks: np.ndarray) -> dict[str, VariantTotals]:
    """Every impression as an Exposure, every click as an Event citing it, through the attribution core."""
    records = []
    for i, (n, k) in enumerate(zip(imp, clicks)):
        variant = "B" if b[i] else "A"
        for j in range(n):
            rid, ts = f"{eid}-{i}-{j}", T0 + i + j * 0.001
            records.append(Exposure(request_id=rid, ts=ts, kind="homepage", unit=unit_for(f"y{i}"), user_id=f"y{i}",
                                    experiments={eid: variant}, items=("p1", "p2"), positions=(1, 2), status="ok",
                                    latency_ms=12.0))
            if j < k:   # which of a user's impressions were clicked does not change the per-user totals
                records.append(Event(event_id=f"c-{rid}", user_id=f"y{i}", session_id=f"s{i}", product_id="p2",
                                     event_type="click", timestamp=ts + 0.0005, rec_request_id=rid))
    changes = step(records, State(), window_s=1800)
    return {v: VariantTotals.from_fields(c) for (e, v), c in changes.totals.items() if e != ALL_EXPERIMENT}


@pytest.mark.parametrize("lift", [0.0, 0.5])
def test_the_pipeline_gives_the_tests_of_the_simulated_users(impressions, lift):
    imp = impressions[:3000]
    eid = f"sim-pipeline-{lift}"
    b = in_b(eid, len(imp))
    clicks = draw_clicks(np.random.default_rng(5), imp, b, BASE_CTR, lift, CONCENTRATION)
    totals = replay(eid, imp, b, clicks)
    an = analysis.analyse(experiment(eid), totals, now_s=T0)

    assert an.units == {"A": int((~b).sum()), "B": int(b.sum())}
    assert an.impressions == {"A": int(imp[~b].sum()), "B": int(imp[b].sum())}
    direct = user_level((clicks[~b], imp[~b]), (clicks[b], imp[b]))
    got = an.test("ctr_per_impression", "B").comparison
    assert math.isclose(got.p_value, direct.p_value, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(got.diff, direct.diff, rel_tol=1e-9)
    users = chi2_rates(int((clicks[~b] > 0).sum()), int((~b).sum()), int((clicks[b] > 0).sum()), int(b.sum()))
    assert math.isclose(an.test("ctr", "B").comparison.p_value, users.p_value, rel_tol=1e-9, abs_tol=1e-12)
    print(f"\nlift {lift:+.0%}: {len(imp)} real users, {imp.sum()} impressions through the attribution core; "
          f"CTR A {got.rate_a:.4f} B {got.rate_b:.4f}, user-level p={got.p_value:.4g}, "
          f"chi2 on users p={users.p_value:.4g}, SRM p={an.srm_p:.3f}")
    if lift:
        assert got.p_value < 0.05


def test_aa_runs_have_a_false_positive_rate_near_5_percent(impressions):
    imp = impressions[:5000]
    runs = 600
    p = replay_runs(imp, runs, BASE_CTR, 0.0, CONCENTRATION, seed=21)
    fpr = {k: float((v < 0.05).mean()) for k, v in p.items()}
    print(f"\nA/A, {runs} runs of {len(imp)} real users (hash assignment, Beta click model): false-positive rate "
          f"chi2 on users {fpr['chi2_users']:.3f}, user-level delta {fpr['user_level']:.3f}, "
          f"naive per-impression chi2 {fpr['naive']:.3f} (alpha 0.05)")
    # 600 runs: the standard error of a 5% rate is 0.9 points
    assert 0.025 <= fpr["chi2_users"] <= 0.075 and 0.025 <= fpr["user_level"] <= 0.075
    assert fpr["naive"] > 0.10


def test_a_known_lift_is_detected_at_the_expected_power(impressions):
    imp = impressions[:5000]
    runs = 400
    lift = 0.2
    p = replay_runs(imp, runs, BASE_CTR, lift, CONCENTRATION, seed=22)
    power = float((p["user_level"] < 0.05).mean())
    expected = analytic_power(imp, BASE_CTR, lift, CONCENTRATION)
    print(f"\n+{lift:.0%} relative CTR lift, {runs} runs of {len(imp)} real users: user-level power {power:.3f} "
          f"(analytic {expected:.3f}); chi2 on users power {(p['chi2_users'] < 0.05).mean():.3f}")
    assert 0.3 < expected < 0.9
    assert abs(power - expected) <= 0.08
