"""The regression gate: a small `recstream evaluate` on real data (Spark, Redis, the agents' code) whose
full pipeline must stay above a recorded quality threshold.

The threshold is the figure this same command measured when it was recorded, less a margin for
noise (the 95% half-width the run reports, about 0.02 here): a model change that costs more than
that fails the suite. Re-record it (and say why in the commit) only with a better model.
"""
import json
from pathlib import Path

import pytest

from recstream import cli

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# session protocol, YooChoose 100k, ~1,500 next-click queries, small models (below); measured
# 2026-11-26 on the 2-core VM: ours_full HitRate@20 0.6913 (1,500 queries; 95% half-width about 0.023)
GATE_MEASURED = 0.6913
GATE_THRESHOLD = GATE_MEASURED - 0.03
SMALL = {"RECSTREAM_ALS_RANK": "32", "RECSTREAM_ALS_ITERATIONS": "5", "RECSTREAM_RANKER_TREES": "60",
         "RECSTREAM_RANKER_DEPTH": "6", "RECSTREAM_SPARK_MASTER": "local[2]", "RECSTREAM_SPARK_DRIVER_MEMORY": "1g"}


@pytest.fixture
def small_env(stack, monkeypatch):
    for k, v in SMALL.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RECSTREAM_REDIS_URL", stack.redis_url)
    monkeypatch.setenv("RECSTREAM_REDIS_NAMESPACE", "gate:")


def test_the_full_pipeline_stays_above_its_recorded_session_hitrate(small_env, tmp_path, capsys):
    code = cli.main(["evaluate", "--protocol", "session", "--dataset", str(DATA / "yoochoose-clicks-100k"),
                     "--max-queries", "1500", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    record = json.loads((tmp_path / "session.json").read_text())
    assert (tmp_path / "session.png").stat().st_size > 10_000
    methods = record["methods"]
    assert {"pop", "spop", "iknn", "vsknn", "ials", "ours_als", "ours_als_rules", "ours_full"} <= set(methods)
    assert record["split"]["queries"] >= 1000 and record["seed"] == 20261125
    full = methods["ours_full"]["metrics"]["hitrate@20"]
    print(f"gate: ours_full hitrate@20 {full:.4f} (threshold {GATE_THRESHOLD:.4f})")
    assert full >= GATE_THRESHOLD, f"ours_full HitRate@20 {full:.4f} fell below the gate {GATE_THRESHOLD:.4f}"
    # no ordering finds what retrieval did not propose: the candidate set's hit rate is every variant's ceiling
    ceiling = record["candidate_recall"]
    assert ceiling["all"] >= max(methods[m]["metrics"]["hitrate@20"] for m in ("ours_als", "ours_als_rules", "ours_full"))
    assert ceiling["all"] >= max(v for k, v in ceiling.items() if k not in ("all", "size")) and ceiling["size"] > 20
    # the table printed names every method and the verdict against the best baseline
    assert "ours_full hitrate@20" in out and "vs best baseline" in out


def test_an_unreachable_redis_is_a_clear_error_before_any_training(small_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RECSTREAM_REDIS_URL", "redis://127.0.0.1:1/0")
    code = cli.main(["evaluate", "--protocol", "fbt", "--dataset", str(DATA / "groceries-kaggle"),
                     "--max-queries", "50", "--out", str(tmp_path)])
    assert code == 2
    assert "recstream services up" in capsys.readouterr().err
