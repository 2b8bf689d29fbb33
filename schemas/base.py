"""Record base: declarative field checks, validation with field-level errors, JSON via orjson."""
from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import orjson

MAX_TEXT = 256           # characters in any id or short string
MAX_FUTURE_SKEW_S = 300  # a timestamp may run this far ahead of the receiver's clock (seconds)
MIN_TIMESTAMP_S = 631_152_000.0  # 1990-01-01: older timestamps are unit mistakes, not shop history

# Ids become Redis keys (user_session:{u1}, covis:{p9}, homecache:{u1}:...) and Kafka keys, and
# cart_items travel comma-separated in a query string. So an id has no whitespace or control characters
# (NUL, newlines: log and key injection), no ':' (the key layout's separator), no '*' '?' '[' ']' '\\'
# (Redis SCAN/KEYS glob syntax), no '{' '}' (they would move a key's Redis Cluster hash tag:
# recstream/features/keys.py) and no ','. Everything else, non-ASCII letters included, is allowed.
# The same pattern is the id fields' OpenAPI `pattern` (ECMA-262 and Python read it alike).
ID_FORBIDDEN = (r"\x00-\x20\x7f-\xa0\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u206f\u3000\ufeff"
                r"\ud800-\udfff\ufff0-\uffff:*?\[\]\\,{}")
ID_PATTERN = f"^[^{ID_FORBIDDEN}]+$"
_ID_RE = re.compile(f"[^{ID_FORBIDDEN}]+")
# Labels (a category, a page name) are names people read, so spaces and punctuation are fine ("Home &
# Garden"), but they too end up in Redis keys (popcat:{g}:{category}:...), the homepage cache key and
# log lines: no control characters (NUL, newlines), line separators or bidi overrides, and no '{' '}'
# (hash tags, as for ids). Every id is a label.
LABEL_FORBIDDEN = r"\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff{}"
LABEL_PATTERN = f"^[^{LABEL_FORBIDDEN}]*$"
_LABEL_BAD = re.compile(f"[{LABEL_FORBIDDEN}]")


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class SchemaError(ValueError):
    """A record failed validation; `errors` names each bad field and why."""

    def __init__(self, record: str, errors: list[FieldError]):
        self.record = record
        self.errors = errors
        super().__init__(f"invalid {record}: " + "; ".join(map(str, errors)))

    def to_dict(self) -> dict[str, Any]:
        return {"error": "invalid " + self.record, "fields": [dataclasses.asdict(e) for e in self.errors]}


class Invalid(Exception):
    """Raised by a check with the reason; the record adds the field name."""


# -- checks: each takes the raw JSON value and returns the typed value or raises Invalid ---------

@dataclass(frozen=True, slots=True)
class Text:
    max_len: int = MAX_TEXT
    min_len: int = 1

    def __call__(self, v: Any, now: float) -> str:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise Invalid(f"expected a string, got {type(v).__name__}")
        s = str(v)
        if len(s) < self.min_len:
            raise Invalid("must not be empty")
        if len(s) > self.max_len:
            raise Invalid(f"longer than {self.max_len} characters ({len(s)})")
        return s

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "minLength": self.min_len, "maxLength": self.max_len}


@dataclass(frozen=True, slots=True)
class Id(Text):
    """An identifier (user, product, session, event, request): Text plus ID_PATTERN's characters
    (a Text, so whatever maps Text, such as the Arrow schema, takes it as a string)."""

    def __call__(self, v: Any, now: float) -> str:
        s = Text.__call__(self, _string(v), now)
        if not _ID_RE.fullmatch(s):
            bad = next(c for c in s if not _ID_RE.fullmatch(c))
            raise Invalid(f"character {bad!r} not allowed in an id (no whitespace, control characters or :*?[]\\,{{}})")
        return s

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "minLength": max(self.min_len, 1), "maxLength": self.max_len, "pattern": ID_PATTERN}


@dataclass(frozen=True, slots=True)
class Label(Text):
    """A category or page name: a string (Text) without LABEL_FORBIDDEN's characters."""

    def __call__(self, v: Any, now: float) -> str:
        s = Text.__call__(self, _string(v), now)
        bad = _LABEL_BAD.search(s)
        if bad:
            raise Invalid(f"character {bad.group()!r} not allowed (no control characters, line breaks or {{}})")
        return s

    def json_schema(self) -> dict[str, Any]:
        return {**Text.json_schema(self), "pattern": LABEL_PATTERN}


def _string(v: Any) -> str:
    """Ids and labels are JSON strings: a number (user_id: 42) is a client's mistake, not an id."""
    if not isinstance(v, str):
        raise Invalid(f"expected a string, got {type(v).__name__}")
    return v


