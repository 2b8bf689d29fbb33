"""The regression gate: a small `recstream evaluate` of every protocol on real data (Spark, Redis, the
agents' code), on its validation split (the test splits are read only by recorded runs), whose full
pipeline must stay above a recorded figure.

Each figure is what this same command measured when it was recorded, less a margin for noise (about
the 95% half-width the run reports): a change that costs more than that fails the suite. Where the
recorded run was at least level with the best baseline on the same sample, falling below it fails
too; where it was not (the gaps bench/RESULTS.md explains), the gate keeps the figure from falling
further. Re-record a figure (and say why in the commit) only with a better model.
"""
import json
from pathlib import Path

import pytest

from cli import main as cli

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# small models for CI's 2 cores: every protocol in about a minute
SMALL = {"RECSTREAM_ALS_RANK": "16", "RECSTREAM_ALS_ITERATIONS": "3", "RECSTREAM_RANKER_TREES": "30",
         "RECSTREAM_RANKER_DEPTH": "6", "RECSTREAM_RANKER_TARGET_SAMPLE": "0.3", "RECSTREAM_INDEX_KIND": "flat",
         "RECSTREAM_SPARK_MASTER": "local[2]", "RECSTREAM_SPARK_DRIVER_MEMORY": "1g"}
QUERIES = 400
# protocol: (primary metric, ours_full (ours_content on new_items) recorded by this gate, margin, recorded
# at least level with the best baseline); recorded 2026-12-06 on the 2-core VM (fbt and new_items earlier
# that day; the others after the item-kNN source, the user's history and fusion for MovieLens). The best
# baseline on the same sample since the baselines are tuned on validation (bench/tune_baselines.py, 23:10 that
# day), then before: homepage, session and MovieLens were level with the untuned baselines and are not with
# the tuned ones, so for them the gate keeps the figure from falling (and the best baseline is printed).
GATES = {
    "homepage": ("recall@20", 0.1145, 0.015, False),    # best baseline ials 0.1171 (untuned: spop 0.1144)
    "session": ("hitrate@20", 0.7022, 0.03, False),     # ials 0.7122 (re-recorded 2026-12-07 22:33 after the settings
                                                        # tuned on validation; 0.6849 before, untuned vsknn 0.6625)
    "fbt": ("hitrate@4", 0.2025, 0.03, True),           # vsknn 0.1950 (untuned: pop 0.1900; ours 0.1800 at the
                                                        # later commit: within the margin)
    "movielens": ("recall@20", 0.1586, 0.015, True),    # vsknn 0.1572 (re-recorded 2026-12-07 19:39 after the fusion
                                                        # of ALS and item kNN; 0.1471 before, untuned iknn 0.1250)
    "new_items": ("recall@20", 0.0406, 0.015, False),   # genre 0.0647 (unchanged: not tuned)
}


@pytest.fixture
def small_env(stack, monkeypatch):
    for k, v in SMALL.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RECSTREAM_REDIS_URL", stack.redis_url)
    monkeypatch.setenv("RECSTREAM_REDIS_NAMESPACE", "gate:")


@pytest.mark.parametrize("protocol", GATES)
def test_every_protocol_stays_above_its_recorded_figure(protocol, small_env, tmp_path, capsys):
    primary, recorded, margin, level = GATES[protocol]
    code = cli.main(["evaluate", "--protocol", protocol, "--validation", "--max-queries", str(QUERIES),
                     "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    record = json.loads((tmp_path / f"{protocol}-validation.json").read_text())
    assert (tmp_path / f"{protocol}-validation.png").stat().st_size > 10_000
    methods = record["methods"]
    assert {"spop", "iknn", "vsknn", "ials", "genre", "random"} <= set(methods)
    assert any(m == "pop" or m.startswith("pop") and m.endswith("d") for m in methods)   # pop, or pop1d (its window)
    assert record["primary"] == primary and record["seed"] == 20261125 and record["split"]["queries"] >= 100
    full, best = record["full_pipeline"][primary], record["best_baseline"][primary]
    print(f"gate {protocol}: {record['full_pipeline']['name']} {primary} {full:.4f} (recorded {recorded:.4f}, "
          f"margin {margin}); best baseline {record['best_baseline']['name']} {best:.4f}")
    assert full >= recorded - margin, f"{protocol}: {primary} {full:.4f} fell below the gate {recorded - margin:.4f}"
    if level:
        assert full >= best - margin, f"{protocol}: {primary} {full:.4f} fell below the best baseline {best:.4f}"
    if protocol != "new_items":   # no ordering finds what retrieval did not propose: the candidates are the ceiling
        ceiling = record["candidate_recall"]
        ours = max(methods[m]["metrics"][primary] for m in ("ours_als", "ours_als_rules", "ours_full"))
        assert ceiling["all"] >= ours
        assert ceiling["all"] >= max(v for k, v in ceiling.items() if k not in ("all", "size"))
    # the table printed names every method and the verdict against the best baseline
    assert "vs best baseline" in out


def test_an_unreachable_redis_is_a_clear_error_before_any_training(small_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RECSTREAM_REDIS_URL", "redis://127.0.0.1:1/0")
    code = cli.main(["evaluate", "--protocol", "fbt", "--dataset", str(DATA / "groceries-kaggle"),
                     "--max-queries", "50", "--out", str(tmp_path)])
    assert code == 2
    assert "recstream services up" in capsys.readouterr().err
