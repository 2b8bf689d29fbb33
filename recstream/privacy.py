"""Shoppers' data, the pure part: the keyed pseudonym of a user id, and which events an erasure drops.

The I/O is at the edges: the erasures topic and the erase job in streams/erasures.py, the online
store's `erase_users` (streams/store.py), the archive's rewrite (streams/archive_erasure.py). README
"Personal data" says where a shopper's data lives, for how long, and when an erasure reaches each place.
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from schemas import Event

PSEUDONYM_PREFIX = "h"       # a pseudonym is "h" + 32 hex digits: an Id (schemas/base.py), no ':' or braces
PSEUDONYM_BYTES = 16         # 128 bits: no two of a shop's shoppers collide (birthday bound ~2^64)


def pseudonym(user_id: str, key: str) -> str:
    """The keyed hash that stands for `user_id` wherever recstream stores it (RECSTREAM_USER_ID_KEY).

    blake2b in keyed mode (RFC 7693 section 2.5; a MAC, like HMAC) over the UTF-8 id. Without the key
    nobody can compute a shopper's pseudonym from their id, nor test a guessed id against stored
    data; with it (the shop's own services) the mapping is fixed, so a shopper's events, features and
    recommendations still join up. It does NOT anonymise: the pseudonym is a stable identifier, so the
    data stays personal data under the GDPR (recital 26) and erasure still applies; whoever holds the
    key can link it back to a known id. An id that already is a pseudonym of this key is returned
    as it is, so hashing twice (an edge behind another edge) does no harm."""
    if not key:
        return user_id
    if is_pseudonym(user_id, key):
        return user_id
    return PSEUDONYM_PREFIX + _digest(user_id, key)


def is_pseudonym(value: str, key: str) -> bool:
    """Whether `value` has the shape of a pseudonym. (Whether it is one of `key` cannot be checked
    without the id: a shape is enough for idempotence, since ids of this shape are never hashed.)"""
    return bool(key) and len(value) == 1 + 2 * PSEUDONYM_BYTES and value.startswith(PSEUDONYM_PREFIX) and all(
        c in "0123456789abcdef" for c in value[1:])


def _digest(user_id: str, key: str) -> str:
    k = hashlib.blake2b(key.encode(), digest_size=32).digest()   # any length of key -> blake2b's 64-byte limit
    return hashlib.blake2b(user_id.encode(), key=k, digest_size=PSEUDONYM_BYTES).hexdigest()


def same_id(a: str, b: str) -> bool:
    """Constant-time comparison of two ids (the admin route compares with what it was asked)."""
    return hmac.compare_digest(a.encode(), b.encode())


def pseudonymise_events(events: Sequence[Event], key: str) -> list[Event]:
    """`events` with their user ids replaced by pseudonyms (unchanged without a key)."""
    if not key:
        return list(events)
    return [replace(e, user_id=pseudonym(e.user_id, key)) for e in events]


T = TypeVar("T")


@dataclass
class ErasedSet:
    """The erased shoppers a consumer knows of, and what it dropped because of them."""
    ids: set[str] = field(default_factory=set)
    dropped: int = 0          # events (or exposures) of erased shoppers that arrived after the erasure

    def add(self, user_ids: Iterable[str]) -> set[str]:
        """Add ids; the ones that are new."""
        new = set(user_ids) - self.ids
        self.ids |= new
        return new

    def __contains__(self, user_id: object) -> bool:
        return user_id in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def keep(self, items: Iterable[T], user_of: Callable[[T], str | None]) -> list[T]:
        """`items` less those whose user (`user_of(item)`, None: anonymous) is erased; counts the dropped."""
        kept = []
        for x in items:
            if user_of(x) in self.ids:
                self.dropped += 1
            else:
                kept.append(x)
        return kept


def without_erased(events: Iterable[Event], erased: set[str] | frozenset[str]) -> Iterator[Event]:
    """The events of shoppers not erased (the trainer's filter over its window)."""
    return (e for e in events if e.user_id not in erased)


@dataclass(frozen=True)
class ErasureReport:
    """What one erasure did, store by store, for the CLI's and the admin route's reply."""
    users: tuple[str, ...]
    redis_keys: int                 # per-user keys deleted in the online store
    newly_erased: int               # ids not erased before (0: a repeat, a no-op)
    ab_keys: int                    # A/B unit hashes, recent lists and impressions deleted
    tombstones: int                 # session-table tombstones written to the changelog
    topic: str                      # where the erasure was recorded
    archive: dict[str, float] | None = None   # the archive rewrite's figures, when it ran here

    def to_json(self) -> dict[str, object]:
        later = ("models: every training run after now filters these shoppers' events out of its window, "
                 "so the next published version holds no vector of theirs (the published versions' vectors "
                 "are deleted now); the feature agents, the attribution worker and the archive worker drop "
                 "their later events")
        return {"users": list(self.users), "erased_before": self.newly_erased == 0,
                "redis": {"keys_deleted": self.redis_keys, "ab_keys_deleted": self.ab_keys},
                "session_table": {"tombstones": self.tombstones},
                "erasures_topic": self.topic,
                "archive": self.archive if self.archive is not None else
                "queued: the archive worker rewrites the files holding these shoppers' events",
                "after_next_training_run": later}
