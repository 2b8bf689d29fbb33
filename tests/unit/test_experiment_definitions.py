"""A/B experiment definitions: parsing the versioned TOML file and refusing bad input with locations."""
from __future__ import annotations

import datetime as dt

import pytest

from recstream.experiments.definition import (
    Changes,
    Experiment,
    ExperimentError,
    ExperimentSet,
    UnknownExperiment,
    Variant,
    changes_from_json,
    changes_to_json,
    dumps,
    experiment_from_json,
    experiment_to_json,
    load,
    loads,
)

JAN = dt.datetime(2025, 1, 1, tzinfo=dt.UTC).timestamp()
FEB = dt.datetime(2025, 2, 1, tzinfo=dt.UTC).timestamp()

FULL = """
version = 1

[[experiments]]
id = "ranker-challenger"
description = "Challenger ranker vs champion"
layer = "ranking"
start = 2025-01-01T00:00:00Z
end = 2025-02-01T00:00:00Z
traffic = 0.5
control = "control"

[[experiments.variants]]
name = "control"
weight = 0.5

[[experiments.variants]]
name = "challenger"
weight = 0.5
changes = { ranker = "challenger", candidates = 300 }

[[experiments]]
id = "retrieval-sources"
layer = "retrieval"
start = 1735689600
end = 1738368000.0
traffic = 1.0

[[experiments.variants]]
name = "all"
weight = 0.7

[[experiments.variants]]
name = "no-popular"
weight = 0.3
[experiments.variants.changes]
sources = ["als", "covis", "cobuy"]
max_per_category = 3
exclude_purchased = false
"""


def variant_toml(name: str = "a", weight: float = 1.0, extra: str = "") -> str:
    return f'[[experiments.variants]]\nname = "{name}"\nweight = {weight}\n{extra}\n'


def exp_toml(eid: str = "e", layer: str = "L", start: float | str = 100, end: float = 200, traffic: float = 1.0,
             variants: str | None = None, extra: str = "") -> str:
    return (f'[[experiments]]\nid = "{eid}"\nlayer = "{layer}"\nstart = {start}\nend = {end}\n'
            f'traffic = {traffic}\n{extra}\n' + (variant_toml() if variants is None else variants))


def problems_of(text: str) -> list[str]:
    with pytest.raises(ExperimentError) as err:
        loads(text)
    return err.value.problems


def test_full_example_parses_into_typed_frozen_values(tmp_path):
    path = tmp_path / "experiments.toml"
    path.write_text(FULL)
    s = load(path)
    assert s.version == 1 and [e.id for e in s.experiments] == ["ranker-challenger", "retrieval-sources"]
    ranker, retrieval = s.experiments
    assert ranker == Experiment("ranker-challenger", "Challenger ranker vs champion", "ranking", JAN, FEB, 0.5,
                                (Variant("control", 0.5), Variant("challenger", 0.5,
                                                                  Changes(ranker="challenger", candidates=300))),
                                "control")
    assert retrieval.start_s == JAN and retrieval.end_s == FEB and retrieval.description == ""
    assert retrieval.control == "all"          # default: the first variant
    assert retrieval.variant("no-popular").changes == Changes(("als", "covis", "cobuy"), None, None, 3, False)
    assert s.get("retrieval-sources") is retrieval
    with pytest.raises(AttributeError):
        ranker.traffic = 0.9                   # frozen


def test_active_respects_half_open_window():
    s = loads(FULL)
    assert s.active(JAN - 1) == ()
    assert [e.id for e in s.active(JAN)] == ["ranker-challenger", "retrieval-sources"]
    assert s.active(FEB) == ()


def test_unknown_experiment_and_variant_lookups_raise():
    s = loads(FULL)
    with pytest.raises(ExperimentError, match="unknown experiment 'nope'"):
        s.get("nope")
    with pytest.raises(ExperimentError, match="unknown variant 'nope'"):
        s.experiments[0].variant("nope")


