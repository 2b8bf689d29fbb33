"""The records' JSON Schema (draft 2020-12) for services that publish to Kafka directly.

Derived from the same field checks as the OpenAPI document (Record.json_schema), in the standalone
dialect: a nullable field is typed `[t, "null"]`. A timestamp's upper bound moves with the clock
(at most 300 s ahead of the receiver's), so the published schema states it in the description and
`x-max-future-s` instead of a `maximum`. docs/schemas/*.schema.json are this module's output
(`python -m schemas.jsonschema docs/schemas`); the API serves the same at /schemas/{name}.schema.json.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import orjson

from schemas.base import MAX_FUTURE_SKEW_S, Record, Timestamp
from schemas.catalogue import Product
from schemas.events import Event

DIALECT = "https://json-schema.org/draft/2020-12/schema"
SURROGATES = "\\ud800-\\udfff"
PUBLISHED: dict[str, type[Record]] = {"event": Event, "product": Product}   # name -> record, in docs/schemas/


def record_schema(record: type[Record]) -> dict[str, Any]:
    """The JSON Schema of one record as a Kafka value (unknown fields refused, as the consumers do)."""
    openapi = record.json_schema(strict=True)
    props = {}
    for name, prop in openapi["properties"].items():
        prop = _standalone(prop)
        f = next((f for f in dataclasses.fields(record) if f.name == name), None)
        if f is not None and isinstance(f.metadata["check"], Timestamp):
            prop.pop("maximum", None)
            prop["x-max-future-s"] = MAX_FUTURE_SKEW_S
        props[name] = prop
    doc = (sys.modules[record.__module__].__doc__ or record.SCHEMA).strip().splitlines()[0]
    return {"$schema": DIALECT, "$id": f"urn:recstream:schema:{record.SCHEMA}:{record.VERSION}",
            "title": record.__name__, "description": doc, "type": "object", "properties": props,
            "required": openapi["required"], "additionalProperties": False}


def _standalone(node: Any) -> Any:
    """OpenAPI 3.0's `nullable` as draft 2020-12 says it, through nested schemas. Patterns lose their
    surrogate range: a UTF-8 record cannot hold a lone surrogate (the decoder refuses it before any
    check), and regex engines without UTF-16 (Rust's, Go's RE2) refuse the range as a pattern."""
    if isinstance(node, list):
        return [_standalone(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _standalone(v) for k, v in node.items() if k != "nullable"}
    if isinstance(out.get("pattern"), str):
        out["pattern"] = out["pattern"].replace(SURROGATES, "")
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def published() -> dict[str, bytes]:
    """File name -> bytes of every published schema, as docs/schemas holds them."""
    return {f"{name}.schema.json": orjson.dumps(record_schema(rec), option=orjson.OPT_INDENT_2) + b"\n"
            for name, rec in PUBLISHED.items()}


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas")
    out.mkdir(parents=True, exist_ok=True)
    for name, body in published().items():
        (out / name).write_bytes(body)
        print(out / name)
