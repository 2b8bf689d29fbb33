"""Our pipeline's hyper-parameters searched on each protocol's validation split (issue 17 item 4).

The same care the baselines get (bench/tune_baselines.py): a coordinate search over settings of ours,
every query of the validation split (or a seeded sample, --max-queries), the test split never made.
A configuration is a set of Settings fields over the protocol's current choice (ProtocolSpec.settings);
each is a whole `recstream evaluate --validation` run of ours (Spark ALS, the ranker, serving every
query through the agents' code), without the baselines, so it takes minutes, not seconds: the search
is coordinate-wise (one axis at a time, over the best so far) and small.

    .venv/bin/python bench/tune_ours.py --protocol movielens \\
        --axis als_rank=32,64,128 --axis als_reg=0.03,0.1,0.3,1 --axis als_alpha=1,10,40

Prints each configuration's primary metric (with its 95 % interval) and candidate recall, and writes
bench/results/ours_tuning.json (one entry per protocol, merged with the entries already there). The
choice is applied by hand to recstream/evaluation/protocols.py (ProtocolSpec.settings) with the figures
that chose it: a search records evidence, a person decides (a gain inside the interval is noise).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from cli import evaluate as ev  # noqa: E402
from recstream.evaluation import protocols as pr  # noqa: E402
from recstream.settings import Settings, load  # noqa: E402

RESULTS = harness.RESULTS_DIR / "ours_tuning.json"


def parse_axis(text: str, s: Settings) -> tuple[str, list[Any]]:
    """'als_rank=32,64' -> ("als_rank", [32, 64]), each value of the field's type."""
    name, sep, values = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(s)}
    if not sep or name not in fields:
        raise SystemExit(f"--axis {text!r}: expected FIELD=V1,V2,... with FIELD a Settings field")
    kind = type(getattr(s, name))
    return name, [kind(v) for v in values.split(",")]


def parse_set(text: str, s: Settings) -> tuple[str, Any]:
    """'fusion_weights=als=1,knn=1' -> ("fusion_weights", "als=1,knn=1"): one value, commas and all."""
    name, _ = parse_axis(text, s)
    value = text.partition("=")[2]
    return name, type(getattr(s, name))(value)


def score(s: Settings, split: pr.Split, config: dict[str, Any]) -> dict[str, Any]:
    """One validation run of ours with `config` over the protocol's chosen settings."""
    spec = pr.PROTOCOLS[split.protocol]
    pr.PROTOCOLS[split.protocol] = spec._replace(settings={**spec.settings, **config})
    try:
        t0 = time.perf_counter()
        result = ev.run(s, split, baselines=[], progress=lambda m: None)
    finally:
        pr.PROTOCOLS[split.protocol] = spec
    ours = {r.name: harness.down(r.metrics[split.primary], 4) for r in result.results}
    full = result.result("ours_full").metrics
    return {"config": config, split.primary: full[split.primary], "ci95": full.get(split.primary + "_ci95"),
            "orderings": ours, "candidate_recall": {k: harness.down(v, 4) for k, v in result.candidate_recall.items()},
            "seconds": harness.down(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", required=True, choices=[x for x in pr.PROTOCOLS if x != "new_items"])
    p.add_argument("--set", action="append", default=[], help="FIELD=V over the protocol's settings in every "
                   "configuration, e.g. cooccurrence_top_n=400 (repeat)")
    p.add_argument("--axis", action="append", default=[], help="FIELD=V1,V2,... (repeat; searched in this order)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--max-queries", type=int, default=None, help="sample the validation split to about this many")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    s = load()
    axes = [parse_axis(a, s) for a in args.axis]
    fixed = dict(parse_set(a, s) for a in args.set)
    t_all = time.perf_counter()
    split = pr.make_split(args.protocol, Path(args.data) / pr.PROTOCOLS[args.protocol].path, validation=True,
                          seed=pr.SEED, max_queries=args.max_queries)
    harness.log(f"== {args.protocol} (validation split): {len(split.train):,} training events, "
                f"{len(split.queries):,} queries, {split.primary}")
    base = {**pr.PROTOCOLS[args.protocol].settings, **fixed}
    pr.PROTOCOLS[args.protocol] = pr.PROTOCOLS[args.protocol]._replace(settings=base)
    tried: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}

    def record(current: dict[str, Any], best: dict[str, Any]) -> None:
        """The protocol's entry, written after every configuration (a search stopped early keeps its figures)."""
        old = json.loads(args.out.read_text())["figures"] if args.out.exists() else {}
        entry = {"primary": split.primary, "queries": len(split.queries), "max_queries": args.max_queries,
                 "base_settings": base, "current": current, "best": best, "tried": tried,
                 "axes": {n: v for n, v in axes}, "command": harness.command_line(),
                 "seconds": harness.down(time.perf_counter() - t_all, 1)}
        harness.write_json(args.out, harness.result(
            "ours_tuning", {**old, args.protocol: entry}, command=harness.command_line(),
            note="validation splits only (make_split(validation=True)); the test splits were not read"))

    def run(config: dict[str, Any]) -> dict[str, Any]:
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in seen:
            seen[key] = score(s, split, config)
            tried.append(seen[key])
            r = seen[key]
            harness.log(f"  {config or 'current settings'}: {split.primary} {r[split.primary]:.4f} "
                        f"(± {r['ci95'] or 0:.4f}); orderings {r['orderings']}; candidate recall "
                        f"{r['candidate_recall'].get('all', float('nan')):.4f} [{r['seconds']:.0f} s]")
            record(tried[0], max(tried, key=lambda x: x[split.primary]))
        return seen[key]

    current = run({})
    best = harness.coordinate_search(run, current, [[{name: v} for v in values] for name, values in axes],
                                     split.primary)
    harness.log(f"-> {args.protocol}: current {current[split.primary]:.4f}, best {best['config']} "
                f"{best[split.primary]:.4f} [{time.perf_counter() - t_all:.0f} s]; wrote {args.out}")


if __name__ == "__main__":
    main()