@dataclass(frozen=True, slots=True)
class Number:
    lo: float | None = None
    hi: float | None = None
    integer: bool = False

    def __call__(self, v: Any, now: float) -> float | int:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise Invalid(f"expected a number, got {type(v).__name__}")
        if self.integer and (isinstance(v, float) and not v.is_integer()):
            raise Invalid("expected an integer")
        if not math.isfinite(v):
            raise Invalid("must be finite")
        if self.lo is not None and v < self.lo:
            raise Invalid(f"must be at least {self.lo:g}, got {v:g}")
        if self.hi is not None and v > self.hi:
            raise Invalid(f"must be at most {self.hi:g}, got {v:g}")
        return int(v) if self.integer else float(v)

    def json_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer" if self.integer else "number"}
        if self.lo is not None:
            out["minimum"] = int(self.lo) if self.integer else self.lo
        if self.hi is not None:
            out["maximum"] = int(self.hi) if self.integer else self.hi
        return out


@dataclass(frozen=True, slots=True)
class Choice:
    options: tuple[str, ...]

    def __call__(self, v: Any, now: float) -> str:
        if not isinstance(v, str) or v not in self.options:   # the options are strings: no other value is one
            raise Invalid(f"{str(v)[:40]!r} is not one of {', '.join(self.options)}")
        return v

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": list(self.options)}


@dataclass(frozen=True, slots=True)
class Flag:
    def __call__(self, v: Any, now: float) -> bool:
        if not isinstance(v, bool):
            raise Invalid(f"expected true or false, got {type(v).__name__}")
        return v

    def json_schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True, slots=True)
class Timestamp:
    """Unix seconds (int or float); unit slips (milliseconds) and far-future clocks are refused."""

    def __call__(self, v: Any, now: float) -> float:
        t = Number()(v, now)
        if t < MIN_TIMESTAMP_S:
            raise Invalid(f"{t:g} is before 1990-01-01; expected Unix seconds")
        if t > now + MAX_FUTURE_SKEW_S:
            raise Invalid(f"{t:.0f} is {t - now:.0f} s in the future (at most {MAX_FUTURE_SKEW_S} s allowed)")
        return t

    def json_schema(self, now: float | None = None) -> dict[str, Any]:
        """The upper bound moves with the clock: the schema's is as of `now` (default: when generated)."""
        now = time.time() if now is None else now
        return {"type": "number", "minimum": MIN_TIMESTAMP_S, "maximum": math.floor(now) + MAX_FUTURE_SKEW_S}


@dataclass(frozen=True, slots=True)
class ListOf:
    item: Any
    max_items: int = 100
    min_items: int = 0

    def __call__(self, v: Any, now: float) -> tuple[Any, ...]:
        if not isinstance(v, (list, tuple)):
            raise Invalid(f"expected a list, got {type(v).__name__}")
        if len(v) < self.min_items:
            raise Invalid(f"needs at least {self.min_items} item(s)")
        if len(v) > self.max_items:
            raise Invalid(f"more than {self.max_items} items ({len(v)})")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(self.item(x, now))
            except Invalid as exc:
                raise Invalid(f"item {i}: {exc}") from None
        return tuple(out)

    def json_schema(self) -> dict[str, Any]:
        return {"type": "array", "items": json_schema(self.item), "minItems": self.min_items, "maxItems": self.max_items}


@dataclass(frozen=True, slots=True)
class Nested:
    record: type[Record]

    def __call__(self, v: Any, now: float) -> Record:
        try:
            return self.record.from_dict(v, now=now)
        except SchemaError as exc:
            raise Invalid("; ".join(map(str, exc.errors))) from None

    def json_schema(self) -> dict[str, Any]:
        return self.record.json_schema()


@dataclass(frozen=True, slots=True)
class StrMap:
    max_items: int = 32

    def __call__(self, v: Any, now: float) -> dict[str, str]:
        if not isinstance(v, dict):
            raise Invalid(f"expected an object, got {type(v).__name__}")
        if len(v) > self.max_items:
            raise Invalid(f"more than {self.max_items} keys ({len(v)})")
        return {Text()(k, now): Text(min_len=0)(x, now) for k, x in v.items()}

    def json_schema(self) -> dict[str, Any]:
        return {"type": "object", "maxProperties": self.max_items, "additionalProperties": Text(min_len=0).json_schema()}


