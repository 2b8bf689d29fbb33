"""Offline evaluation of every protocol on its public dataset, recorded: bench/results/evaluation.json and one PNG each.

Runs what `recstream evaluate --protocol NAME` runs (the test split; baselines and ours side by
side in one run, on one split), writes each protocol's record and plot to bench/results/evaluation/,
and keeps in evaluation.json, per protocol, the primary metric of the best baseline (and its
name) and of the full pipeline, the lift, every method's figures, and how the baselines were set
(`baselines`: tuned on the protocol's validation split by bench/tune_baselines.py, or not).

    .venv/bin/python bench/evaluation.py [--protocols homepage,session,fbt,movielens,new_items] [--validation]
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from cli.evaluate import run  # noqa: E402
from cli.report import metric_names, plot, table, write  # noqa: E402
from recstream.evaluation.protocols import PROTOCOLS, make_split  # noqa: E402
from recstream.settings import load  # noqa: E402


def summarise(rec: dict) -> dict:
    """One protocol's entry of evaluation.json, from its record (cli.report.record)."""
    p = rec["primary"]
    return {"primary": p, "best_baseline": rec["best_baseline"][p], "best_baseline_name": rec["best_baseline"]["name"],
            "full_pipeline": rec["full_pipeline"][p], "full_pipeline_name": rec["full_pipeline"]["name"],
            "lift": rec["lift"], "bar_met": rec["lift"] >= 0.10, "candidate_recall": rec.get("candidate_recall", {})}


def _d4(x: float) -> str:
    """Four decimals, truncated (never rounded up): 0.13479 is 0.1347."""
    return f"{harness.down(x, 4):.4f}"


def markdown(result: dict) -> str:
    """The tables for bench/RESULTS.md: per protocol, every method's figures (primary first)."""
    lines = []
    for protocol, fig in result["figures"].items():
        methods = result["methods"][protocol]
        primary = fig["primary"]
        ks = sorted({int(k.split("@")[1]) for m in methods.values() for k in m if "@" in k and "_ci95" not in k})
        keys = metric_names(protocol, primary, ks, {k for m in methods.values() for k in m})
        lines += [f"**{protocol}** ({primary}; best baseline {fig['best_baseline_name']} "
                  f"{_d4(fig['best_baseline'])}, full pipeline {_d4(fig['full_pipeline'])}, "
                  f"lift {harness.down(100 * fig['lift'], 1):+.1f}%, bar {'met' if fig['bar_met'] else 'not met'})", "",
                  "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, m in methods.items():
            cells = [_d4(m[k]) + (f" ± {_d4(m[k + '_ci95'])}" if k == primary else "") if k in m else "-"
                     for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def collect(folder: Path, protocols: list[str], name: str, command: str) -> dict:
    """evaluation.json from the per-protocol records a run wrote into `folder`."""
    records = {p: json.loads((folder / f"{p}.json").read_text()) for p in protocols if (folder / f"{p}.json").exists()}
    dates = []
    for p, rec in records.items():
        plot(rec, folder / f"{p}.png")
        written = datetime.fromtimestamp((folder / f"{p}.json").stat().st_mtime, UTC).isoformat(timespec="seconds")
        dates.append(rec.get("date", written))
    return harness.result(name, {p: summarise(r) for p, r in records.items()}, command=command,
                          date=min(dates) if dates else None,
                          methods={p: {m: x["metrics"] for m, x in r["methods"].items()} for p, r in records.items()},
                          seconds={p: sum(x["seconds"] for x in r["methods"].values()) for p, r in records.items()},
                          baselines={p: r.get("baselines", "") for p, r in records.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocols", default=",".join(PROTOCOLS))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--validation", action="store_true", help="the validation splits (tuning)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--collect", action="store_true", help="only rebuild the JSON and tables from the records written")
    args = p.parse_args()
    out = Path(args.out)
    name = "evaluation" + ("_validation" if args.validation else "")
    protocols = args.protocols.split(",")
    command = "python bench/evaluation.py " + " ".join(a for a in sys.argv[1:] if a != "--collect")
    if not args.collect:
        s = load()
        for protocol in protocols:
            split = make_split(protocol, Path(args.data) / PROTOCOLS[protocol].path, validation=args.validation)
            print(f"== {protocol}: {len(split.train):,} training events, {len(split.queries):,} queries, "
                  f"seed {split.seed}", flush=True)
            ev = run(s, split)
            print(table(ev), flush=True)
            write(ev, out / name, command, protocol)
    result = collect(out / name, protocols, name, command)
    harness.write_json(out / f"{name}.json", result)
    print(json.dumps(result["figures"], indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
