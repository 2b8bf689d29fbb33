"""The demo's A/B test at a size that can decide: the full pipeline against trending only, on the embedded shop.

The generated shop knows each shopper's lasting tastes, so its click model is the truth: `recstream
demo`'s own set-up (shop replayed through Kafka into the feature agents, a training run, the retrieval
and ranking agents, the API's recommender), then its A/B test with more shoppers and visits. Shoppers
are assigned by the production hash, served, logged as exposures; they click with the demo's
position-biased model of their tastes (unchanged: 0.4 x taste share of the item's top category /
log2(position + 1)), then cart and buy; the attribution worker counts and the report's analysis
tests (chi-squared on users for CTR, the promotion test).

    .venv/bin/python bench/ab_shop.py [--users 3000 --visits 3]   # writes bench/results/ab_shop.json

Runs in its own topic prefix, app id, Redis namespace, model name and home dir (`benchab`). The
reference is the trending-only variant in the same run on the same shoppers.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from cli import demo  # noqa: E402
from recstream.settings import load  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ab_shop.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=3000, help="shoppers of the generated shop, all in the test (count)")
    p.add_argument("--products", type=int, default=1500, help="products of the generated shop (count)")
    p.add_argument("--visits", type=int, default=3, help="homepage visits per shopper (count)")
    p.add_argument("--seed", type=int, default=7, help="the shop's seed (the demo's)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    tag = "benchab"
    s = dataclasses.replace(load(), topic_prefix=tag, app_id=f"recstream-{tag}", redis_namespace=f"{tag}:",
                            model_name=f"bench-{tag}", home_dir=ROOT / ".local" / tag)
    report: dict = {}
    t0 = time.perf_counter()
    code = asyncio.run(demo.run(s, argparse.Namespace(users=args.users, products=args.products, seed=args.seed,
                                                      ab_shoppers=args.users, ab_visits=args.visits), report))
    an = report.get("ab")
    if an is None:
        print("ab_shop: the demo did not reach its A/B test", file=sys.stderr)
        return 1
    def test(metric: str):
        return next(t for t in an.tests if t.metric == metric and t.variant == "trending").comparison

    ctr, users = test("ctr_per_impression"), test("ctr")   # b - a: trending against the full pipeline (control)
    figures = {"ctr_full": ctr.rate_a, "ctr_trending": ctr.rate_b,
               "lift": ctr.rate_a / ctr.rate_b - 1 if ctr.rate_b else None,
               "p_value": ctr.p_value, "p_value_test": "delta method, user level (CTR per impression)",
               "users_clicking_full": users.rate_a, "users_clicking_trending": users.rate_b,
               "p_value_users_clicking": users.p_value, "units": an.units, "impressions": an.impressions,
               "srm_p": an.srm_p, "demo_checks_passed": code == 0, "seconds": round(time.perf_counter() - t0, 1)}
    harness.write_result("ab_shop", figures, out=args.out, config={"users": args.users, "products": args.products,
                                                                   "visits": args.visits, "seed": args.seed})
    print(json.dumps(figures, indent=2))
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