@dataclass(frozen=True, slots=True)
class NumMap:
    max_items: int = 32

    def __call__(self, v: Any, now: float) -> dict[str, float]:
        if not isinstance(v, dict):
            raise Invalid(f"expected an object, got {type(v).__name__}")
        if len(v) > self.max_items:
            raise Invalid(f"more than {self.max_items} keys ({len(v)})")
        return {Text()(k, now): Number()(x, now) for k, x in v.items()}

    def json_schema(self) -> dict[str, Any]:
        return {"type": "object", "maxProperties": self.max_items, "additionalProperties": {"type": "number"}}


def json_schema(rule: Any) -> dict[str, Any]:
    """The JSON Schema (OpenAPI 3.0 dialect) of a check; a check without `json_schema` is described as any value."""
    describe = getattr(rule, "json_schema", None)
    return describe() if describe is not None else {}


_REQUIRED = object()


def check(rule: Any, *, default: Any = _REQUIRED, doc: str = "") -> Any:
    """Declare a record field: its check, its default (absent = required) and its meaning."""
    meta = {"check": rule, "doc": doc}
    if default is _REQUIRED:
        return field(metadata=meta)
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return field(default=default, metadata=meta)


class Record:
    """Base of every schema: `from_dict`/`from_json` validate, `to_dict`/`to_json` serialise."""

    SCHEMA: ClassVar[str]
    VERSION: ClassVar[int] = 1
    # Every record is a dataclass (declared on the subclass): this tells the checker so, for dataclasses.fields.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]
    __slots__ = ()

    @classmethod
    def from_dict(cls, data: Any, *, now: float | None = None) -> Self:
        if not isinstance(data, Mapping):
            raise SchemaError(cls.SCHEMA, [FieldError("<record>", f"expected a JSON object, got {type(data).__name__}")])
        now = time.time() if now is None else now
        errors: list[FieldError] = []
        version = data.get("version", cls.VERSION)
        if version != cls.VERSION:
            errors.append(FieldError("version", f"unsupported version {version!r}; this reader takes {cls.VERSION}"))
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = data.get(f.name)
            if raw is None:
                if f.default is dataclasses.MISSING:
                    errors.append(FieldError(f.name, "is required"))
                continue
            try:
                values[f.name] = f.metadata["check"](raw, now)
            except Invalid as exc:
                errors.append(FieldError(f.name, str(exc)))
        unknown = set(data) - cls._names() - {"version"}
        errors.extend(FieldError(k[:40], "unknown field") for k in sorted(map(str, unknown)))
        if not errors:
            try:
                record = cls(**values)
                record.validate()
                return record
            except Invalid as exc:
                field_name, _, reason = str(exc).partition(": ")
                errors.append(FieldError(field_name, reason))
        raise SchemaError(cls.SCHEMA, errors)

    @classmethod
    def from_json(cls, raw: bytes | str, *, now: float | None = None) -> Self:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise SchemaError(cls.SCHEMA, [FieldError("<body>", f"malformed JSON: {exc}")]) from None
        return cls.from_dict(data, now=now)

    @classmethod
    def _names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def validate(self) -> None:
        """Cross-field rules; raise Invalid("field: reason")."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.VERSION}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            out[f.name] = _plain(v)
        return out

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def json_schema(cls, *, strict: bool = True) -> dict[str, Any]:
        """The record's JSON Schema, derived from the field checks (the checks stay the one source of
        truth). strict: unknown fields refused, as from_dict does (request bodies); not strict: a
        reader's view that tolerates additions (response bodies). Absent and null are the same."""
        props: dict[str, Any] = {"version": {"type": "integer", "enum": [cls.VERSION]}}
        required = []
        for f in dataclasses.fields(cls):
            schema = {**json_schema(f.metadata["check"])}
            if f.metadata["doc"]:
                schema["description"] = f.metadata["doc"]
            if f.default is dataclasses.MISSING:
                required.append(f.name)
            else:
                schema["nullable"] = True
                if f.default is not None and not isinstance(f.default, tuple):
                    schema["default"] = f.default
            props[f.name] = schema
        out: dict[str, Any] = {"type": "object", "title": cls.SCHEMA, "properties": props, "required": required}
        if strict:
            out["additionalProperties"] = False
        return out

    @classmethod
    def describe(cls) -> Iterable[tuple[str, bool, str]]:
        """(field, required, doc) rows: the documentation derives from the schema."""
        for f in dataclasses.fields(cls):
            yield f.name, f.default is dataclasses.MISSING, f.metadata["doc"]


def _plain(v: Any) -> Any:
    if isinstance(v, Record):
        return v.to_dict()
    if isinstance(v, tuple):   # a field's items are all of one check (ListOf, a column): look at the first
        return [_plain(x) for x in v] if v and isinstance(v[0], (Record, tuple)) else list(v)
    return v
