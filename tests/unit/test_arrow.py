import dataclasses
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import Event, Product, RecommendationReply, RecommendationRequest, RecommendedItem
from schemas.arrow import META_SCHEMA, META_VERSION, arrow_schema, arrow_type, to_table
from schemas.base import Choice, Flag, ListOf, Nested, Number, NumMap, StrMap, Text, Timestamp
from tests.factories import event_json

NOW = 1_764_000_000.0


@pytest.mark.parametrize("rule, expected", [
    (Text(), pa.string()),
    (Choice(("a", "b")), pa.string()),
    (Number(integer=True), pa.int64()),
    (Number(lo=0, hi=1), pa.float64()),
    (Timestamp(), pa.float64()),
    (Flag(), pa.bool_()),
    (ListOf(Text()), pa.list_(pa.string())),
    (ListOf(Number(integer=True)), pa.list_(pa.int64())),
    (StrMap(), pa.map_(pa.string(), pa.string())),
    (NumMap(), pa.map_(pa.string(), pa.float64())),
    (Nested(RecommendedItem), pa.struct([pa.field("product_id", pa.string(), nullable=False),
                                         pa.field("score", pa.float64(), nullable=False),
                                         pa.field("reason", pa.string(), nullable=False),
                                         pa.field("source", pa.string(), nullable=False)])),
])
def test_each_check_maps_to_its_arrow_type(rule, expected):
    assert arrow_type(rule) == expected


def test_an_unknown_check_is_refused_by_name():
    with pytest.raises(TypeError, match="no Arrow type for check"):
        arrow_type(object())


def test_event_schema_follows_the_dataclass_fields_and_their_defaults():
    schema = arrow_schema(Event)
    assert schema.names == [f.name for f in dataclasses.fields(Event)]
    assert [(f.name, f.type, f.nullable) for f in schema] == [
        ("event_id", pa.string(), False), ("user_id", pa.string(), False), ("session_id", pa.string(), False),
        ("product_id", pa.string(), False), ("event_type", pa.string(), False),
        ("timestamp", pa.float64(), False), ("device", pa.string(), False), ("page", pa.string(), False),
        ("price", pa.float64(), True), ("quantity", pa.int64(), False), ("category", pa.string(), True),
        ("rec_request_id", pa.string(), True)]
    assert schema.metadata == {META_SCHEMA: b"event", META_VERSION: b"1"}
    assert schema.field("event_id").metadata[b"doc"].startswith(b"unique id")


@pytest.mark.parametrize("record", [Event, Product, RecommendationRequest, RecommendationReply, RecommendedItem])
def test_every_record_has_an_arrow_schema(record):
    assert len(arrow_schema(record)) == len(dataclasses.fields(record))


def sample_event(i: int, **changes) -> Event:
    """Validated as a consumer reads it (a field given as None is left out)."""
    data = event_json(i, t0=NOW, dt=-1, **{"kind": "purchase", "price": 9.5, "quantity": 2, **changes})
    return Event.from_dict({k: v for k, v in data.items() if v is not None}, now=NOW)


def parquet_round_trip(table: pa.Table) -> pa.Table:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    buf.seek(0)
    return pq.read_table(buf)


def back(record, table: pa.Table) -> list:
    return [record.from_dict({k: v for k, v in row.items() if v is not None}, now=NOW) for row in table.to_pylist()]


def test_events_survive_a_parquet_round_trip_with_nulls():
    events = [sample_event(1), sample_event(2, price=None, category="Shoes", rec_request_id="r1")]
    table = parquet_round_trip(to_table(events))
    assert table.schema.equals(arrow_schema(Event), check_metadata=True)
    assert table.column("price").to_pylist() == [9.5, None]
    assert back(Event, table) == events


def test_nested_lists_and_maps_round_trip():
    reply = RecommendationReply.from_dict({
        "request_id": "r1", "kind": "similar", "fallback": True, "timings_ms": {"rank": 1.5},
        "items": [{"product_id": "p1", "score": 0.9, "reason": "als"}]}, now=NOW)
    request = RecommendationRequest.from_dict({
        "request_id": "q1", "kind": "cart", "created_at": NOW, "cart_items": ["p1", "p2"],
        "context": {"device": "mobile"}}, now=NOW)
    for record in (reply, request):
        table = parquet_round_trip(to_table([record]))
        row = {k: v for k, v in table.to_pylist()[0].items() if v is not None}
        row = {k: dict(v) if isinstance(v, list) and v and isinstance(v[0], tuple) else v for k, v in row.items()}
        assert type(record).from_dict(row, now=NOW) == record


def test_empty_table_needs_the_record_class():
    assert to_table([], Event).schema == arrow_schema(Event)
    assert to_table([], Event).num_rows == 0
    with pytest.raises(ValueError, match="needs the record class"):
        to_table([])


def test_mixed_records_are_refused():
    item = RecommendedItem(product_id="p1", score=1.0, reason="x")
    with pytest.raises(TypeError, match="one class"):
        to_table([sample_event(1), item])