@pytest.mark.parametrize("body, location, message", [
    ("version = 2\n" + exp_toml(), "version", "must be one of"),
    ("version = 1\nextra = 1\n" + exp_toml(), "extra", "unknown key"),
    ("version = 1\n" + exp_toml(extra="owner = 'x'"), "experiments[0].owner", "unknown key"),
    ("version = 1\n" + exp_toml(variants=variant_toml(extra="color = 1")), "experiments[0].variants[0].color",
     "unknown key"),
    ("version = 1\n" + exp_toml(variants=variant_toml(extra="changes = { rank = 'x' }")),
     "experiments[0].variants[0].changes.rank", "unknown key"),
    ("version = 1\n" + exp_toml(variants=variant_toml("a", 0.5) + variant_toml("b", 0.4)),
     "experiments[0].variants", "sum to 1"),
    ("version = 1\n" + exp_toml(variants=variant_toml("a", 0.5) + variant_toml("a", 0.5)),
     "experiments[0].variants[1].name", "duplicate variant"),
    ("version = 1\n" + exp_toml(variants=variant_toml("a", 0)), "experiments[0].variants[0].weight", "(0, 1]"),
    ("version = 1\n" + exp_toml() + exp_toml(layer="M"), "experiments[1].id", "duplicate id 'e'"),
    ("version = 1\n" + exp_toml(start=200, end=200), "experiments[0].end", "after start"),
    ("version = 1\n" + exp_toml(traffic=0), "experiments[0].traffic", "(0, 1]"),
    ("version = 1\n" + exp_toml(traffic=1.5), "experiments[0].traffic", "(0, 1]"),
    ("version = 1\n" + exp_toml(extra="description = 1"),
     "experiments[0].description", "string"),
    ("version = 1\n" + exp_toml(variants=variant_toml(extra="changes = { sources = ['als', 'tiktok'] }")),
     "experiments[0].variants[0].changes.sources", "unknown source"),
    ("version = 1\n" + exp_toml(variants=variant_toml(extra="changes = { candidates = 2001 }")),
     "experiments[0].variants[0].changes.candidates", "1..2000"),
    ("version = 1\n" + exp_toml(variants=variant_toml(extra="changes = { ranker = 'bad alias!' }")),
     "experiments[0].variants[0].changes.ranker", "MLflow"),
    ("version = 1\n" + exp_toml(variants=variant_toml(extra="changes = { exclude_purchased = 1 }")),
     "experiments[0].variants[0].changes.exclude_purchased", "true or false"),
    ("version = 1\n" + exp_toml(extra="control = 'ghost'"), "experiments[0].control", "unknown variant 'ghost'"),
    ("version = 1\n" + exp_toml(start="2025-01-01T00:00:00"),
     "experiments[0].start", "UTC offset"),
    ("version = 1\n" + exp_toml("a", traffic=0.6) + exp_toml("b", start=150, end=300, traffic=0.5),
     "experiments[1].traffic", "layer 'L' cannot fit 'b'"),
    ("version = 1\nexperiments = 3\n", "experiments", "array of tables"),
    ("version = 1\nrevision = -1\n", "revision", "integer >= 0"),
    ("version = 1\nrevision = 'x'\n", "revision", "integer >= 0"),
    ("version = 1\n[defaults]\nrank = 'x'\n", "defaults.rank", "unknown key"),
    ("version = 1\n[defaults]\ncandidates = 0\n", "defaults.candidates", "1..2000"),
    ("version = 1\n" + exp_toml(start='"yesterday"'), "experiments[0].start", "ISO-8601"),
    ("version = 1\n" + exp_toml("a", variants=variant_toml(extra="changes = { ranker = 'x' }"))
     + exp_toml("b", layer="M", start=150, end=300, variants=variant_toml(extra="changes = { ranker = 'y' }")),
     "experiments[1].variants", "'b' (layer 'M') and experiments[0] 'a' (layer 'L') both change ranker"),
    ("version = 1\n[[experiments]\n", "<file>", "not valid TOML"),
])
def test_each_bad_input_names_its_location(body, location, message):
    problems = problems_of(body)
    assert any(p.startswith(location + ":") and message in p for p in problems), problems


def test_every_problem_is_listed_at_once():
    body = ("version = 1\n" + exp_toml("a", traffic=2, variants=variant_toml("x", 0.5))
            + exp_toml("b", start=300, end=100))
    problems = problems_of(body)
    assert {p.split(":")[0] for p in problems} == {"experiments[0].traffic", "experiments[0].variants",
                                                    "experiments[1].end"}
    assert "3 problems" in str(ExperimentError(problems))


def test_same_layer_may_overlap_in_time_when_traffic_fits_or_may_reuse_traffic_when_disjoint_in_time():
    s = loads("version = 1\n" + exp_toml("a", traffic=0.6) + exp_toml("b", start=150, end=300, traffic=0.4)
              + exp_toml("c", start=200, end=400, traffic=0.6) + exp_toml("d", layer="M", traffic=1.0))
    assert s.slices["a"] == (0.0, 0.6) and s.slices["b"] == pytest.approx((0.6, 1.0))
    assert s.slices["c"] == (0.0, 0.6)        # a ended at 200: c reuses its slice; b's does not move
    assert s.slices["d"] == (0.0, 1.0)        # another layer has its own hash space


def test_three_way_overlap_is_caught_even_when_each_pair_fits():
    problems = problems_of("version = 1\n" + exp_toml("a", traffic=0.4) + exp_toml("b", traffic=0.4)
                           + exp_toml("c", traffic=0.4))
    assert len(problems) == 1 and problems[0].startswith("experiments[2].traffic:") and "1.2" in problems[0]


def test_direct_construction_checks_layers_too():
    e = Experiment("a", "", "L", 0, 10, 0.7, (Variant("x", 1.0),))
    with pytest.raises(ExperimentError, match="cannot fit"):
        ExperimentSet(1, (e, Experiment("b", "", "L", 5, 15, 0.7, (Variant("x", 1.0),))))


