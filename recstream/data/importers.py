"""Importers: public dataset formats and a generic CSV, turned into validated Events.

Every malformed row is reported with its line number: skipped and listed (on_error="skip") or
raised at once (on_error="stop"); a row is never dropped silently.
"""
from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas import Event, Product, SchemaError

SESSION_GAP_S = 30 * 60
Row = tuple[int, dict[str, Any]]  # (line number in the file, event fields)


@dataclass(frozen=True, slots=True)
class RowError:
    path: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.reason}"


class DataError(ValueError):
    def __init__(self, error: RowError):
        self.error = error
        super().__init__(str(error))


@dataclass
class Dataset:
    name: str
    events: list[Event]
    products: list[Product] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)


def event_id(source: str, *parts: Any) -> str:
    """Deterministic id, so importing the same file twice yields the same ids (idempotent replay)."""
    return source + "-" + hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=10).hexdigest()


def _validate(rows: Iterable[Row], path: Path, on_error: str, now: float | None) -> tuple[list[Event], list[RowError]]:
    events: list[Event] = []
    errors: list[RowError] = []
    for line, data in rows:
        try:
            events.append(Event.from_dict(data, now=now))
        except SchemaError as exc:
            err = RowError(path.name, line, exc.errors[0].field, "; ".join(map(str, exc.errors)))
            if on_error == "stop":
                raise DataError(err) from None
            errors.append(err)
    events.sort(key=lambda e: e.timestamp)
    return events, errors


