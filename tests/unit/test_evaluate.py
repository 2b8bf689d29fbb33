"""The evaluation runner's pure parts: query shifting, the ALS-only candidate set, the shared filter, the report."""
import dataclasses
import json
import math

import pytest

from cli.evaluate import Evaluation, MethodResult, _als_only, _filtered, _shift
from cli.report import record, table, write
from recstream.evaluation.core import Query, Split
from schemas import CandidateSet, Event, RecommendationRequest

DAY = 86_400.0


def test_queries_within_a_day_of_training_stay_put_and_later_ones_move_back_whole_days():
    end = 1_000 * DAY
    assert _shift(end + 3600, end) == 0.0
    assert _shift(end - 5 * DAY, end) == 0.0          # before the end (per-user splits): never moved
    moved = _shift(end + 40 * DAY + 7200, end)
    assert moved == 40 * DAY and 0 <= end + 40 * DAY + 7200 - moved - end < DAY


def _candidates(scores: dict, anchors: dict | None = None) -> CandidateSet:
    r = RecommendationRequest(request_id="r1", kind="homepage", created_at=1_700_000_000.0, user_id="u")
    n = len(next(iter(scores.values())))
    return CandidateSet(request=r, model_version="v", query_source="user", query=(0.1, 0.2),
                        product_ids=tuple(f"p{i}" for i in range(n)), scores=scores, anchors=anchors or {})


def test_als_only_keeps_the_faiss_candidates_in_als_order_and_nothing_else():
    cs = _candidates({"als": (0.2, None, 0.9, 0.5), "covis": (None, 3.0, 1.0, None)},
                     {"als": ("a0", None, "a2", "a3")})
    only = _als_only(cs)
    assert only.product_ids == ("p2", "p3", "p0")
    assert set(only.scores) == {"als"} and list(only.scores["als"]) == [0.9, 0.5, 0.2]
    assert list(only.anchors["als"]) == ["a2", "a3", "a0"]


def test_our_lists_pass_the_filter_every_method_shares():
    q = Query(0, "homepage", "u", 0.0, (), frozenset({"b"}), exclude=frozenset({"a"}))
    assert _filtered(q, ["a", "b", "b", "x", "c", "d"], {"a", "b", "c", "d"}, 2) == ["b", "c"]
    new = Query(1, "homepage", "u", 0.0, (), frozenset({"n1"}), universe=frozenset({"n1", "n2"}))
    assert _filtered(new, ["b", "n2", "n1"], {"b"}, 5) == ["n2", "n1"]


def _evaluation(full: float, best: float) -> Evaluation:
    e = Event(event_id="e", user_id="u", session_id="s", product_id="a", event_type="view", timestamp=1e9)
    split = Split("session", "tiny", [e], [], [Query(0, "homepage", "u", 1e9 + 1, ("a",), frozenset({"b"}))],
                  (20,), "hitrate@20", 7, notes=["a note"])
    res = [MethodResult("pop", False, {"hitrate@20": best / 2, "mrr@20": 0.1}, [best / 2] * 20, 0.1),
           MethodResult("vsknn", False, {"hitrate@20": best, "hitrate@20_ci95": 0.01, "mrr@20": 0.2}, [best] * 20, 0.2),
           MethodResult("ours_full", True, {"hitrate@20": full, "mrr@20": 0.3}, [full] * 20, 1.0)]
    return Evaluation(split, res)


@pytest.mark.parametrize("full, best, verdict", [(0.66, 0.6, "PASS"), (0.65, 0.6, "BELOW BAR")])
def test_the_bar_is_ten_percent_over_the_best_baseline(full, best, verdict):
    ev = _evaluation(full, best)
    assert ev.best_baseline.name == "vsknn"
    assert math.isclose(ev.lift, full / best - 1)
    text = table(ev)
    assert text.splitlines()[0].split()[:3] == ["method", "hitrate@20", "mrr@20"]
    assert text.rstrip().endswith(verdict)


