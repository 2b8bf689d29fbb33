"""The API's A/B edge (serving/experiments.py, serving/recommend.status): assignment into a request,
its overrides, and the exposure record of what was served."""
import time

import pytest

from recstream.experiments.definition import Changes, ExperimentError, loads
from recstream.experiments.store import ExperimentStore
from recstream.settings import load
from schemas import Exposure, Overrides, RecommendationReply, RecommendedItem, SchemaError
from serving.experiments import Experiments, exposure, overrides_of
from serving.recommend import DEADLINE_MISSED, _variant_tag, status
from tests import factories
from tests.factories import bind

NOW = time.time()
FILE = f"""
version = 1

[defaults]
max_per_category = 2

[[experiments]]
id = "sources"
layer = "retrieval"
start = {NOW - 3600}
end = {NOW + 86400}
traffic = 1.0
[[experiments.variants]]
name = "control"
weight = 0.5
[[experiments.variants]]
name = "trending"
weight = 0.5
changes = {{ sources = ["popular"] }}

[[experiments]]
id = "diversity"
layer = "rules"
start = {NOW - 3600}
end = {NOW + 86400}
traffic = 1.0
[[experiments.variants]]
name = "control"
weight = 0.5
[[experiments.variants]]
name = "strict"
weight = 0.5
changes = {{ max_per_category = 1 }}
"""


@pytest.fixture
def ab(tmp_path) -> Experiments:
    path = tmp_path / "experiments.toml"
    path.write_text(FILE)
    s = load({"RECSTREAM_EXPERIMENTS_FILE": str(path)})
    return Experiments(s, ExperimentStore(path))


request = bind(factories.request, request_id="r" * 32, created_at=NOW)


def test_a_user_gets_one_variant_per_experiment_with_its_changes_over_the_defaults(ab):
    seen = {"sources": set(), "diversity": set()}
    for i in range(200):
        req = ab.assign(request(user_id=f"user-{i}"), NOW)
        assert set(req.experiments) == {"sources", "diversity"}
        for exp, variant in req.experiments.items():
            seen[exp].add(variant)
        ov = req.overrides
        assert ov.sources == (("popular",) if req.experiments["sources"] == "trending" else None)
        assert ov.max_per_category == (1 if req.experiments["diversity"] == "strict" else 2)   # defaults: 2
        assert ab.assign(request(user_id=f"user-{i}"), NOW) == req    # stable for the same user
    assert seen == {"sources": {"control", "trending"}, "diversity": {"control", "strict"}}


def test_without_user_or_session_no_experiment_but_the_defaults(ab):
    req = ab.assign(request(), NOW)
    assert req.experiments is None and req.overrides == Overrides(max_per_category=2)
    by_session = ab.assign(request(session_id="s-1"), NOW)
    assert set(by_session.experiments) == {"sources", "diversity"}


def test_after_the_end_nobody_is_assigned(ab):
    req = ab.assign(request(user_id="u1"), NOW + 2 * 86400)
    assert req.experiments is None and req.overrides == Overrides(max_per_category=2)


def test_overrides_of_no_changes_is_none():
    assert overrides_of(Changes()) is None
    assert overrides_of(Changes(ranker="challenger", candidates=300)) == Overrides(ranker="challenger", candidates=300)


def test_cache_tag_separates_variants_and_is_stable():
    a = request(user_id="u", experiments={"e": "a"})
    b = request(user_id="u", experiments={"e": "b"})
    assert _variant_tag(request(user_id="u")) == "-"
    assert _variant_tag(a) != _variant_tag(b) and _variant_tag(a) == _variant_tag(request(user_id="x", experiments={"e": "a"}))


def reply(**kw) -> RecommendationReply:
    items = tuple(RecommendedItem(product_id=p, score=1.0, reason="r") for p in ("p1", "p2", "p3"))
    return RecommendationReply(request_id="r" * 32, kind="homepage", items=items, **kw)


def test_status_tells_agents_cache_and_the_two_fallbacks_apart():
    assert status(reply()) == "ok"
    assert status(reply(cached=True)) == "cached"
    assert status(reply(fallback=True, error=f"{DEADLINE_MISSED} 40 ms")) == "fallback_deadline"
    assert status(reply(fallback=True, error="KafkaConnectionError: down")) == "fallback_error"


def test_exposure_lists_items_with_positions_and_round_trips(ab):
    req = ab.assign(request(user_id="u7", session_id="s7"), NOW)
    e = exposure(req, reply(model_version="12"), "ok", NOW + 0.015)
    assert (e.unit, e.items, e.positions, e.model_version) == ("u:u7", ("p1", "p2", "p3"), (1, 2, 3), "12")
    assert e.experiments == req.experiments and e.key == b"u7"
    assert abs(e.latency_ms - 15.0) < 1e-3
    assert Exposure.from_json(e.to_json()) == e
    anonymous = exposure(request(), reply(), "fallback_error", NOW)
    assert anonymous.unit == "r:" + "r" * 32 and anonymous.user_id is None


def test_exposure_schema_names_bad_fields():
    with pytest.raises(SchemaError) as info:
        Exposure.from_dict({"request_id": "x", "ts": NOW, "kind": "homepage", "unit": "u:1", "items": ["a", "b"],
                            "positions": [1], "status": "great", "latency_ms": -1})
    fields = {e.field for e in info.value.errors}
    assert {"status", "latency_ms"} <= fields
    with pytest.raises(SchemaError) as info:
        Exposure.from_dict({"request_id": "x", "ts": NOW, "kind": "homepage", "unit": "u:1", "items": ["a", "b"],
                            "positions": [1], "status": "ok", "latency_ms": 1})
    assert info.value.errors[0].field == "positions"


def test_a_broken_file_keeps_the_last_good_experiments(ab, tmp_path):
    before = ab.store.current
    path = tmp_path / "experiments.toml"
    path.write_text(FILE.replace("weight = 0.5\nchanges = { max_per_category = 1 }", "weight = 0.7\n"))
    ab.store.refresh()
    assert ab.store.current == before and ab.store.error
    assert ab.assign(request(user_id="u1"), NOW).experiments is not None


def test_the_example_file_parses():
    assert loads(FILE).defaults == Changes(max_per_category=2)


def test_an_experiment_scoped_to_a_kind_leaves_the_other_widgets_alone(tmp_path):
    path = tmp_path / "experiments.toml"
    path.write_text(FILE.replace('layer = "retrieval"', 'layer = "retrieval"\nkinds = ["homepage"]'))
    ab = Experiments(load({"RECSTREAM_EXPERIMENTS_FILE": str(path)}), ExperimentStore(path))
    home = ab.assign(request(user_id="u1"), NOW)
    similar = ab.assign(request(user_id="u1", kind="similar", product_id="p1"), NOW)
    assert set(home.experiments) == {"sources", "diversity"}
    assert set(similar.experiments) == {"diversity"}
    assert similar.experiments["diversity"] == home.experiments["diversity"]


def test_kinds_must_be_known():
    with pytest.raises(ExperimentError, match=r"experiments\[0\].kinds"):
        loads(FILE.replace('layer = "retrieval"', 'layer = "retrieval"\nkinds = ["checkout"]'))
