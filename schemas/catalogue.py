"""Product: a catalogue upsert, keyed by product_id (compacted topic, last write wins)."""
from __future__ import annotations

from dataclasses import dataclass

from schemas.base import Flag, Id, Label, ListOf, Number, Record, Text, Timestamp, check


@dataclass(frozen=True, slots=True, kw_only=True)
class Product(Record):
    SCHEMA = "product"

    product_id: str = check(Id(), doc="catalogue product id")
    title: str = check(Text(max_len=512), doc="display title")
    category_path: tuple[str, ...] = check(ListOf(Label(), min_items=1, max_items=16),
                                           doc="root-to-leaf category names (or a list of genres)")
    brand: str = check(Text(), default="unknown", doc="brand name")
    price: float = check(Number(lo=0, hi=1e9), doc="current unit price (shop currency)")
    in_stock: bool = check(Flag(), default=True, doc="false hides the product from recommendations")
    rating: float | None = check(Number(lo=0, hi=5), default=None, doc="average customer rating, 0-5")
    seller_rating: float | None = check(Number(lo=0, hi=5), default=None, doc="seller's rating, 0-5")
    created_at: float = check(Timestamp(), doc="when the product was listed, Unix seconds")

    @property
    def category(self) -> str:
        """The leaf category: what features and rules compare."""
        return self.category_path[-1]

    @property
    def key(self) -> bytes:
        return self.product_id.encode()
