"""Every Redis key name of the feature store, built in one place (pure), with Redis Cluster hash tags.

A Redis Cluster hashes only the part of a key between the first '{' and the next '}' (the hash tag)
when one is there (https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#hash-tags).
So every key of one user carries `{user_id}`, every key of one item `{product_id}`, and the global
keys (popularity, trending, stock, brands, the model pointer, the partition offsets) carry `{g}`:
one user's or item's data lives on one slot, a script can read or write all of it atomically, and
users and items spread over the masters. The global slot is one hot slot: every event increments
~4 of its keys, ~6k events/s at most on this project's machines, far under the ~100k+ simple writes/s
one Redis core takes; past that, shard the global keys by day or category.

The same layout serves a single Redis (tags are plain characters there), so there is one layout.
Ids cannot contain '{' or '}' (schemas/base.py ID_FORBIDDEN) and the namespace cannot either
(settings), so nothing in front of a tag can move it. The namespace prefix is added by the caller.
"""
from __future__ import annotations

GLOBAL = "g"                      # the hash tag of every global key
OOS = "oos:{g}"                   # set of products out of stock
MODEL_CURRENT = "model:{g}:current"   # JSON pointer to the published model version
AGENTS = "agents:{g}"             # hash: serving agent ("role:host:pid") -> JSON {ts, model_version}, every 2 s
ERASED = "erased:{g}"             # set of erased user ids: the fast shared copy of the recs.erasures topic


def metrics(agent: str, host: str, pid: int | str) -> str:
    """One worker process's latest metrics snapshot (JSON, expires when the process stops publishing);
    a str part: a SCAN pattern ('*')."""
    return f"metrics:{agent}:{host}:{pid}"


def metrics_index(agent: str) -> str:
    """Sorted set of an agent's live snapshot keys (score: last publish time), so the dashboard finds
    them without scanning the keyspace."""
    return f"metrics-index:{agent}"


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes: the content of the first non-empty {...}, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


# -- per user: tag {user_id} ----------------------------------------------------------------------

def user_session(user_id: str) -> str:
    return f"user_session:{{{user_id}}}"


def user_features(user_id: str) -> str:
    return f"user_features:{{{user_id}}}"


def user_state(user_id: str) -> str:
    """The feature agents' whole session state (the session table's row), written with the features."""
    return f"user_state:{{{user_id}}}"


def homecache(user_id: str, variants: str, count: int, device: str, page: str) -> str:
    return f"homecache:{{{user_id}}}:{variants}:{count}:{device}:{page}"


def user_keys(user_id: str) -> tuple[str, ...]:
    """The per-user keys with a fixed name (an erasure deletes them at once)."""
    return (user_session(user_id), user_features(user_id), user_state(user_id))


def user_patterns() -> tuple[str, ...]:
    """SCAN patterns of the per-user keys whose names also carry a version or a variant (the homepage
    cache, the published user vectors and offline features of every version): an erasure scans
    them and deletes the keys whose hash tag (`hash_tag`) is an erased user."""
    return ("homecache:*", "emb:user:*", "uoff:*")


# -- per item: tag {product_id} -------------------------------------------------------------------

def item_features(product_id: str) -> str:
    return f"item_features:{{{product_id}}}"


def neighbours(kind: str, product_id: str) -> str:
    """kind 'covis' (also viewed) or 'cobuy' (bought together)."""
    return f"{kind}:{{{product_id}}}"


# -- published by the trainer: tagged by the user or item they describe ----------------------------

def embedding(kind: str, version: str, entity_id: str) -> str:
    """kind 'user' or 'item': float32 bytes of that version's vector."""
    return f"emb:{kind}:{version}:{{{entity_id}}}"


def user_offline(version: str, user_id: str) -> str:
    return f"uoff:{version}:{{{user_id}}}"


def item_offline(version: str, product_id: str) -> str:
    return f"ioff:{version}:{{{product_id}}}"


def published(version: str = "*") -> tuple[str, ...]:
    """SCAN patterns of every key of a published version but the pointer ('*': of any version)."""
    return (f"emb:user:{version}:*", f"emb:item:{version}:*", f"uoff:{version}:*", f"ioff:{version}:*")


def published_version(key: str) -> str | None:
    """The version a published key (no namespace) belongs to; None for any other key."""
    parts = key.split(":")
    if parts[0] == "emb" and len(parts) > 3:
        return parts[2]
    return parts[1] if parts[0] in ("uoff", "ioff") and len(parts) > 2 else None


# -- global: tag {g} ------------------------------------------------------------------------------

def popularity(kind: str, day: int) -> str:
    return f"pop:{{g}}:{kind}:{day}"


def category_popularity(category: str, day: int) -> str:
    return f"popcat:{{g}}:{category}:{day}"


def trend(landmark: int, category: str | None = None) -> str:
    return f"trend:{{g}}:{landmark}" if category is None else f"trend:{{g}}:cat:{category}:{landmark}"


def brand(name: str) -> str:
    return f"brand:{{g}}:{name}"


# -- exactly-once bookkeeping ---------------------------------------------------------------------

def applied_prefix(group: str, topic: str) -> str:
    """+ partition: the highest offset of that partition whose increments are all applied."""
    return f"applied:{{g}}:{group}:{topic}:"


def guard(tag: str) -> str:
    """Redis Cluster only: hash (group:topic:partition -> highest offset applied) of one hash tag's
    writes, in that tag's slot, so a script checks and advances it with the writes."""
    return f"applied:{{{tag}}}"


def guard_field(group: str, topic: str, partition: int) -> str:
    return f"{group}:{topic}:{partition}"


# -- A/B attribution -----------------------------------------------------------------------------

class AttributionKeys:
    """The A/B attribution worker's keys (streams/attribution.py), under one namespace (`abx:*`: no hash
    tags, the worker runs against one Redis)."""

    def __init__(self, ns: str):
        self.ns = ns

    def imp(self, rid: str) -> str:
        return f"{self.ns}abx:imp:{rid}"

    def recent(self, shopper: str) -> str:
        return f"{self.ns}abx:recent:{shopper}"

    def unit(self, exp: str, variant: str, unit: str) -> str:
        return f"{self.ns}abx:unit:{exp}:{variant}:{unit}"

    def tot(self, exp: str, variant: str) -> str:
        return f"{self.ns}abx:tot:{exp}:{variant}"

    def day(self, exp: str, variant: str, day: str) -> str:
        return f"{self.ns}abx:day:{exp}:{variant}:{day}"

    def days(self, exp: str, variant: str) -> str:
        return f"{self.ns}abx:days:{exp}:{variant}"

    def variants(self, exp: str) -> str:
        return f"{self.ns}abx:variants:{exp}"

    @property
    def experiments(self) -> str:
        return f"{self.ns}abx:experiments"

    @property
    def offsets(self) -> str:
        return f"{self.ns}abx:offsets"

    def seen(self, event_id: str) -> str:
        return f"{self.ns}abx:seen:{event_id}"

    @property
    def unit_pattern(self) -> str:
        """SCAN pattern of every unit hash (an erasure deletes the erased shoppers' units)."""
        return f"{self.ns}abx:unit:*"

    @property
    def imp_pattern(self) -> str:
        return f"{self.ns}abx:imp:*"

    def unit_of(self, key: str) -> str:
        """The unit a unit hash's key (with the namespace) counts: experiment and variant ids hold no ':'."""
        return key[len(self.ns):].split(":", 4)[4]
