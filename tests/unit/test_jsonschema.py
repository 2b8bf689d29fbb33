"""The published JSON Schemas (docs/schemas) are current, and agree with the records' validators."""
import time
from pathlib import Path

import jsonschema_rs  # schemathesis' validator (dev extra)
import orjson
import pytest

from schemas import Event, Product, SchemaError
from schemas.jsonschema import published, record_schema

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schemas"
NOW = time.time()
EVENT = {"version": 1, "event_id": "e1", "user_id": "u1", "session_id": "s1", "product_id": "p1",
         "event_type": "view", "timestamp": NOW - 5}
PRODUCT = {"product_id": "p1", "title": "Item", "category_path": ["Shop", "Audio"], "price": 9.5,
           "created_at": NOW - 86400}


def test_the_files_in_docs_are_what_the_schemas_generate():
    assert {p.name: p.read_bytes() for p in DOCS.glob("*.schema.json")} == published(), \
        "regenerate: python -m schemas.jsonschema docs/schemas"


@pytest.mark.parametrize("record, base, change, valid", [
    (Event, EVENT, {}, True),
    (Event, EVENT, {"version": None}, True),            # absent: version 1
    (Event, EVENT, {"price": None, "category": None}, True),
    (Event, {**EVENT, "price": None}, {}, True),        # null: as absent
    (Event, EVENT, {"device": "mobile", "price": 19.9, "quantity": 2, "page": "product"}, True),
    (Event, EVENT, {"event_type": "wish"}, False),
    (Event, EVENT, {"session_id": None}, False),
    (Event, EVENT, {"user_id": "a b"}, False),
    (Event, EVENT, {"extra": 1}, False),
    (Event, EVENT, {"version": 2}, False),
    (Event, EVENT, {"quantity": 0}, False),
    (Event, EVENT, {"timestamp": 1e8}, False),
    (Product, PRODUCT, {}, True),
    (Product, PRODUCT, {"in_stock": False, "rating": None}, True),
    (Product, PRODUCT, {"category_path": []}, False),
    (Product, PRODUCT, {"price": -1}, False),
])
def test_the_schema_accepts_what_the_record_accepts(record, base, change, valid):
    doc = {k: v for k, v in {**base, **change}.items() if not (k in change and change[k] is None)}  # None: left out
    errors = list(jsonschema_rs.Draft202012Validator(record_schema(record)).iter_errors(doc))
    try:
        record.from_json(orjson.dumps(doc))
        accepted = True
    except SchemaError:
        accepted = False
    assert (not errors) is valid and accepted is valid


def test_the_schema_is_a_valid_draft_2020_12_schema():
    for _name, body in published().items():
        jsonschema_rs.meta.validate(orjson.loads(body))
