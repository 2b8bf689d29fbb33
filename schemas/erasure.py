"""Erasure: one shopper's data to be forgotten, the record of the compacted erasures topic."""
from __future__ import annotations

from dataclasses import dataclass

from schemas.base import Choice, Id, Record, Timestamp, check

SOURCES = ("cli", "api")


@dataclass(frozen=True, slots=True, kw_only=True)
class Erasure(Record):
    """A shopper erased on request (GDPR art. 17, CCPA 1798.105): consumers drop their later events."""
    SCHEMA = "erasure"

    user_id: str = check(Id(), doc="the erased shopper's id, as stored (the pseudonym where ids are hashed)")
    erased_at: float = check(Timestamp(), doc="when the erasure was requested, Unix seconds")
    source: str = check(Choice(SOURCES), default="cli", doc="who asked: cli (recstream erase) or api (the admin route)")

    @property
    def key(self) -> bytes:
        """Keyed like the clickstream (by user): the partition of the erasure is that of the shopper's events."""
        return self.user_id.encode()
