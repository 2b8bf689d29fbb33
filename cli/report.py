"""An evaluation's outputs: the printed table, the JSON record and the PNG plot (metric against K)."""
from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from recstream.evaluation.protocols import summary

if TYPE_CHECKING:
    from cli.evaluate import Evaluation


FAMILIES = {"homepage": ("recall", "ndcg", "recall_new", "ndcg_new", "coverage"), "session": ("hitrate", "mrr"),
            "fbt": ("hitrate", "mrr"), "movielens": ("recall", "ndcg", "coverage"), "new_items": ("recall", "ndcg")}


def metric_names(protocol: str, primary: str, ks: Sequence[int], present: Collection[str]) -> list[str]:
    """The primary metric first, then the protocol's other metrics at its Ks (those present)."""
    names = [primary]
    for f in FAMILIES.get(protocol, ("recall", "ndcg", "hitrate", "mrr")):
        for k in ks:
            name = f"{f}@{k}"
            if name not in names and name in present:
                names.append(name)
    return names


def columns(ev: Evaluation) -> list[str]:
    present = {k for r in ev.results for k in r.metrics}
    return metric_names(ev.split.protocol, ev.split.primary, ev.split.ks, present)


def table(ev: Evaluation) -> str:
    cols = columns(ev)
    primary = ev.split.primary
    head = f"{'method':<16}" + "".join(f"{c:>15}" for c in cols) + f"{'seconds':>9}"
    lines = [head, "-" * len(head)]
    for r in ev.results:
        cells = []
        for c in cols:
            v = r.metrics.get(c)
            text = "-" if v is None else f"{v:.4f}"
            if c == primary and v is not None:
                text += f"±{r.metrics.get(c + '_ci95', 0.0):.3f}"
            cells.append(f"{text:>15}")
        lines.append(f"{r.name:<16}" + "".join(cells) + f"{r.seconds:>9.1f}")
    best, full = ev.best_baseline, ev.full_pipeline
    lines.append(f"{full.name} {primary} {full.metrics[primary]:.4f} vs best baseline {best.name} "
                 f"{best.metrics[primary]:.4f}: {ev.lift:+.1%} (bar: +10%) -> {'PASS' if ev.lift >= 0.10 else 'BELOW BAR'}")
    if ev.baselines:
        lines.append(ev.baselines)
    return "\n".join(lines)


def record(ev: Evaluation, command: str = "") -> dict:
    best, full = ev.best_baseline, ev.full_pipeline
    p = ev.split.primary
    return {"protocol": ev.split.protocol, "command": command, "seed": ev.split.seed, "primary": p,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "split": summary(ev.split), "notes": ev.split.notes,
            "best_baseline": {"name": best.name, p: best.metrics[p]},
            "full_pipeline": {"name": full.name, p: full.metrics[p]}, "lift": ev.lift,
            "methods": {r.name: {"ours": r.ours, "seconds": r.seconds, "metrics": r.metrics,
                                 "curve": {"k": list(range(1, len(r.curve) + 1)), p.split("@")[0]: r.curve}}
                        for r in ev.results},
            "training": ev.training, "candidate_recall": ev.candidate_recall, "baselines": ev.baselines}


def plot(rec: dict, path: Path) -> Path:
    """The primary metric against K, one line per method (ours thick), from a record (see `record`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    family = rec["primary"].split("@")[0]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, m in rec["methods"].items():
        curve = m["curve"]
        ax.plot(curve["k"], curve[family], label=name, linewidth=2.4 if m["ours"] else 1.2,
                linestyle="-" if m["ours"] else "--")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("K")
    ax.set_ylabel(f"{family}@K")
    dataset = Path(rec["split"]["dataset"]).name
    ax.set_title(f"{rec['protocol']}: {dataset} ({rec['primary']} {rec['lift']:+.1%} vs best baseline "
                 f"{rec['best_baseline']['name']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write(ev: Evaluation, out_dir: Path, command: str = "", name: str | None = None) -> tuple[Path, Path]:
    """{out_dir}/{name}.json and .png; name defaults to the protocol's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or ev.split.protocol
    json_path = out_dir / f"{name}.json"
    rec = record(ev, command)
    json_path.write_text(json.dumps(rec, indent=2, default=float))
    return json_path, plot(rec, out_dir / f"{name}.png")
