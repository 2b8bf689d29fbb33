"""Arrow schemas derived from the records' field checks: what the archive writes and Spark reads."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from schemas.base import Choice, Flag, ListOf, Nested, Number, NumMap, Record, StrMap, Text, Timestamp

# Schema-level metadata keys: a Parquet file names the record and version it holds.
META_SCHEMA, META_VERSION = b"recstream.schema", b"recstream.version"


def arrow_type(rule: Any) -> pa.DataType:
    """The Arrow type of the values a check returns (Timestamp stays float64 Unix seconds, as on the wire)."""
    # Timestamp before Number: it returns a float but is its own check, kept explicit here.
    if isinstance(rule, Timestamp):
        return pa.float64()
    if isinstance(rule, (Text, Choice)):
        return pa.string()
    if isinstance(rule, Number):
        return pa.int64() if rule.integer else pa.float64()
    if isinstance(rule, Flag):
        return pa.bool_()
    if isinstance(rule, ListOf):
        return pa.list_(arrow_type(rule.item))
    if isinstance(rule, Nested):
        # python/mypy#11470: mypy sees no __hash__ on a type[X] variable (a class is hashable)
        return pa.struct(list(arrow_schema(rule.record)))  # type: ignore[arg-type]
    if isinstance(rule, StrMap):
        return pa.map_(pa.string(), pa.string())
    if isinstance(rule, NumMap):
        return pa.map_(pa.string(), pa.float64())
    raise TypeError(f"no Arrow type for check {rule!r}: add it to schemas/arrow.py")


@functools.cache
def arrow_schema(record: type[Record]) -> pa.Schema:
    """One Arrow field per dataclass field, in declaration order; nullable iff its default is None."""
    fields = []
    for f in dataclasses.fields(record):
        nullable = f.default is None
        fields.append(pa.field(f.name, arrow_type(f.metadata["check"]), nullable=nullable,
                               metadata={"doc": f.metadata.get("doc", "")}))
    return pa.schema(fields, metadata={META_SCHEMA: record.SCHEMA, META_VERSION: str(record.VERSION)})


def _plain(v: Any) -> Any:
    """A field value as Arrow takes it: nested records become dicts, tuples lists, dicts pair lists."""
    if isinstance(v, Record):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return list(v.items())
    return v


def to_table(records: Iterable[Record], record: type[Record] | None = None) -> pa.Table:
    """Records of one class as a Table with that class's schema; `record` is needed when empty."""
    rows = list(records)
    record = record or (type(rows[0]) if rows else None)
    if record is None:
        raise ValueError("to_table needs the record class when there are no records")
    if any(type(r) is not record for r in rows):
        raise TypeError(f"to_table takes records of one class ({record.__name__})")
    schema = arrow_schema(record)  # type: ignore[arg-type]  # python/mypy#11470, as in arrow_type
    columns = [pa.array([_plain(getattr(r, f.name)) for r in rows], type=f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)
