"""A/B validation by simulation (pure): real users replayed through two variants with a click model.

Users are given with their real number of impressions (e.g. the clicks of each YooChoose session).
Each run is a new experiment id, so the production hash assignment (recstream.experiments.assignment)
reshuffles the users; each user draws a click propensity from a Beta around its variant's CTR, so one
user's impressions are correlated as real users' are; clicks ~ Binomial(impressions, propensity).
Per run, three tests of B against A: chi-squared on users (clicked at least once: what the analysis
uses for CTR), the user-level delta method (CTR per impression) and the naive per-impression
chi-squared (the reference that treats impressions as independent).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from recstream.experiments.assignment import bucket, unit_for
from recstream.experiments.stats import _delta_ratio, chi2_rates

TESTS = ("chi2_users", "user_level", "naive")


def in_b(experiment_id: str, n_users: int) -> np.ndarray:
    """Which users variant B gets in a 50/50 experiment: the assignment's own hash of user + experiment."""
    return np.fromiter((bucket(unit_for(f"y{i}"), "experiment:" + experiment_id) >= 0.5 for i in range(n_users)),
                       bool, n_users)


def clicks(rng: np.random.Generator, impressions: np.ndarray, b: np.ndarray, base_rate: float, lift: float,
           concentration: float) -> np.ndarray:
    """Clicks per user: Binomial(impressions, propensity), propensity ~ Beta around the variant's CTR."""
    def beta(mean: float) -> np.ndarray:
        return rng.beta(mean * concentration, (1 - mean) * concentration, len(impressions))
    p = np.where(b, beta(base_rate * (1 + lift)), beta(base_rate))
    return rng.binomial(impressions, p)


def replay_runs(impressions: np.ndarray, runs: int, base_rate: float, lift: float = 0.0,
                concentration: float = 2.0, seed: int = 0) -> dict[str, np.ndarray]:
    """p-values per run of each test in TESTS."""
    rng = np.random.default_rng(seed)
    imp = np.asarray(impressions, np.int64)
    x = imp.astype(float)
    out: dict[str, list[float]] = {t: [] for t in TESTS}
    for r in range(runs):
        b = in_b(f"sim-{seed}-{r}", len(imp))
        y = clicks(rng, imp, b, base_rate, lift, concentration).astype(float)
        arms = []
        for m in (~b, b):
            ys, xs = y[m], x[m]
            arms.append((len(ys), ys.sum(), xs.sum(), (ys * ys).sum(), (xs * xs).sum(), (xs * ys).sum(),
                         int((ys > 0).sum())))
        (ra, va), (rb, vb) = _delta_ratio(*arms[0][:6]), _delta_ratio(*arms[1][:6])
        out["user_level"].append(2 * stats.norm.sf(abs(rb - ra) / math.sqrt(va + vb)))
        out["chi2_users"].append(chi2_rates(arms[0][6], arms[0][0], arms[1][6], arms[1][0]).p_value)
        out["naive"].append(chi2_rates(int(arms[0][1]), int(arms[0][2]), int(arms[1][1]), int(arms[1][2])).p_value)
    return {k: np.array(v) for k, v in out.items()}