def _read_csv(path: Path, delimiter: str = ",") -> Iterator[tuple[int, dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            yield reader.line_num, row


def _number(v: str | None) -> float | str | None:
    """Numbers from CSV cells; anything else passes through for the schema to refuse by name."""
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return v


def sessionize(rows: list[Row], gap_s: float = SESSION_GAP_S) -> list[Row]:
    """Give rows without a session one: a new session after `gap_s` of a user's inactivity."""
    timed = [r for r in rows if isinstance(r[1].get("timestamp"), float)]
    untimed = [r for r in rows if not isinstance(r[1].get("timestamp"), float)]  # refused later, by name
    timed.sort(key=lambda r: (str(r[1].get("user_id")), r[1]["timestamp"]))
    last: dict[str, float] = {}
    counter: dict[str, int] = {}
    for _, data in timed:
        user, t = str(data.get("user_id")), data["timestamp"]
        if user not in last or t - last[user] > gap_s:
            counter[user] = counter.get(user, -1) + 1
        last[user] = t
        data.setdefault("session_id", f"{user}-{counter[user]}")
    return timed + untimed


# -- formats ------------------------------------------------------------------------------------

def generic_rows(path: Path) -> list[Row]:
    """Columns user_id, product_id, event_type, timestamp (Unix s); optional: event_id, session_id,
    price, quantity, category, device, page, rec_request_id. Missing sessions are derived."""
    rows = []
    for line, row in _read_csv(path):
        data: dict[str, Any] = {k: v for k, v in row.items() if k and v not in (None, "")}
        for k in ("timestamp", "price", "quantity"):
            if k in data:
                data[k] = _number(data[k])
        data.setdefault("event_id", event_id("csv", path.name, line))
        rows.append((line, data))
    return sessionize(rows)


TAOBAO_TYPES = {"pv": "view", "fav": "click", "cart": "add_to_cart", "buy": "purchase"}


def taobao_rows(path: Path) -> list[Row]:
    """Taobao UserBehavior: user_id,item_id,category_id,behavior_type,timestamp. `fav` (a saved
    item) maps to click: more intent than a view, less than a cart."""
    rows = []
    for line, r in _read_csv(path):
        rows.append((line, {
            "event_id": event_id("tb", r.get("user_id"), r.get("item_id"), r.get("behavior_type"), r.get("timestamp"), line),
            "user_id": r.get("user_id"), "product_id": r.get("item_id"), "category": r.get("category_id") or None,
            "event_type": TAOBAO_TYPES.get(r.get("behavior_type") or "", r.get("behavior_type")),
            "timestamp": _number(r.get("timestamp")),
        }))
    return sessionize(rows)


def yoochoose_rows(path: Path) -> list[Row]:
    """YooChoose clicks (session-rec layout): SessionId<TAB>ItemId<TAB>Time. No user ids: the
    session stands in for the user."""
    return [(line, {
        "event_id": event_id("yc", r.get("SessionId"), r.get("ItemId"), r.get("Time")),
        "user_id": f"s{r.get('SessionId')}", "session_id": r.get("SessionId"), "product_id": r.get("ItemId"),
        "event_type": "click", "timestamp": _number(r.get("Time")),
    }) for line, r in _read_csv(path, delimiter="\t")]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")


def groceries_rows(path: Path) -> list[Row]:
    """Groceries baskets: Member_number,Date (dd-mm-yyyy),itemDescription. A basket is one member's
    day: one session of purchases at noon UTC; the product id is the item's slug."""
    rows = []
    for line, r in _read_csv(path):
        member, day, item = r.get("Member_number"), r.get("Date") or "", r.get("itemDescription") or ""
        try:
            ts: Any = datetime.strptime(day, "%d-%m-%Y").replace(hour=12, tzinfo=UTC).timestamp()
        except ValueError:
            ts = day  # the schema refuses it, naming the field
        rows.append((line, {"event_id": event_id("gr", line, member, day, item), "user_id": member,
                            "session_id": f"{member}-{day}", "product_id": _slug(item) or None,
                            "event_type": "purchase", "timestamp": ts}))
    return rows


def movielens_event_type(rating: float) -> str:
    """Ratings as implicit feedback: >= 4 a purchase (liked), 3-3.5 a click, lower a view."""
    return "purchase" if rating >= 4.0 else "click" if rating >= 3.0 else "view"


def movielens_rows(path: Path) -> list[Row]:
    """MovieLens ratings.csv (userId,movieId,rating,timestamp), or its folder."""
    ratings = path / "ratings.csv" if path.is_dir() else path
    rows = []
    for line, r in _read_csv(ratings):
        rating = _number(r.get("rating"))
        rows.append((line, {
            "event_id": event_id("ml", r.get("userId"), r.get("movieId"), r.get("timestamp")),
            "user_id": r.get("userId"), "product_id": r.get("movieId"),
            "event_type": movielens_event_type(rating) if isinstance(rating, float) else rating,
            "timestamp": _number(r.get("timestamp")),
        }))
    return sessionize(rows)


def movielens_products(path: Path, now: float | None = None) -> tuple[list[Product], list[RowError]]:
    """movies.csv as a catalogue: genres as the category path (content features for cold start)."""
    movies = path / "movies.csv" if path.is_dir() else path.with_name("movies.csv")
    products, errors = [], []
    for line, r in _read_csv(movies):
        genres = tuple(g for g in (r.get("genres") or "").split("|") if g and g != "(no genres listed)")
        try:
            products.append(Product.from_dict({
                "product_id": r.get("movieId"), "title": r.get("title"), "category_path": genres or ("Unknown",),
                "brand": "movielens", "price": 0.0, "created_at": 946_684_800.0}, now=now))
        except SchemaError as exc:
            errors.append(RowError(movies.name, line, exc.errors[0].field, str(exc)))
    return products, errors


FORMATS: dict[str, Callable[[Path], list[Row]]] = {
    "csv": generic_rows, "taobao": taobao_rows, "yoochoose": yoochoose_rows,
    "groceries": groceries_rows, "movielens": movielens_rows,
}


def import_events(fmt: str, path: Path, *, on_error: str = "skip", now: float | None = None) -> Dataset:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if on_error not in ("skip", "stop"):
        raise ValueError("on_error must be 'skip' or 'stop'")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    source = path / "ratings.csv" if path.is_dir() else path
    events, errors = _validate(FORMATS[fmt](path), source, on_error, now)
    products: list[Product] = []
    if fmt == "movielens":
        products, product_errors = movielens_products(path, now)
        errors += product_errors
    return Dataset(fmt, events, products, errors)