def test_integer_ranker_means_an_mlflow_version():
    s = loads("version = 1\n" + exp_toml(variants=variant_toml(extra="changes = { ranker = 7 }")))
    assert s.experiments[0].variants[0].changes.ranker == "7"


def test_revision_and_defaults_are_optional_and_parsed():
    assert loads("version = 1\n").revision == 0 and loads("version = 1\n").defaults == Changes()
    s = loads('version = 1\nrevision = 4\n[defaults]\nranker = "champion"\nsources = ["als"]\n')
    assert s.revision == 4 and s.defaults == Changes(sources=("als",), ranker="champion")
    assert ExperimentSet(1, ()).revision == 0       # older constructor calls keep working


def test_cross_layer_knobs_may_coincide_when_disjoint_in_time_or_different():
    ranker = variant_toml(extra="changes = { ranker = 'x' }")
    loads("version = 1\n" + exp_toml("a", variants=ranker)
          + exp_toml("b", layer="M", start=200, end=300, variants=ranker))
    loads("version = 1\n" + exp_toml("a", variants=ranker)
          + exp_toml("b", layer="M", variants=variant_toml(extra="changes = { candidates = 10 }")))
    # Same layer: never the same unit, so the same knob is fine.
    loads("version = 1\n" + exp_toml("a", traffic=0.5, variants=ranker) + exp_toml("b", traffic=0.5, variants=ranker))


def test_direct_construction_checks_cross_layer_knobs_too():
    v = (Variant("x", 1.0, Changes(candidates=10)),)
    with pytest.raises(ExperimentError, match="both change candidates"):
        ExperimentSet(1, (Experiment("a", "", "L", 0, 10, 1.0, v), Experiment("b", "", "M", 5, 15, 1.0, v)))


def test_unknown_experiment_is_its_own_error_type():
    with pytest.raises(UnknownExperiment):
        loads(FULL).get("nope")


WEIRD = ('version = 1\nrevision = 3\n[defaults]\nsources = ["als", "covis"]\nexclude_purchased = true\n'
         + exp_toml("a", start=0.1, end=1e11 + 0.123456789, traffic=0.1 + 0.2,
                    variants=variant_toml("x", 1 / 3) + variant_toml("y", 2 / 3, "changes = { max_per_category = 2 }"),
                    extra='description = "quote \\" backslash \\\\ tab \\t del \\u007f é 🎲"'))


@pytest.mark.parametrize("text", [FULL, WEIRD, "version = 1\n"])
def test_dumps_writes_toml_that_loads_reads_back_equal(text):
    s = loads(text)
    again = loads(dumps(s))
    assert again == s and again.slices == s.slices
    assert dumps(again) == dumps(s)


def test_dumps_writes_utc_datetimes_and_omits_unset_changes():
    text = dumps(loads(FULL))
    assert "start = 2025-01-01T00:00:00Z" in text and "end = 2025-02-01T00:00:00Z" in text
    assert 'changes = { ranker = "challenger", candidates = 300 }' in text and "None" not in text
    assert "traffic = 0.1 + 0.2" not in dumps(loads(WEIRD)) and "traffic = 0.30000000000000004" in dumps(loads(WEIRD))


def test_experiment_json_round_trip_with_iso_or_unix_times():
    e = loads(FULL).experiments[0]
    obj = experiment_to_json(e)
    assert obj["start"] == "2025-01-01T00:00:00Z" and obj["variants"][1]["changes"] == {"ranker": "challenger",
                                                                                        "candidates": 300}
    assert experiment_from_json(obj) == e
    assert experiment_from_json({**obj, "start": JAN, "end": "2025-02-01T01:00:00+01:00"}) == e


def test_experiment_from_json_lists_every_problem_with_body_locations():
    obj = {"id": "a b", "layer": "L", "start": "2025-01-01T00:00:00", "end": "soon", "traffic": 0.5,
           "variants": [{"name": "x", "weight": 0.5}, {"name": "y", "weight": "0.5", "changes": {"ranker": []}}],
           "owner": "me"}
    with pytest.raises(ExperimentError) as err:
        experiment_from_json(obj)
    assert {p.split(":")[0] for p in err.value.problems} == {
        "body.owner", "body.id", "body.start", "body.end", "body.variants[1].weight", "body.variants[1].changes.ranker"}
    with pytest.raises(ExperimentError, match="^body: must be a table"):
        experiment_from_json([1])


def test_changes_json_round_trip_and_errors():
    c = Changes(("als",), "3", 10, 2, False)
    assert changes_to_json(c) == {"sources": ["als"], "ranker": "3", "candidates": 10, "max_per_category": 2,
                                  "exclude_purchased": False}
    assert changes_from_json(changes_to_json(c)) == c and changes_to_json(Changes()) == {}
    with pytest.raises(ExperimentError, match="defaults.candidates"):
        changes_from_json({"candidates": -1}, "defaults")
