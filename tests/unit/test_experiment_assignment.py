"""A/B assignment: stable across processes, uniform, independent across layers, one experiment per layer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from recstream.experiments.assignment import assign, bucket, resolve, unit_for, variant_of
from recstream.experiments.definition import Changes, ExperimentError, loads

P_MIN = 0.001


def experiment(eid: str, layer: str, weights: dict[str, float], traffic: float = 1.0,
               start: int = 100, end: int = 200) -> str:
    variants = "".join(f'[[experiments.variants]]\nname = "{n}"\nweight = {w}\n' for n, w in weights.items())
    return (f'[[experiments]]\nid = "{eid}"\nlayer = "{layer}"\nstart = {start}\nend = {end}\n'
            f'traffic = {traffic}\n' + variants)


SET = ("version = 1\n" + experiment("ranker", "ranking", {"control": 0.5, "b": 0.3, "c": 0.2})
       + experiment("rules", "rules", {"off": 0.5, "on": 0.5}, traffic=0.4)
       + experiment("rules2", "rules", {"x": 1.0}, traffic=0.3))
UNITS = [unit_for(str(i)) for i in range(100_000)]


def test_bucket_is_a_stable_point_in_unit_interval_that_depends_on_unit_and_salt():
    b = bucket("u:1", "layer:ranking")
    assert 0.0 <= b < 1.0 and b == bucket("u:1", "layer:ranking")
    assert b != bucket("u:2", "layer:ranking") and b != bucket("u:1", "layer:rules")
    assert bucket("c", "ab") != bucket("bc", "a")          # salt and unit cannot run into each other


def test_assignment_is_stable_across_processes_with_different_hash_seeds():
    script = ("import json, sys\nfrom recstream.experiments.assignment import assign, unit_for\n"
              "from recstream.experiments.definition import loads\n"
              "s = loads(sys.stdin.read())\n"
              "print(json.dumps([assign(s, unit_for(str(i)), 150) for i in range(1000)]))\n")
    ours = [{k: list(v) for k, v in assign(loads(SET), unit_for(str(i)), 150).items()} for i in range(1000)]
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", script], input=SET, capture_output=True, text=True,
                             env=env, check=True, timeout=60)
        assert json.loads(out.stdout) == ours
    assert sum(bool(a) for a in ours) == 1000               # everyone is in the traffic-1.0 ranking experiment


def test_variants_are_uniform_to_their_weights_chi_squared():
    s = loads(SET)
    ranker = s.get("ranker")
    counts = Counter(variant_of(ranker, u) for u in UNITS)
    observed = [counts["control"], counts["b"], counts["c"]]
    expected = [0.5 * len(UNITS), 0.3 * len(UNITS), 0.2 * len(UNITS)]
    assert stats.chisquare(observed, expected).pvalue > P_MIN
    # The test has power: the same counts against slightly wrong weights are rejected.
    wrong = [0.48 * len(UNITS), 0.32 * len(UNITS), 0.2 * len(UNITS)]
    assert stats.chisquare(observed, wrong).pvalue < P_MIN


def test_variants_stay_uniform_within_a_partial_traffic_slice():
    s = loads(SET)
    counts = Counter(assign(s, u, 150).get("rules", ("", ""))[1] for u in UNITS[:40_000])
    inside = counts["off"] + counts["on"]
    assert stats.chisquare([counts["off"], counts["on"]]).pvalue > P_MIN and inside > 0


def test_two_experiments_in_different_layers_are_independent():
    s = loads(SET)
    table = np.zeros((3, 2), dtype=int)
    rows, cols = {"control": 0, "b": 1, "c": 2}, {"off": 0, "on": 1}
    for u in UNITS:
        a = assign(s, u, 150)
        if a.get("rules", ("",))[0] == "rules":
            table[rows[a["ranking"][1]], cols[a["rules"][1]]] += 1
    assert table.min() > 1000
    assert stats.chi2_contingency(table).pvalue > P_MIN


def test_traffic_shares_are_respected_and_a_unit_is_in_at_most_one_experiment_per_layer():
    s = loads(SET)
    n = 40_000
    counts = Counter(assign(s, u, 150).get("rules", ("none",))[0] for u in UNITS[:n])
    for eid, share in (("rules", 0.4), ("rules2", 0.3), ("none", 0.3)):
        sigma = (share * (1 - share) / n) ** 0.5
        assert abs(counts[eid] / n - share) < 4 * sigma, (eid, counts)
    # Membership follows the layer point and the disjoint slices: never two experiments for one point.
    for u in UNITS[:2000]:
        point = bucket(u, "layer:rules")
        inside = [e for e in ("rules", "rules2") if s.slices[e][0] <= point < s.slices[e][1]]
        assert len(inside) <= 1
        assert assign(s, u, 150).get("rules", (None,))[0] == (inside[0] if inside else None)


def test_slices_do_not_move_when_a_neighbour_ends():
    text = ("version = 1\n" + experiment("a", "L", {"x": 1.0}, 0.5, 100, 200)
            + experiment("b", "L", {"y": 1.0}, 0.5, 100, 300))
    s = loads(text)
    before = {u: assign(s, u, 150).get("L") for u in UNITS[:5000]}
    after = {u: assign(s, u, 250).get("L") for u in UNITS[:5000]}
    # After a ends, b keeps exactly the units it had; a's units are in no experiment.
    assert {u for u, v in after.items() if v} == {u for u, v in before.items() if v and v[0] == "b"}


def test_inactive_experiments_assign_nothing():
    s = loads(SET)
    assert all(assign(s, u, t) == {} for u in UNITS[:200] for t in (99.9, 200, 1e9))
    assert all(assign(s, u, 100) for u in UNITS[:200])


def test_unit_for_prefers_user_then_cookie_then_session_with_distinct_prefixes():
    assert unit_for("42", "s1", "c1") == "u:42"
    assert unit_for(None, "s1", "42") == "c:42"
    assert unit_for("", "s1", None) == "s:s1"
    assert len({unit_for("42"), unit_for(None, cookie="42"), unit_for(None, session_id="42")}) == 3
    with pytest.raises(ExperimentError):
        unit_for(None, None, None)


def test_resolve_overlays_defaults_with_the_assigned_variants_changes():
    text = ('version = 1\n[defaults]\nranker = "champion"\ncandidates = 200\nexclude_purchased = true\n'
            + experiment("ranker", "ranking", {"control": 0.5, "b": 0.5})
            + '[experiments.variants.changes]\nranker = "challenger"\ncandidates = 400\n'
            + experiment("div", "rules", {"off": 0.5, "cap": 0.5}, traffic=0.5)
            + "changes = { max_per_category = 2 }\n")
    s = loads(text)
    seen = set()
    for u in UNITS[:400]:
        chosen, changes = resolve(s, u, 150)
        assert chosen == {eid: v for eid, v in assign(s, u, 150).values()}
        b, cap = chosen.get("ranker") == "b", chosen.get("div") == "cap"
        assert changes == Changes(None, "challenger" if b else "champion", 400 if b else 200, 2 if cap else None, True)
        seen.add((b, cap, "div" in chosen))
    assert len(seen) == 6                                   # every combination happened, outside the div slice too
    assert resolve(s, UNITS[0], 1e9) == ({}, s.defaults)    # nothing running: production defaults
