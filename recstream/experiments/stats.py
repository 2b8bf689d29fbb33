"""A/B-test statistics for recommendation variants: rate tests, user-level ratios, SRM, promotion.

Which test each metric uses, and why:
- CTR, add-to-cart rate, conversion rate *per user* (each user counted once: clicked/added/bought
  or not): a binary outcome per randomisation unit, so units are independent -> `chi2_rates`.
- The same rates *per impression* (clicks / impressions) when users see several impressions:
  randomisation is by user, so one user's impressions are correlated (a keen clicker clicks
  many). A per-impression chi-squared treats them as independent and overstates significance
  (the simulation tests show its false-positive rate far above alpha) -> `user_level`, the delta
  method on per-user totals for the ratio of sums (Deng, Knoblich & Lu, "Applying the Delta
  Method in Metric Analytics", KDD 2018).
- Revenue per impression: not a rate (unbounded, heavy-tailed) so chi-squared does not apply ->
  `user_level` with per-user revenue and impression totals (the same delta method).
- Assignment health: `srm`; promotion gate: `promotion_decision`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from scipy import stats

SRM_ALPHA = 0.001  # common SRM threshold (Fabijan et al., "Diagnosing Sample Ratio Mismatch", KDD 2019)


@dataclass(frozen=True)
class Comparison:
    rate_a: float
    rate_b: float
    diff: float          # b - a
    ci_low: float        # 95% (or 1 - alpha) interval on diff
    ci_high: float
    statistic: float     # chi-squared (1 df) or z
    p_value: float


def _wilson(s: float, n: float, z: float) -> tuple[float, float]:
    # Wilson score interval (Wilson 1927): Newcombe's building block.
    p = s / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


def chi2_rates(successes_a: int, trials_a: int, successes_b: int, trials_b: int,
               alpha: float = 0.05) -> Comparison:
    """Pearson chi-squared on the 2x2 table, *without* Yates' correction.

    Yates' correction is conservative (p-values too large, FPR below alpha) at the sample sizes
    of online experiments; the uncorrected test equals the pooled two-proportion z-test (z^2 = chi2).
    CI on b - a: Newcombe's hybrid score interval (Newcombe 1998, method 10), which keeps
    coverage near nominal for small rates where Wald's interval undercovers.
    """
    if min(trials_a, trials_b) <= 0:
        raise ValueError("both variants need trials")
    table = np.array([[successes_a, trials_a - successes_a], [successes_b, trials_b - successes_b]])
    if (table < 0).any():
        raise ValueError("successes must lie in [0, trials]")
    pa, pb = successes_a / trials_a, successes_b / trials_b
    if table.sum(axis=0).min() == 0:  # all successes or all failures: no evidence of a difference
        chi2, p = 0.0, 1.0
    else:
        chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
    z = stats.norm.ppf(1 - alpha / 2)
    la, ua = _wilson(successes_a, trials_a, z)
    lb, ub = _wilson(successes_b, trials_b, z)
    d = pb - pa
    return Comparison(pa, pb, d, d - math.hypot(pb - lb, ua - pa), d + math.hypot(ub - pb, pa - la),
                      float(chi2), float(p))


# Moment sums: one experiment's (floats) or many experiments' at once (arrays, elementwise).
_Sums = TypeVar("_Sums", float, npt.NDArray[np.float64])


def _delta_ratio(n: _Sums, sy: _Sums, sx: _Sums, syy: _Sums, sxx: _Sums, sxy: _Sums) -> tuple[_Sums, _Sums]:
    """Ratio of sums sum(y)/sum(x) and its delta-method variance from per-user moment sums.

    Var(Ybar/Xbar) ~ (s_yy/Xbar^2 - 2 Ybar s_xy/Xbar^3 + Ybar^2 s_xx/Xbar^4) / n
    (Deng et al. 2018, eq. 4), sample (co)variances with ddof=1. Works elementwise on arrays,
    so the simulations evaluate thousands of experiments in one call.
    """
    my, mx = sy / n, sx / n
    vyy = (syy - n * my * my) / (n - 1)
    vxx = (sxx - n * mx * mx) / (n - 1)
    vxy = (sxy - n * my * mx) / (n - 1)
    r = my / mx
    return r, (vyy - 2 * r * vxy + r * r * vxx) / (n * mx * mx)


def _moments(y: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> Moments:
    return len(y), y.sum(), x.sum(), (y * y).sum(), (x * x).sum(), (x * y).sum()


def user_level(values_a: npt.ArrayLike | tuple[npt.ArrayLike, npt.ArrayLike],
               values_b: npt.ArrayLike | tuple[npt.ArrayLike, npt.ArrayLike], alpha: float = 0.05) -> Comparison:
    """User-level test of a per-impression metric, randomised by user: delta method, z-test.

    `values_x` is a pair (numerators, denominators) of per-user totals, e.g. (clicks, impressions)
    or (revenue, impressions): the metric is the ratio of sums. A 1-D array of per-user values
    is taken with denominators 1 (a plain mean); then the z statistic equals Welch's t.
    """
    def split(v: npt.ArrayLike | tuple[npt.ArrayLike, npt.ArrayLike]
              ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        if isinstance(v, tuple):
            y, x = (np.asarray(a, dtype=float) for a in v)
        else:
            y = np.asarray(v, dtype=float)
            x = np.ones_like(y)
        if y.shape != x.shape or y.ndim != 1 or len(y) < 2:
            raise ValueError("need >= 2 users with matching numerators and denominators")
        return y, x

    ra, va = _delta_ratio(*_moments(*split(values_a)))
    rb, vb = _delta_ratio(*_moments(*split(values_b)))
    d, se = rb - ra, math.sqrt(va + vb)
    z = stats.norm.ppf(1 - alpha / 2)
    stat = d / se if se > 0 else 0.0
    return Comparison(float(ra), float(rb), float(d), float(d - z * se), float(d + z * se),
                      float(stat), float(2 * stats.norm.sf(abs(stat))))


Moments = tuple[float, float, float, float, float, float]  # (n, sum y, sum x, sum y^2, sum x^2, sum x*y)


def user_level_moments(a: Moments, b: Moments, alpha: float = 0.05) -> Comparison:
    """`user_level` from per-user moment sums instead of arrays: what a streaming aggregate keeps.

    `a`, `b`: (n users, sum y, sum x, sum y^2, sum x^2, sum x*y) over the users of each variant
    (e.g. `VariantTotals.moments("ctr")` of recstream.experiments.attribution); same delta method.
    """
    if min(a[0], b[0]) < 2 or min(a[2], b[2]) <= 0:
        raise ValueError("need >= 2 users and a positive denominator sum in each variant")
    ra, va = _delta_ratio(*(float(v) for v in a))
    rb, vb = _delta_ratio(*(float(v) for v in b))
    d, se = rb - ra, math.sqrt(max(va, 0.0) + max(vb, 0.0))  # sums of squares may round a hair below 0
    z = stats.norm.ppf(1 - alpha / 2)
    stat = d / se if se > 0 else 0.0
    return Comparison(float(ra), float(rb), float(d), float(d - z * se), float(d + z * se),
                      float(stat), float(2 * stats.norm.sf(abs(stat))))


def srm(observed_counts: Mapping[str, float], weights: Mapping[str, float]) -> tuple[float, bool]:
    """Sample-ratio-mismatch check: chi-squared goodness of fit of the assignment counts.

    Returns (p_value, flagged); flagged when p < 0.001 (Fabijan et al., KDD 2019): a strict
    threshold because the check runs on every experiment and a true SRM gives tiny p-values.
    """
    if set(observed_counts) != set(weights):
        raise ValueError("counts and weights must name the same variants")
    keys = sorted(observed_counts, key=str)
    obs = np.array([observed_counts[k] for k in keys], dtype=float)
    w = np.array([weights[k] for k in keys], dtype=float)
    if len(keys) < 2 or (w <= 0).any() or obs.sum() <= 0:
        raise ValueError("need >= 2 variants, positive weights and some users")
    p = float(stats.chisquare(obs, obs.sum() * w / w.sum()).pvalue)
    return p, p < SRM_ALPHA


def promotion_decision(days_run: float, p_value: float, srm_p: float, alpha: float = 0.05,
                       min_days: int = 7, force: bool = False) -> tuple[bool, str]:
    """May the winning variant be promoted? Refused, with every reason, unless forced.

    A minimum of 7 days covers a full weekly cycle (weekday/weekend behaviour) and dampens
    novelty effects; stopping on an early p < alpha ("peeking") inflates the false-positive rate.
    """
    reasons = []
    if days_run < min_days:
        reasons.append(f"too young: {days_run:g} of {min_days} days run")
    if not p_value < alpha:
        reasons.append(f"not significant: p={p_value:.4g} >= alpha={alpha:g}")
    if srm_p < SRM_ALPHA:
        reasons.append(f"sample ratio mismatch: p={srm_p:.3g} < {SRM_ALPHA:g}; assignment is broken")
    if not reasons:
        return True, f"significant (p={p_value:.4g}) after {days_run:g} days, no SRM"
    if force:
        return True, "forced despite: " + "; ".join(reasons)
    return False, "; ".join(reasons)


# --- simulation: replay real users through two variants with a click model -------------------

def session_impressions(path: str | Path) -> np.ndarray:
    """Per-user impression counts from a yoochoose clicks file (SessionId ItemId Time, tab-separated):
    each session is a user and each of its clicks an impression."""
    ids = np.loadtxt(path, skiprows=1, usecols=0, dtype=np.int64, delimiter="\t")
    return np.unique(ids, return_counts=True)[1]


def _beta_params(mean: float, concentration: float) -> tuple[float, float]:
    return mean * concentration, (1 - mean) * concentration


def simulate(impressions: np.ndarray, runs: int, base_rate: float, lift: float = 0.0,
             concentration: float = 2.0, seed: int = 0, chunk: int = 100) -> dict[str, np.ndarray]:
    """Replay users through A/B `runs` times; returns per-run p-values of both tests.

    Each run assigns users 50/50 by coin flip and draws each user's click propensity from a
    Beta(mean, concentration) (mean base_rate for A, base_rate*(1+lift) for B): impressions of
    one user share a propensity, so they are correlated (intra-user correlation 1/(concentration+1)).
    Clicks ~ Binomial(impressions, propensity).
    """
    rng = np.random.default_rng(seed)
    n = np.asarray(impressions, dtype=float)
    pa, pb = _beta_params(base_rate, concentration), _beta_params(base_rate * (1 + lift), concentration)
    user_p, naive_p = [], []
    for start in range(0, runs, chunk):
        r = min(chunk, runs - start)
        in_b = rng.random((r, len(n))) < 0.5
        prop = np.where(in_b, rng.beta(*pb, (r, len(n))), rng.beta(*pa, (r, len(n))))
        clicks = rng.binomial(n.astype(np.int64), prop).astype(float)
        arms = []
        for m in (~in_b, in_b):
            y, x = clicks * m, n * m
            arms.append((m.sum(1), y.sum(1), x.sum(1), (y * y).sum(1), (x * x).sum(1), (x * y).sum(1)))
        (ra, va), (rb, vb) = _delta_ratio(*arms[0]), _delta_ratio(*arms[1])
        user_p.append(2 * stats.norm.sf(np.abs(rb - ra) / np.sqrt(va + vb)))
        # Naive per-impression test: pooled two-proportion z, whose square is the uncorrected
        # 2x2 chi-squared of `chi2_rates` (vectorised here; equality checked in the tests).
        sa, sb, ia, ib = arms[0][1], arms[1][1], arms[0][2], arms[1][2]
        pool = (sa + sb) / (ia + ib)
        zn = (sb / ib - sa / ia) / np.sqrt(pool * (1 - pool) * (1 / ia + 1 / ib))
        naive_p.append(stats.chi2.sf(zn * zn, 1))
    return {"user_level": np.concatenate(user_p), "naive": np.concatenate(naive_p)}


def analytic_power(impressions: np.ndarray, base_rate: float, lift: float,
                   concentration: float = 2.0, alpha: float = 0.05) -> float:
    """Power of the two-sided user-level test under the `simulate` model (normal approximation).

    Per user, E[y|x] = mu x, so the delta-method variance is E[Var(y|x)] / (n_arm Xbar^2) with
    Var(y|x) = x(mu - mu^2 - v) + x^2 v, v = mu(1-mu)/(concentration+1) the Beta variance.
    """
    x = np.asarray(impressions, dtype=float)
    n_arm = len(x) / 2

    def var(mu: float) -> float:
        v = mu * (1 - mu) / (concentration + 1)
        return float(np.mean(x * (mu - mu * mu - v) + x * x * v) / (n_arm * x.mean() ** 2))

    mu_b = base_rate * (1 + lift)
    shift = (mu_b - base_rate) / math.sqrt(var(base_rate) + var(mu_b))
    z = stats.norm.ppf(1 - alpha / 2)
    return float(stats.norm.sf(z - shift) + stats.norm.cdf(-z - shift))
