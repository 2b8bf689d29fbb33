"""The baselines' hyper-parameters searched on each protocol's validation split (issue 17 item 4, "tuned honestly").

A lift over an untuned baseline is not a lift (Ferrari Dacrema, Cremonesi & Jannach, "Are we really making
much progress?", RecSys 2019): the baselines get a search on the same validation splits that chose ours,
with a budget of the same order (10 to 30 configurations a baseline and protocol). Only the validation
split is ever made here (make_split(..., validation=True)), every query of it: a configuration takes seconds
on these splits (--max-queries samples a fixed, seeded set of users where that is too slow). Per protocol and
baseline: every configuration's primary metric, the default configuration's, and the chosen one (the best;
on a tie the one evaluated first, the default first of all). Where the best is at an edge of the grid, the
search steps on beyond it while that gains (LADDERS).

    .venv/bin/python bench/tune_baselines.py [--protocols homepage,session,fbt,movielens]
        [--baselines pop,iknn,vsknn,ials] [--max-queries N] [--only-default] [--no-write]

Writes bench/results/baseline_tuning.json and the chosen settings to recstream/evaluation/tuned_baselines.json,
which `recstream evaluate` and bench/evaluation.py read (cli.evaluate.default_baselines). new_items is not
searched: the held-out items are in no baseline's training but genre's, so pop, iknn, vsknn and ials rank
them all by the same seeded order, whatever their settings.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from recstream.evaluation import baselines as bl  # noqa: E402
from recstream.evaluation.core import Method, Split  # noqa: E402
from recstream.evaluation.metrics import evaluate  # noqa: E402
from recstream.evaluation.protocols import PROTOCOLS, SEED, make_split  # noqa: E402
from recstream.settings import Settings, load  # noqa: E402

Config = dict[str, Any]
SEARCHED = ("homepage", "session", "fbt", "movielens")


def defaults(s: Settings) -> dict[str, Config]:
    """The untuned configurations cli.evaluate.default_baselines builds (ALS at our rank and settings)."""
    return {"pop": {"window_days": None}, "iknn": {"neighbours": 100, "shrink": 0.0},
            "vsknn": {"k": 100, "sample": 500, "weighting": "div"},
            "ials": {"factors": s.als_rank, "regularization": s.als_reg, "alpha": s.als_alpha,
                     "iterations": s.als_iterations}}   # not searched, but kept with the choice: it was chosen at it


MAKE: dict[str, Callable[[Settings, Config], Method]] = {
    "pop": lambda s, c: bl.Popularity(**c),
    "iknn": lambda s, c: bl.ItemKNN(**c),
    "vsknn": lambda s, c: bl.SessionKNN(**c),
    "ials": lambda s, c: bl.ImplicitALS(**c),
}


def grid(**axes: list[Any]) -> list[Config]:
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


# Per baseline, the search in stages: each stage's configurations over the best of the stages before
# (coordinate search); the default configuration is evaluated first and is in every search.
STAGES: dict[str, list[list[Config]]] = {
    "pop": [grid(window_days=[None, 1.0, 7.0, 30.0])],                                                 # 4
    "iknn": [grid(neighbours=[20, 50, 100, 200, 400], shrink=[0.0, 10.0, 50.0, 100.0])],               # 20
    "vsknn": [grid(weighting=list(bl.POSITION_WEIGHTS)),                                                # 5
              grid(k=[50, 100, 200], sample=[500, 1000, 2500])],                                        # + 9
    "ials": [grid(factors=[32, 64, 128], regularization=[0.01, 0.1, 1.0], alpha=[1.0, 10.0, 40.0])],    # 27
}


# Where the best sits at an end of an axis the stages searched, the search goes on along it a step at a
# time while that gains (each axis in turn, the others at the best): a best at the grid's edge may not be one.
# Popularity's whole window (None) is its far end already. Added after the first run (22:23-22:34 UTC,
# 2026-12-06) chose edges of the grid on 12 of 16 searches.
LADDERS: dict[str, dict[str, list[Any]]] = {
    "pop": {"window_days": [0.25, 0.5, 1.0, 7.0, 30.0]},
    "iknn": {"neighbours": [10, 20, 50, 100, 200, 400, 800, 1600],
             "shrink": [0.0, 10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0]},
    "vsknn": {"k": [25, 50, 100, 200, 400], "sample": [250, 500, 1000, 2500, 5000, 10000]},
    "ials": {"factors": [16, 32, 64, 128, 256], "regularization": [0.001, 0.01, 0.1, 1.0, 10.0],
             "alpha": [0.25, 1.0, 10.0, 40.0, 100.0]},
}


def score(split: Split, method: Method) -> dict[str, float]:
    universe = {e.product_id for e in split.train}
    method.fit(split)
    lists = method.recommend(split.queries, split.max_k)
    return evaluate(split.queries, lists, split.ks, universe)


def tune(s: Settings, split: Split, name: str, only_default: bool, log: Callable[[str], None]) -> dict[str, Any]:
    default = defaults(s)[name]
    tried: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}

    def run(config: Config) -> dict[str, Any]:
        key = json.dumps(config, sort_keys=True)
        if key not in seen:
            t0 = time.perf_counter()
            m = score(split, MAKE[name](s, config))
            seen[key] = {"config": config, split.primary: m[split.primary],
                         "ci95": m.get(split.primary + "_ci95"), "seconds": harness.down(time.perf_counter() - t0, 1)}
            tried.append(seen[key])
            log(f"  {split.protocol} {name} {config}: {split.primary} {m[split.primary]:.4f} "
                f"[{time.perf_counter() - t0:.1f} s]")
        return seen[key]

    best = run(default)
    if not only_default:
        best = harness.coordinate_search(run, best, STAGES[name], split.primary)
        for axis, ladder in LADDERS[name].items():
            searched = sorted(ladder.index(t["config"][axis]) for t in tried if t["config"].get(axis) in ladder)
            at = ladder.index(best["config"][axis]) if best["config"].get(axis) in ladder else None
            if at is None or searched[0] == searched[-1] or at not in (searched[0], searched[-1]):
                continue
            step = -1 if at == searched[0] else 1
            while 0 <= at + step < len(ladder):
                at += step
                r = run({**best["config"], axis: ladder[at]})
                if not r[split.primary] > best[split.primary]:
                    break
                best = r
    return {"default": seen[json.dumps(default, sort_keys=True)], "chosen": best, "tried": tried,
            "stages": STAGES[name] if not only_default else []}


def fmt(config: Config) -> str:
    return ", ".join(f"{k} {'whole' if v is None else f'{v:g}' if isinstance(v, float) else v}" for k, v in config.items())


def markdown(record: dict[str, Any]) -> str:
    """The table for bench/RESULTS.md: per protocol and baseline, default and tuned, figures truncated."""
    lines = ["| protocol | baseline | configs | default -> validation | tuned -> validation | change |",
             "|---|---|---:|---|---|---:|"]
    for protocol, per in record["figures"].items():
        primary = record["splits"][protocol]["primary"]
        for name, f in per.items():
            d, c = f["default"][primary], f["chosen"][primary]
            change = f"{harness.down(100 * (c / d - 1), 1):+.1f}%" if d > 0 else "-"
            lines.append(f"| {protocol} ({primary}) | {name} | {len(f['tried'])} | {fmt(f['default']['config'])} -> "
                         f"{harness.down(d, 4):.4f} | {fmt(f['chosen']['config'])} -> {harness.down(c, 4):.4f} | {change} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocols", default=",".join(SEARCHED))
    p.add_argument("--baselines", default=",".join(STAGES))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--max-queries", type=int, default=None,
                   help="sample a larger validation split to about this many queries (default: every query)")
    p.add_argument("--only-default", action="store_true", help="time the default configurations only")
    p.add_argument("--no-write", action="store_true", help="write neither the record nor the tuned settings")
    p.add_argument("--out", default=str(harness.RESULTS_DIR / "baseline_tuning.json"))
    p.add_argument("--table", action="store_true", help="only print the RESULTS.md table of the record at --out")
    args = p.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    s = load()
    figures: dict[str, Any] = {}
    splits: dict[str, Any] = {}
    t_all = time.perf_counter()
    for protocol in args.protocols.split(","):
        t0 = time.perf_counter()
        split = make_split(protocol, Path(args.data) / PROTOCOLS[protocol].path, validation=True, seed=SEED,
                           max_queries=args.max_queries)
        splits[protocol] = {"primary": split.primary, "train_events": len(split.train),
                            "queries": len(split.queries), "notes": split.notes}
        harness.log(f"== {protocol} (validation split): {len(split.train):,} training events, "
                    f"{len(split.queries):,} queries, {split.primary} [{time.perf_counter() - t0:.1f} s]")
        figures[protocol] = {}
        for name in args.baselines.split(","):
            figures[protocol][name] = tune(s, split, name, args.only_default, harness.log)
            c, d = figures[protocol][name]["chosen"], figures[protocol][name]["default"]
            harness.log(f"-> {protocol} {name}: default {d['config']} {d[split.primary]:.4f}, "
                        f"chosen {c['config']} {c[split.primary]:.4f}")
    harness.log(f"done in {time.perf_counter() - t_all:.0f} s")
    if args.no_write:
        return
    harness.write_json(Path(args.out), harness.result(
        "baseline_tuning", figures, command=harness.command_line(), splits=splits, seed=SEED,
        max_queries=args.max_queries, seconds=harness.down(time.perf_counter() - t_all, 1),
        note="validation splits only (make_split(validation=True)); the test splits were not read"))
    chosen = {p: {n: f["chosen"]["config"] for n, f in per.items()} for p, per in figures.items()}
    old = json.loads(bl.TUNED.read_text())["protocols"] if bl.TUNED.exists() else {}
    harness.write_json(bl.TUNED, {
        "about": "the baselines' settings chosen per protocol on its validation split by bench/tune_baselines.py "
                 "(figures: bench/results/baseline_tuning.json); read by cli.evaluate.default_baselines",
        "protocols": {**old, **{p: {**old.get(p, {}), **c} for p, c in chosen.items()}}})
    print(f"wrote {args.out} and {bl.TUNED}")
    print(markdown(json.loads(Path(args.out).read_text())))


if __name__ == "__main__":
    main()
