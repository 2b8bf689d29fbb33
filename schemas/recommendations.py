"""Recommendation request and reply: the messages between the API and the serving agents."""
from __future__ import annotations

from dataclasses import dataclass

from schemas.base import Choice, Flag, Invalid, ListOf, Nested, Number, NumMap, Record, StrMap, Text, Timestamp, check

KINDS = ("homepage", "similar", "cart", "also_viewed")
MAX_COUNT = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class RecommendationRequest(Record):
    SCHEMA = "recommendation request"

    request_id: str = check(Text(max_len=64), doc="unique id; the reply carries it and events cite it")
    kind: str = check(Choice(KINDS), doc="homepage, similar, cart or also_viewed")
    created_at: float = check(Timestamp(), doc="when the caller sent it, Unix seconds")
    user_id: str | None = check(Text(), default=None, doc="shopper id; absent for anonymous homepage")
    session_id: str | None = check(Text(), default=None, doc="current session id")
    product_id: str | None = check(Text(), default=None, doc="the product on screen (similar, also_viewed)")
    cart_items: tuple[str, ...] = check(ListOf(Text(), max_items=100), default=(), doc="product ids in the cart (cart)")
    count: int = check(Number(lo=1, hi=MAX_COUNT, integer=True), default=8, doc=f"items wanted, 1-{MAX_COUNT}")
    context: dict[str, str] | None = check(StrMap(), default=None, doc="device, page and other request context")
    deadline_ms: int = check(Number(lo=1, hi=10_000, integer=True), default=50, doc="answer within this budget (milliseconds)")

    def validate(self) -> None:
        if self.kind in ("similar", "also_viewed") and not self.product_id:
            raise Invalid(f"product_id: is required for kind {self.kind}")
        if self.kind == "cart" and not self.cart_items:
            raise Invalid("cart_items: needs at least 1 item for kind cart")

    @property
    def key(self) -> bytes:
        return (self.user_id or self.product_id or self.request_id).encode()


@dataclass(frozen=True, slots=True, kw_only=True)
class RecommendedItem(Record):
    SCHEMA = "recommended item"

    product_id: str = check(Text(), doc="recommended product")
    score: float = check(Number(), doc="ranker score (higher is better)")
    reason: str = check(Text(max_len=64), doc="why: the retrieval source or rule that proposed it")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecommendationReply(Record):
    SCHEMA = "recommendation reply"

    request_id: str = check(Text(max_len=64), doc="the request answered")
    kind: str = check(Choice(KINDS), doc="kind of the request")
    items: tuple[RecommendedItem, ...] = check(ListOf(Nested(RecommendedItem), max_items=MAX_COUNT), doc="best first")
    model_version: str = check(Text(max_len=64), default="none", doc="registered model version that ranked them")
    variant: str = check(Text(max_len=64), default="control", doc="A/B variant that served the request")
    fallback: bool = check(Flag(), default=False, doc="true when served by the popularity fallback")
    timings_ms: dict[str, float] | None = check(NumMap(), default=None, doc="time per stage (milliseconds)")
    error: str | None = check(Text(max_len=512), default=None, doc="why the primary path failed, if it did")
