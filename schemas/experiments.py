"""The exposure log: one record per served list, API -> the exposures topic -> attribution (A/B metrics)."""
from __future__ import annotations

from dataclasses import dataclass

from schemas.base import Choice, Id, Invalid, ListOf, Number, Record, StrMap, Text, Timestamp, check

# how the list was served: by the agents, from the homepage cache, or by the trending fallback
# because the agents missed the deadline or because something failed (Kafka, Redis, an agent)
STATUSES = ("ok", "cached", "fallback_deadline", "fallback_error")


@dataclass(frozen=True, slots=True, kw_only=True)
class Exposure(Record):
    """One served list: the impression that clicks, carts and purchases are attributed to."""
    SCHEMA = "exposure"

    request_id: str = check(Text(max_len=64), doc="the request (impression id); events cite it as rec_request_id")
    ts: float = check(Timestamp(), doc="when the list was served, Unix seconds")
    kind: str = check(Text(max_len=32), doc="homepage, similar, cart or also_viewed")
    unit: str = check(Text(), doc="assignment unit: u:<user_id>, c:<cookie> or s:<session_id>")
    user_id: str | None = check(Id(), default=None, doc="shopper id, when known")
    session_id: str | None = check(Id(), default=None, doc="session id, when known")
    experiments: dict[str, str] | None = check(StrMap(), default=None, doc="experiment id -> variant served")
    items: tuple[str, ...] = check(ListOf(Text(), max_items=100), doc="product ids shown, best first")
    positions: tuple[int, ...] = check(ListOf(Number(lo=1, hi=100, integer=True), max_items=100),
                                       doc="1-based slot of each item on the page, same length as items")
    model_version: str = check(Text(max_len=64), default="none", doc="model version that ranked the list")
    status: str = check(Choice(STATUSES), doc="ok, cached, fallback_deadline or fallback_error")
    latency_ms: float = check(Number(lo=0), doc="time from request parsing to the answer (milliseconds)")

    def validate(self) -> None:
        if len(self.positions) != len(self.items):
            raise Invalid(f"positions: {len(self.positions)} positions for {len(self.items)} items")

    @property
    def key(self) -> bytes:
        """Keyed like the clickstream (by user), so one user's exposures and events share a partition."""
        return (self.user_id or self.unit).encode()
