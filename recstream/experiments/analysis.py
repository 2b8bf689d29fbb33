"""An experiment's analysis (pure): per-variant metrics, tests against control, SRM, guardrails and
the promotion decision, from the attribution's per-variant totals.

Which test each metric uses, and why (recstream.experiments.stats has the tests):
- CTR, add-to-cart rate, conversion rate: the chi-squared test the design names, on *users*:
  clicked (added, bought) at least once or not, one independent outcome per randomisation unit.
  The same rates per impression are reported with a user-level confidence interval (delta method
  on per-user totals): a per-impression chi-squared would treat one user's impressions as
  independent and overstate significance (the simulation tests measure by how much).
- Revenue per impression: not a rate (unbounded, heavy-tailed), so no chi-squared: the delta
  method on per-user revenue and impression totals, z-test.
- Guardrails, fallback rate and error rate per impression: chi-squared on impressions. A guardrail
  significantly worse than control's blocks promotion. p99 latency is reported, not tested.
- Assignment health: SRM, chi-squared goodness of fit of units per variant against the weights.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, Self

from recstream.experiments.definition import Experiment
from recstream.experiments.stats import SRM_ALPHA, Comparison, chi2_rates, promotion_decision, srm, user_level_moments

DAY_S = 86_400.0
# metric -> (impression numerator, per-user "at least once" counter); revenue has no chi-squared
METRICS = {"ctr": ("clicked", "units_clicked"), "add_to_cart_rate": ("carted", "units_carted"),
           "conversion_rate": ("bought", "units_bought"), "revenue_per_impression": ("revenue", None)}
GUARDRAILS = ("fallback_rate", "error_rate")   # per impression: any fallback; fallback after an error


class Totals(Protocol):
    """What the attribution keeps per variant (recstream.experiments.attribution.VariantTotals): read-only
    fields (VariantTotals is frozen) and a sum with another of the same class."""
    @property
    def units(self) -> int: ...
    @property
    def impressions(self) -> int: ...
    @property
    def units_clicked(self) -> int: ...
    @property
    def units_carted(self) -> int: ...
    @property
    def units_bought(self) -> int: ...
    @property
    def fallback_deadline(self) -> int: ...
    @property
    def fallback_error(self) -> int: ...

    def rates(self) -> dict[str, float]: ...

    def __add__(self, other: Self) -> Self: ...

    def moments(self, metric: str) -> tuple[float, float, float, float, float, float]: ...


@dataclass(frozen=True)
class Test:
    metric: str
    variant: str
    test: str            # which test gave the p-value
    comparison: Comparison
    interval: str        # what the CI is on


@dataclass(frozen=True)
class Analysis:
    experiment: Experiment
    control: str
    metric: str                          # the metric that decides promotion
    rates: dict[str, dict[str, float]]   # variant -> metric -> value
    units: dict[str, int]
    impressions: dict[str, int]
    tests: list[Test]
    srm_p: float
    days_run: float

    @property
    def srm_flagged(self) -> bool:
        return self.srm_p < SRM_ALPHA

    def test(self, metric: str, variant: str) -> Test | None:
        return next((t for t in self.tests if t.metric == metric and t.variant == variant), None)


def days_run(e: Experiment, now_s: float) -> float:
    return max(0.0, min(now_s, e.end_s) - e.start_s) / DAY_S


def analyse(e: Experiment, totals: Mapping[str, Totals], now_s: float, metric: str = "ctr",
            alpha: float = 0.05) -> Analysis:
    """Every variant against the experiment's control; variants without exposures count as 0 units."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    names = [v.name for v in e.variants]
    units = {v: int(totals[v].units) if v in totals else 0 for v in names}
    impressions = {v: int(totals[v].impressions) if v in totals else 0 for v in names}
    rates = {v: totals[v].rates() for v in names if v in totals}
    weights = {v.name: v.weight for v in e.variants}
    srm_p = srm(units, weights)[0] if sum(units.values()) > 0 else 1.0
    tests: list[Test] = []
    a = totals.get(e.control)
    for v in names:
        b = totals.get(v)
        if v == e.control or a is None or b is None or min(a.units, b.units) < 2:
            continue
        for m, (_, per_user) in METRICS.items():
            if per_user is not None:
                tests.append(Test(m, v, "chi2 on users", chi2_rates(getattr(a, per_user), a.units,
                                                                    getattr(b, per_user), b.units, alpha),
                                  "share of users, b - a"))
            else:
                tests.append(Test(m, v, "delta method (user level)",
                                  user_level_moments(a.moments(m), b.moments(m), alpha), "per impression, b - a"))
            if per_user is not None:   # the per-impression rate's user-level interval, for reading
                tests.append(Test(m + "_per_impression", v, "delta method (user level)",
                                  user_level_moments(a.moments(m), b.moments(m), alpha), "per impression, b - a"))
        for g in GUARDRAILS:
            fa, fb = _guardrail_count(a, g), _guardrail_count(b, g)
            if a.impressions and b.impressions:
                tests.append(Test(g, v, "chi2 on impressions", chi2_rates(fa, a.impressions, fb, b.impressions, alpha),
                                  "per impression, b - a"))
    return Analysis(e, e.control, metric, rates, units, impressions, tests, srm_p, days_run(e, now_s))


