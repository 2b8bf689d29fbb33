"""The serving messages: CandidateSet (column-wise), the request's new fields and deadline, the reply."""
from __future__ import annotations

import math
import time

import orjson
import pytest

from recstream.rules import Proposals
from schemas import CandidateSet, Overrides, RecommendationReply, RecommendationRequest, RecommendedItem, SchemaError
from tests import factories
from tests.factories import bind

NOW = time.time()


request = bind(factories.request, kind="similar", created_at=NOW, product_id="p0")


def candidate_dict(**kw) -> dict:
    d = {"request": request().to_dict(), "model_version": "3", "query_source": "product",
         "query": [0.5, -1.0], "product_ids": ["a", "b", "c"],
         "scores": {"covis": [3.0, None, 1], "als": [None, 0.25, None]},
         "anchors": {"covis": ["p0", None, "p0"]},
         "timings_ms": {"retrieval_redis": 1.5}}
    d.update(kw)
    return d


def errors(exc: SchemaError) -> dict[str, str]:
    return {e.field: e.reason for e in exc.errors}


def same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


# -- CandidateSet ---------------------------------------------------------------------------------

def test_candidate_set_nulls_become_nan_and_ints_are_kept_as_numbers():
    cs = CandidateSet.from_dict(candidate_dict())
    assert cs.product_ids == ("a", "b", "c")
    assert cs.scores["covis"][0] == 3.0 and math.isnan(cs.scores["covis"][1]) and cs.scores["covis"][2] == 1
    assert math.isnan(cs.scores["als"][0]) and cs.scores["als"][1] == 0.25
    assert cs.anchors == {"covis": ("p0", None, "p0")}
    assert cs.query == (0.5, -1.0)
    assert cs.request.product_id == "p0"


def test_candidate_set_json_round_trip():
    cs = CandidateSet.from_dict(candidate_dict())
    raw = cs.to_json()
    assert orjson.loads(raw)["scores"]["covis"] == [3.0, None, 1]   # NaN travels as null
    back = CandidateSet.from_json(raw)
    assert back.product_ids == cs.product_ids and back.anchors == cs.anchors
    assert back.request == cs.request and back.query == cs.query and back.timings_ms == cs.timings_ms
    assert back.model_version == "3" and back.query_source == "product"
    assert set(back.scores) == set(cs.scores)
    assert all(same(back.scores[k], cs.scores[k]) for k in cs.scores)


def test_candidate_set_from_proposals_columns():
    p = Proposals(exclude={"p0"})
    p.add_all([("a", 2.0), ("p0", 9.0), ("b", 1.0)], "cobuy", "p0")
    p.add("c", "popular", 4.0, "Phones")
    ids, scores, anchors = p.columns()
    cs = CandidateSet(request=request(), model_version="none", query_source="none", product_ids=tuple(ids),
                      scores=scores, anchors=anchors)
    back = CandidateSet.from_json(cs.to_json())
    assert back.product_ids == ("a", "b", "c")
    assert back.scores["cobuy"][:2] == (2.0, 1.0) and math.isnan(back.scores["cobuy"][2])
    assert back.anchors["popular"] == (None, None, "Phones")


def test_candidate_set_empty_is_valid():
    cs = CandidateSet.from_dict(candidate_dict(product_ids=[], scores={}, anchors={}, query=[]))
    assert cs.product_ids == () and cs.query == ()
    assert CandidateSet.from_json(cs.to_json()).product_ids == ()


@pytest.mark.parametrize("name,value", [
    ("scores", {"covis": [1.0, 2.0]}),
    ("scores", {"als": [1.0, 2.0, 3.0, 4.0]}),
    ("anchors", {"covis": ["p0"]}),
])
def test_candidate_set_refuses_mismatched_column_lengths_naming_the_field(name, value):
    with pytest.raises(SchemaError) as info:
        CandidateSet.from_dict(candidate_dict(**{name: value}))
    errs = errors(info.value)
    assert list(errs) == [name]
    assert next(iter(value)) in errs[name] and "3 candidates" in errs[name]


@pytest.mark.parametrize("bad_value,type_name", [("1.0", "str"), (True, "bool"), ([1], "list"), ({}, "dict")])
def test_candidate_set_refuses_non_numbers_in_scores_naming_the_item(bad_value, type_name):
    with pytest.raises(SchemaError) as info:
        CandidateSet.from_dict(candidate_dict(scores={"covis": [1.0, 2.0, bad_value]}))
    errs = errors(info.value)
    assert list(errs) == ["scores"]
    assert "covis" in errs["scores"] and "item 2" in errs["scores"] and type_name in errs["scores"]


