"""Interaction event: one user action on one product, the clickstream's record."""
from __future__ import annotations

from dataclasses import dataclass

from schemas.base import Choice, Id, Label, Number, Record, Timestamp, check

EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")
DEVICES = ("desktop", "mobile", "tablet", "app", "unknown")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event(Record):
    SCHEMA = "event"

    event_id: str = check(Id(max_len=64), doc="unique id chosen by the producer; consumers drop repeats (idempotency)")
    user_id: str = check(Id(), doc="shopper id (anonymous visitors: a cookie id); the clickstream key")
    session_id: str = check(Id(), doc="browsing session id")
    product_id: str = check(Id(), doc="catalogue product id")
    event_type: str = check(Choice(EVENT_TYPES), doc="one of view, click, add_to_cart, purchase")
    timestamp: float = check(Timestamp(), doc="when it happened, Unix seconds (UTC); at most 300 s in the future")
    device: str = check(Choice(DEVICES), default="unknown", doc="desktop, mobile, tablet, app or unknown")
    page: str = check(Label(max_len=64), default="unknown", doc="page the action happened on (home, product, cart, search, ...)")
    price: float | None = check(Number(lo=0, hi=1e9), default=None, doc="unit price paid or shown (shop currency)")
    quantity: int = check(Number(lo=1, hi=10_000, integer=True), default=1, doc="units (add_to_cart, purchase)")
    category: str | None = check(Label(), default=None, doc="product's leaf category, when the producer knows it")
    rec_request_id: str | None = check(Id(max_len=64), default=None,
                                       doc="recommendation request this action came from (attribution)")

    @property
    def key(self) -> bytes:
        return self.user_id.encode()