def _guardrail_count(t: Totals, name: str) -> int:
    return t.fallback_deadline + t.fallback_error if name == "fallback_rate" else t.fallback_error


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


def decide(an: Analysis, variant: str, force: bool = False, alpha: float = 0.05) -> Decision:
    """May `variant` be promoted? The control always may (nothing changes); any other variant needs
    the promotion metric significantly better than control's, 7 days, no SRM and no guardrail
    significantly worse, unless forced (then the reasons are kept in the decision)."""
    if variant == an.control:
        return Decision(True, f"{variant} is the control: production stays as it is")
    t = an.test(an.metric, variant)
    reasons = []
    if t is None:
        reasons.append(f"no data to compare {variant} with {an.control} yet")
        p = 1.0
    else:
        p = t.comparison.p_value
        if t.comparison.diff <= 0 and p < alpha:
            reasons.append(f"{an.metric} is significantly worse than {an.control}'s")
        elif t.comparison.diff <= 0:
            reasons.append(f"{an.metric} is not better than {an.control}'s")
    for g in GUARDRAILS:
        gt = an.test(g, variant)
        if gt is not None and gt.comparison.diff > 0 and gt.comparison.p_value < alpha:
            reasons.append(f"guardrail {g} is significantly worse ({gt.comparison.rate_b:.4f} vs "
                           f"{gt.comparison.rate_a:.4f}, p={gt.comparison.p_value:.3g})")
    gate_ok, gate = promotion_decision(round(an.days_run, 2), p, an.srm_p, alpha)
    if not gate_ok:
        reasons.append(gate)
    if not reasons:
        return Decision(True, gate)
    if force:
        return Decision(True, "forced despite: " + "; ".join(reasons))
    return Decision(False, "; ".join(reasons))


# -- presentation -----------------------------------------------------------------------------------

def table(an: Analysis) -> str:
    """The report's text: per-variant metrics, then each comparison with its test, CI and p-value."""
    cols = ("ctr", "add_to_cart_rate", "conversion_rate", "revenue_per_impression", "p99_latency_ms",
            "fallback_rate", "error_rate")
    names = ("CTR", "add-to-cart", "conversion", "revenue/impr", "p99 ms", "fallback", "errors")
    head = f"{'variant':16} {'units':>8} {'impr.':>9} " + " ".join(f"{c:>12}" for c in names)
    lines = ["per impression:", head, "-" * len(head)]
    for v in an.units:
        r = an.rates.get(v, {})
        cells = " ".join(f"{_fmt(r.get(c, math.nan)):>12}" for c in cols)
        lines.append(f"{(v + ('*' if v == an.control else ''))[:16]:16} {an.units[v]:>8} {an.impressions[v]:>9} {cells}")
    lines += ["* control", "", f"{'metric':32} {'variant':12} {'test':26} {'on':22} {'diff (b - a)':>12} "
                                f"{'95% CI':>24} {'p':>9}"]
    for t in an.tests:
        c = t.comparison
        ci = f"[{_fmt(c.ci_low)}, {_fmt(c.ci_high)}]"
        on = "share of users" if t.interval.startswith("share") else "per impression"
        lines.append(f"{t.metric:32} {t.variant[:12]:12} {t.test:26} {on:22} {_fmt(c.diff):>12} {ci:>24} "
                     f"{c.p_value:>9.4g}")
    lines.append("")
    srm = " FLAGGED: assignment is broken, do not trust the results" if an.srm_flagged else " (ok)"
    lines.append(f"SRM: p={an.srm_p:.4g}{srm}; "
                 f"{an.days_run:.2f} days run; promotion metric {an.metric}")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.0f}"


def series(daily_by_variant: Mapping[str, Mapping[str, Totals]], metrics: Sequence[str]
           ) -> dict[str, dict[str, list[tuple[str, float]]]]:
    """metric -> variant -> [(UTC day, value over every day up to it)]: what the report plots."""
    out: dict[str, dict[str, list[tuple[str, float]]]] = {m: {} for m in metrics}
    for variant, daily in daily_by_variant.items():
        running = None
        for day in sorted(daily):
            running = daily[day] if running is None else running + daily[day]
            r = running.rates()
            for m in metrics:
                out[m].setdefault(variant, []).append((day, r.get(m, math.nan)))
    return out


def plot(an: Analysis, daily_by_variant: Mapping[str, Mapping[str, Totals]], path: str | os.PathLike[str]) -> None:
    """Cumulative metrics by UTC day, one line per variant: a panel per metric and guardrail."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("ctr", "add_to_cart_rate", "conversion_rate", "revenue_per_impression", "fallback_rate",
               "p99_latency_ms")
    data = series(daily_by_variant, metrics)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7), constrained_layout=True)
    for ax, m in zip(axes.flat, metrics):
        for variant, points in sorted(data[m].items()):
            if points:
                days, values = zip(*points)
                ax.plot(days, values, marker="o", label=variant + (" (control)" if variant == an.control else ""))
        ax.set_title(m.replace("_", " ") + " (cumulative)")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"experiment {an.experiment.id}: {an.experiment.description}"[:120])
    fig.savefig(path, dpi=110)
    plt.close(fig)

