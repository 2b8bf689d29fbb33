"""Can anything beat popularity on Groceries' basket completion? (issue 17: "if a protocol cannot be
won honestly, say why with numbers").

On the fbt protocol's VALIDATION split only, ranks every training item for each basket by its
training popularity plus lambda times one more signal, and reports HitRate@4 per lambda:
- `lift`:     the sum over the cart's items of log((co(a, i) + 1) * N / (n(a) n(i) + N)), the
              association rules' lift, smoothed;
- `cocount`:  log1p of the baskets holding i together with a cart item (item kNN's raw count);
- `history`:  log1p of how often this shopper bought i before (repeat purchases).
lambda = 0 is the popularity baseline. Ties go to popularity, as the baselines break them.

    .venv/bin/python bench/fbt_signals.py [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from bench import harness
from recstream.evaluation.core import Query
from recstream.evaluation.protocols import PROTOCOLS, make_split

LAMBDAS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=harness.ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    split = make_split("fbt", args.data / PROTOCOLS["fbt"].path, validation=True)
    pop = Counter(e.product_id for e in split.train)
    baskets: dict[tuple[str, str], set[str]] = defaultdict(set)
    bought: dict[str, Counter] = defaultdict(Counter)
    for e in split.train:
        baskets[(e.user_id, e.session_id)].add(e.product_id)
        bought[e.user_id][e.product_id] += 1
    together: dict[str, Counter] = defaultdict(Counter)
    for b in baskets.values():
        for a in b:
            together[a].update(b - {a})
    n = len(baskets)
    held = Counter(i for b in baskets.values() for i in b)

    def lift(q: Query, i: str) -> float:
        return sum(math.log((together[a][i] + 1) * n / (held[a] * held[i] + n)) for a in q.cart if a in held)

    signals: dict[str, Callable[[Query, str], float]] = {
        "lift": lift,
        "cocount": lambda q, i: math.log1p(sum(together[a][i] for a in q.cart)),
        "history": lambda q, i: math.log1p(bought[q.user_id][i]),
    }
    figures: dict[str, dict[str, float]] = {}
    for name, signal in signals.items():
        figures[name] = {}
        for lam in LAMBDAS:
            hits = 0
            for q in split.queries:
                scores = {i: math.log1p(pop[i]) + lam * signal(q, i) for i in pop if i not in q.exclude}
                top = sorted(scores, key=lambda i: (-scores[i], -pop[i], i))[:4]
                hits += bool(set(top) & q.targets)
            figures[name][str(lam)] = harness.down(hits / len(split.queries), 4)
            harness.log(f"{name} lambda {lam}: HitRate@4 {figures[name][str(lam)]} ({len(split.queries)} baskets)")
    harness.write_result("fbt_signals", {"queries": len(split.queries), "hitrate@4": figures})


if __name__ == "__main__":
    main()
