"""Offline evaluation of every protocol on its public dataset, recorded: bench/results/evaluation.json and one PNG each.

Runs what `recstream evaluate --protocol NAME` runs (the test split; baselines and ours side by
side in one run, on one split) and keeps, per protocol, the primary metric of the best baseline
(and its name) and of the full pipeline, the lift, and every method's figures.

    .venv/bin/python bench/evaluation.py [--protocols homepage,session,fbt,movielens,new_items] [--validation]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from batch.evaluate import run  # noqa: E402
from recstream.evaluation.protocols import PROTOCOLS, make_split  # noqa: E402
from recstream.evaluation.report import record, table, write  # noqa: E402
from recstream.settings import load  # noqa: E402


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"


def markdown(result: dict) -> str:
    """The tables for bench/RESULTS.md: per protocol, every method's figures (primary first)."""
    lines = []
    for protocol, fig in result["figures"].items():
        methods = result["methods"][protocol]
        primary = fig["primary"]
        keys = [primary] + sorted({k for m in methods.values() for k in m
                                   if "@" in k and not k.endswith("_ci95") and k != primary})
        lines += [f"**{protocol}** ({primary}; best baseline {fig['best_baseline']} "
                  f"{fig['best_baseline_value']:.4f}, full pipeline {fig['full_pipeline']:.4f}, "
                  f"lift {fig['lift']:+.1%}, bar {'met' if fig['bar_met'] else 'not met'})", "",
                  "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, m in methods.items():
            cells = [f"{m[k]:.4f}" + (f" ± {m[k + '_ci95']:.4f}" if k == primary else "") if k in m else "-"
                     for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocols", default=",".join(PROTOCOLS))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--validation", action="store_true", help="the validation splits (tuning)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    out = Path(args.out)
    s = load()
    name = "evaluation" + ("_validation" if args.validation else "")
    command = "python bench/evaluation.py " + " ".join(sys.argv[1:])
    figures, details = {}, {}
    t0 = time.perf_counter()
    for protocol in args.protocols.split(","):
        split = make_split(protocol, Path(args.data) / PROTOCOLS[protocol].path, validation=args.validation)
        print(f"== {protocol}: {len(split.train):,} training events, {len(split.queries):,} queries, seed {split.seed}",
              flush=True)
        ev = run(s, split)
        print(table(ev), flush=True)
        json_path, png_path = write(ev, out / name, command, protocol)
        shutil.copy(png_path, out / f"{name}_{protocol}.png")
        rec = record(ev, command)
        primary = split.primary
        figures[protocol] = {"primary": primary, "best_baseline": rec["best_baseline"]["name"],
                             "best_baseline_value": rec["best_baseline"][primary],
                             "full_pipeline": rec["full_pipeline"][primary], "lift": rec["lift"],
                             "bar_met": rec["lift"] >= 0.10}
        details[protocol] = {m: r["metrics"] for m, r in rec["methods"].items()}
    result = {"name": name, "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
              "command": command, "figures": figures, "methods": details, "wall_s": time.perf_counter() - t0}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(figures, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