def test_candidate_set_refuses_bad_text_columns_and_shapes():
    with pytest.raises(SchemaError) as info:
        CandidateSet.from_dict(candidate_dict(anchors={"covis": ["p0", 5, None]}))
    assert "item 1" in errors(info.value)["anchors"]
    with pytest.raises(SchemaError) as info:
        CandidateSet.from_dict(candidate_dict(product_ids=["a", None, "c"]))
    assert "item 1" in errors(info.value)["product_ids"]      # a candidate always has an id
    with pytest.raises(SchemaError) as info:
        CandidateSet.from_dict(candidate_dict(product_ids=["a", "b", ""]))
    assert "item 2" in errors(info.value)["product_ids"]
    with pytest.raises(SchemaError) as info:
        CandidateSet.from_dict(candidate_dict(scores={"covis": "1,2,3"}))
    assert "scores" in errors(info.value)
    with pytest.raises(SchemaError) as info:
        CandidateSet.from_dict(candidate_dict(scores=[1, 2, 3]))
    assert "scores" in errors(info.value)
    with pytest.raises(SchemaError) as info:
        CandidateSet.from_dict(candidate_dict(query=["x"]))
    assert "item 0" in errors(info.value)["query"]


def test_candidate_set_refuses_a_bad_nested_request_and_query_source():
    with pytest.raises(SchemaError) as info:
        CandidateSet.from_dict(candidate_dict(request={"request_id": "r", "kind": "nope", "created_at": NOW},
                                              query_source="moon"))
    errs = errors(info.value)
    assert set(errs) == {"request", "query_source"} and "kind" in errs["request"]


# -- RecommendationRequest ------------------------------------------------------------------------

def test_request_new_fields_defaults_and_round_trip():
    r = request()
    assert r.reply_to is None and r.experiments is None and r.overrides is None and r.debug is False
    assert r.deadline_ms == 50
    r = request(reply_to="recs.rec.replies.api-1", experiments={"ranker-test": "b"}, debug=True,
                overrides={"sources": ["als", "popular"], "ranker": "challenger", "candidates": 300,
                           "max_per_category": 0, "exclude_purchased": False})
    back = RecommendationRequest.from_json(r.to_json())
    assert (back.reply_to, back.experiments, back.debug) == ("recs.rec.replies.api-1", {"ranker-test": "b"}, True)
    assert back.overrides == Overrides(sources=("als", "popular"), ranker="challenger", candidates=300,
                                       max_per_category=0, exclude_purchased=False)
    with pytest.raises(SchemaError) as info:
        request(debug="yes")
    assert "debug" in errors(info.value)


def test_request_overrides_name_the_bad_field():
    with pytest.raises(SchemaError) as info:
        request(overrides={"sources": ["als", "telepathy"], "candidates": 0})
    reason = errors(info.value)["overrides"]
    assert "sources" in reason and "telepathy" in reason and "candidates" in reason


def test_request_expires_after_its_deadline():
    r = request(created_at=NOW, deadline_ms=200)
    assert not r.expired(NOW)
    assert not r.expired(NOW + 0.199)
    assert not r.expired(NOW + 0.2)
    assert r.expired(NOW + 0.201)
    assert request(created_at=NOW).expired(NOW + 0.051)          # default deadline: 50 ms
    assert not request(created_at=NOW).expired(NOW + 0.049)


# -- RecommendedItem / RecommendationReply --------------------------------------------------------

def test_reply_round_trip_with_source_cached_and_session_recent():
    items = (RecommendedItem(product_id="a", score=1.5, reason="bought together with “X” in 2 orders",
                             source="cobuy"),
             RecommendedItem(product_id="b", score=0.5, reason="trending now"))
    assert items[1].source == "popular"
    reply = RecommendationReply(request_id="r1", kind="homepage", items=items, cached=True,
                                session_recent=("p1", "p2"), timings_ms={"rules": 0.2})
    back = RecommendationReply.from_json(reply.to_json())
    assert back == reply
    assert back.items[0].source == "cobuy" and back.cached is True and back.session_recent == ("p1", "p2")
    plain = RecommendationReply.from_dict({"request_id": "r2", "kind": "cart", "items": []})
    assert plain.cached is False and plain.session_recent is None and plain.fallback is False
    assert "session_recent" not in orjson.loads(plain.to_json())
