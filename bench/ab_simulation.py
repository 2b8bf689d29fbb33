"""A/B statistics validated by simulation on real users, recorded with a plot.

Every YooChoose session of ../shared/data is a user with its real number of clicks as impressions;
each run is a new experiment id (the production hash assignment reshuffles the users) and a Beta
click model (recstream.experiments.simulation). Side by side in one run: the tests the analysis uses
(chi-squared on users for CTR, the user-level delta method for per-impression CTR) and the naive
per-impression chi-squared, the reference that treats impressions as independent.

Figures: the false-positive rate of each test over A/A runs; power by relative lift, with the
analytic power of the user-level test (normal approximation); the plot shows the A/A p-value
histograms (uniform when the test is calibrated) and the power curves.

    .venv/bin/python bench/ab_simulation.py            # writes bench/results/ab_simulation.{json,png}
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness  # noqa: E402
from recstream.experiments.simulation import TESTS, replay_runs  # noqa: E402
from recstream.experiments.stats import analytic_power, session_impressions  # noqa: E402

DATA = (Path(__file__).resolve().parents[2] / "shared" / "data" / "yoochoose-clicks-100k"
        / "yoochoose-clicks-100k_train_full.txt")
BASE_CTR, CONCENTRATION = 0.10, 2.0
LABELS = {"chi2_users": "chi-squared on users (CTR)", "user_level": "delta method, user level (CTR per impression)",
          "naive": "naive chi-squared per impression (reference)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=None, help="first N users only (default: all)")
    ap.add_argument("--aa-runs", type=int, default=1000)
    ap.add_argument("--power-runs", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    imp = session_impressions(DATA)[: args.users]
    print(f"{len(imp):,} real users, {imp.sum():,} impressions (mean {imp.mean():.2f}, max {imp.max()}); "
          f"base CTR {BASE_CTR}, Beta concentration {CONCENTRATION}")
    t0 = time.perf_counter()
    aa = replay_runs(imp, args.aa_runs, BASE_CTR, 0.0, CONCENTRATION, seed=1)
    fpr = {t: float((aa[t] < 0.05).mean()) for t in TESTS}
    se = (0.05 * 0.95 / args.aa_runs) ** 0.5
    print(f"A/A, {args.aa_runs} runs ({time.perf_counter() - t0:.0f} s); false-positive rate at alpha 0.05 "
          f"(standard error at a true 5%: {se:.3f}):")
    for t in TESTS:
        print(f"  {LABELS[t]:48} {fpr[t]:.3f}")

    lifts = [0.05, 0.10, 0.15, 0.20, 0.30]
    power: dict[str, list[float]] = {t: [] for t in TESTS}
    analytic = []
    print(f"power by relative CTR lift, {args.power_runs} runs each:")
    print(f"  {'lift':>6} " + " ".join(f"{t:>11}" for t in TESTS) + f" {'analytic':>10}")
    for k, lift in enumerate(lifts):
        p = replay_runs(imp, args.power_runs, BASE_CTR, lift, CONCENTRATION, seed=100 + k)
        for t in TESTS:
            power[t].append(float((p[t] < 0.05).mean()))
        analytic.append(analytic_power(imp, BASE_CTR, lift, CONCENTRATION))
        print(f"  {lift:>6.0%} " + " ".join(f"{power[t][-1]:>11.3f}" for t in TESTS) + f" {analytic[-1]:>10.3f}")

    harness.write_result("ab_simulation", {
        "users": int(len(imp)), "impressions": int(imp.sum()), "aa_runs": args.aa_runs,
        "power_runs": args.power_runs, "base_ctr": BASE_CTR, "concentration": CONCENTRATION,
        **{f"aa_fpr_{t}": fpr[t] for t in TESTS},
        "lifts": lifts, **{f"power_{t}": power[t] for t in TESTS}, "power_analytic_user_level": analytic},
        out=args.out / "ab_simulation.json")
    plot(aa, fpr, lifts, power, analytic, args.out / "ab_simulation.png", len(imp))
    print(f"wrote {args.out / 'ab_simulation.json'} and {args.out / 'ab_simulation.png'}")
    return 0


def plot(aa, fpr, lifts, power, analytic, path: Path, users: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    bins = np.linspace(0, 1, 21)
    for t in TESTS:
        axes[0].hist(aa[t], bins=bins, histtype="step", linewidth=1.8, density=True,
                     label=f"{LABELS[t]}: FPR {fpr[t]:.3f}")
    axes[0].axhline(1.0, color="grey", linestyle="--", linewidth=1, label="uniform (a calibrated test)")
    axes[0].set(title=f"A/A p-values, {len(aa[TESTS[0]])} runs of {users:,} real users", xlabel="p-value",
                ylabel="density")
    axes[0].legend(fontsize=7)
    x = [100 * lift for lift in lifts]
    for t in TESTS:
        axes[1].plot(x, power[t], marker="o", label=LABELS[t])
    axes[1].plot(x, analytic, linestyle="--", color="black", label="analytic power, user level")
    axes[1].axhline(0.05, color="grey", linewidth=0.8)
    axes[1].set(title="power by true relative CTR lift (alpha 0.05)", xlabel="lift (%)", ylabel="share of runs p < 0.05",
                ylim=(0, 1.02))
    axes[1].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