def test_the_record_and_plot_are_written_next_to_each_other(tmp_path):
    ev = _evaluation(0.7, 0.6)
    rec = record(ev, "recstream evaluate --protocol session")
    assert rec["best_baseline"] == {"name": "vsknn", "hitrate@20": 0.6}
    assert rec["full_pipeline"] == {"name": "ours_full", "hitrate@20": 0.7} and rec["seed"] == 7
    assert rec["methods"]["pop"]["curve"]["k"] == list(range(1, 21))
    json_path, png_path = write(ev, tmp_path)
    assert json.loads(json_path.read_text())["protocol"] == "session"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ours_runs_with_the_settings_its_protocol_chose_on_validation():
    from cli.evaluate import eval_settings
    from recstream.evaluation.protocols import PROTOCOLS
    from recstream.settings import Settings

    split = _evaluation(0.7, 0.6).split
    for protocol, spec in PROTOCOLS.items():
        es = eval_settings(Settings(task_orderings="cart=popular"), dataclasses.replace(split, protocol=protocol))
        assert es.exclude_purchased is False and es.redis_namespace.startswith(f"eval:{protocol}:")
        assert es.task_orderings == spec.settings.get("task_orderings", "cart=popular")   # the protocol's wins


def test_candidate_recall_is_every_orderings_ceiling_under_the_shared_filter():
    from cli.evaluate import candidate_recall

    q1 = Query(0, "homepage", "u", 0.0, (), frozenset({"a", "b"}), exclude=frozenset({"x"}))
    q2 = Query(1, "homepage", "v", 0.0, (), frozenset({"c"}))
    split = dataclasses.replace(_evaluation(0.7, 0.6).split, queries=[q1, q2], primary="recall@20")
    got = candidate_recall(split, {"all": [["a", "x", "z"], ["c"]], "als": [["a"], []]}, {"a", "b", "c", "z"})
    assert got == {"all": (0.5 + 1.0) / 2, "als": 0.25, "size": 1.5}   # x is excluded: no slot, no hit
    hits = candidate_recall(dataclasses.replace(split, primary="hitrate@20"), {"all": [["a"], []]}, {"a", "c"})
    assert hits["all"] == 0.5


def test_default_baselines_take_the_settings_tuned_for_their_protocol(tmp_path, monkeypatch):
    from cli.evaluate import baselines_note, default_baselines
    from recstream.evaluation import baselines as bl
    from recstream.settings import Settings

    tuned = {"session": {"pop": {"window_days": 7.0}, "iknn": {"neighbours": 20, "shrink": 50.0},
                         "vsknn": {"k": 50, "sample": 1000, "weighting": "log"}, "ials": {"factors": 32, "alpha": 1.0}}}
    monkeypatch.setattr(bl, "TUNED", tmp_path / "tuned.json")
    (tmp_path / "tuned.json").write_text(json.dumps({"protocols": tuned}))
    s = Settings(als_rank=64, als_reg=0.5, als_alpha=20.0, als_iterations=3)
    pop, _, iknn, vsknn, ials, *_ = default_baselines(s, "session")
    assert pop.name == "pop7d" and (iknn.neighbours, iknn.shrink) == (20, 50.0)
    assert (vsknn.k, vsknn.sample, vsknn.weighting) == (50, 1000, "log")
    assert (ials.factors, ials.regularization, ials.alpha, ials.iterations) == (32, 0.5, 1.0, 3)   # the rest: ours
    assert "tuned on this protocol's validation split" in baselines_note("session") and "shrink=50.0" in baselines_note("session")
    pop, _, iknn, vsknn, ials, *_ = default_baselines(s, "fbt")                                       # none tuned
    assert pop.name == "pop" and (iknn.neighbours, iknn.shrink, vsknn.weighting) == (100, 0.0, "div")
    assert (ials.factors, ials.regularization, ials.alpha) == (64, 0.5, 20.0) and "untuned" in baselines_note("fbt")
