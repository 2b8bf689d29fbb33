"""A batch of clickstream events -> new user states + the Redis writes they imply (pure).

Writes come in two kinds. Overwrites (user_session, user_features) are recomputed from the state,
so repeating them is harmless. Increments (popularity, trending, co-occurrence) must happen once:
each carries the Kafka offset it came from, and the Redis edge applies a batch atomically together
with the highest offset applied per partition, skipping offsets it has already applied. The state
records the offset of the last event folded into it, so a redelivered record changes nothing, and
a repeated event_id (a producer's retry: a new record) is recognised by its fingerprint. Together,
every counter counts an event exactly once, even when a worker dies between writing Redis and
committing its offsets.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from recstream.features import keys, popularity
from recstream.features.session import (
    FeatureConfig,
    UserState,
    apply,
    features_key,
    features_value,
    session_key,
    session_value,
    state_key,
    state_value,
)
from schemas import Event


@dataclass(frozen=True, slots=True)
class Incoming:
    event: Event
    partition: int
    offset: int


def missing_offsets(baseline: Mapping[int, int], offsets: Iterable[tuple[int, int]]) -> dict[int, list[tuple[int, int]]]:
    """Offset ranges [start, end) a batch skipped: per partition, every offset after `baseline[p]` (the
    highest this consumer already holds: seen or applied) up to the batch's highest that is not in
    the batch. A clickstream written without transactions has no holes, so a range here is a record
    the consumer never delivered (faust can skip one when it seeks during a rebalance). Offsets at or
    below the baseline are redeliveries and miss nothing; a partition with no baseline (-1 or none)
    is not checked (its first record may be past a retention cut)."""
    by_partition: dict[int, list[int]] = {}
    for p, o in offsets:
        by_partition.setdefault(p, []).append(o)
    out: dict[int, list[tuple[int, int]]] = {}
    for p, offs in by_partition.items():
        expected = baseline.get(p, -1) + 1
        if expected <= 0:
            continue
        for o in sorted(set(offs)):
            if o > expected:
                out.setdefault(p, []).append((expected, o))
            expected = max(expected, o + 1)
    return out


DELIVERY_SLACK_S = 1.0   # Faust hands a record to the agent up to about a second after Kafka appended it


def batch_window(age_s: float, last_s: float, shortest_s: float, longest_s: float) -> float:
    """How long the feature agent gathers its next batch, from its last one: `age_s`, how old that batch's
    newest record was when the batch closed (now less its Kafka timestamp), and `last_s`, how long it
    gathered. A record that arrived while it gathered is at most `last_s` old, plus Faust's delivery
    (DELIVERY_SLACK_S): the agent keeps up and takes `shortest_s`. Older, it is behind by the difference
    and gathers for half of that, at most `longest_s`. Each batch pays fixed costs (Redis round trips,
    a table write per user), so a backlog taken in small batches costs more per event and grows; half
    keeps the wait itself within the lag it works off."""
    return min(longest_s, max(shortest_s, (age_s - last_s - DELIVERY_SLACK_S) / 2))


@dataclass(frozen=True, slots=True)
class Limits:
    session_ttl_s: int
    user_features_ttl_s: int
    window_days: int
    trending_half_life_s: float
    cooccurrence_max: int


@dataclass
class RedisOps:
    """Everything one batch writes, applied by one atomic script (streams/online_store.py; on a Redis
    Cluster, one script per hash tag: split_by_tag)."""
    incr: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))  # (zset, member) -> delta
    expire_at: dict[str, int] = field(default_factory=dict)        # zset -> Unix s
    trim: dict[str, int] = field(default_factory=dict)             # zset -> neighbours to keep
    set: dict[str, tuple[bytes, int]] = field(default_factory=dict)                # key -> (value, ttl s)
    hset: dict[str, tuple[dict[str, str], int]] = field(default_factory=dict)      # key -> (fields, ttl s)
    offsets: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> (lowest, highest) offset counted

    def as_payload(self) -> dict[str, list[list[Any]]]:
        return {
            "z": [[k, m, d] for (k, m), d in self.incr.items()],
            "xat": [[k, t] for k, t in self.expire_at.items()],
            "trim": [[k, n] for k, n in self.trim.items()],
            "set": [[k, v.decode(), t] for k, (v, t) in self.set.items()],
            "hset": [[k, f, t] for k, (f, t) in self.hset.items()],
            "off": [[p, lo, hi] for p, (lo, hi) in self.offsets.items()],
        }


def split_by_tag(ops: RedisOps) -> dict[str, RedisOps]:
    """A batch's writes grouped by Redis Cluster hash tag (keys.hash_tag): one group per slot, each
    applied by its own script with that tag's offset guard. Every group carries the batch's offsets,
    so its guard advances even where the group happens to hold no increment of some partition."""
    groups: dict[str, RedisOps] = {}

    def group(key: str) -> RedisOps:
        tag = keys.hash_tag(key)
        if tag not in groups:
            groups[tag] = RedisOps(offsets=dict(ops.offsets))
        return groups[tag]

    for (k, m), d in ops.incr.items():
        group(k).incr[(k, m)] += d
    for k, t in ops.expire_at.items():
        group(k).expire_at[k] = t
    for k, n in ops.trim.items():
        group(k).trim[k] = n
    for k, v in ops.set.items():
        group(k).set[k] = v
    for k, h in ops.hset.items():
        group(k).hset[k] = h
    return groups


@dataclass
class BatchPlan:
    states: dict[str, UserState]
    ops: RedisOps
    processed: list[Incoming]
    duplicates: int


def plan(batch: list[Incoming], states: Mapping[str, UserState], applied: Mapping[int, int],
         categories: Mapping[str, str], cfg: FeatureConfig, limits: Limits,
         passed: Iterable[tuple[int, int]] = ()) -> BatchPlan:
    """Fold a batch into the states; `applied` is the highest offset per partition whose increments
    Redis already holds; `categories` fills in the category of events that lack one. `passed`: the
    (partition, offset) of records of the batch that were re-routed to their owner partition (acked
    there, folded when they come back): nothing to fold, but the guard moves past them like past any
    applied record, so a redelivery or a refill does not re-route them again.

    The batch is folded in Kafka's order, (partition, offset), whatever order it comes in: a state
    records the offset of the last event folded into it and takes any record at or below it for a
    redelivery, so a record folded after a later one of its user would be lost. The agents' batches
    come out of order when records the consumer skipped are read again (agents/features.py): a gap
    may lie between two records the consumer delivered, and the refilled records go ahead of both."""
    new_states: dict[str, UserState] = {}
    ops = RedisOps()
    processed: list[Incoming] = []
    duplicates = 0
    for p, o in passed:
        if o > applied.get(p, -1):
            lo, hi = ops.offsets.get(p, (o, o))
            ops.offsets[p] = (min(lo, o), max(hi, o))
    for inc in sorted(batch, key=_position):   # (stable: a record delivered twice stays a redelivery)
        e = inc.event
        state = new_states.get(e.user_id) or states.get(e.user_id) or UserState()
        if state.partition == inc.partition and inc.offset <= state.offset:
            duplicates += 1  # redelivered after a restart: the state holds it already
            continue
        category = e.category or categories.get(e.product_id)
        update = apply(state, e, cfg, category)
        if update.duplicate:
            duplicates += 1
            continue
        new_states[e.user_id] = replace(update.state, partition=inc.partition, offset=inc.offset)
        processed.append(inc)
        if inc.offset <= applied.get(inc.partition, -1):
            continue  # Redis counted this one before a restart: state only
        lo, hi = ops.offsets.get(inc.partition, (inc.offset, inc.offset))
        ops.offsets[inc.partition] = (min(lo, inc.offset), max(hi, inc.offset))
        _count(ops, e, category, update.covisits, update.copurchases, cfg, limits)
    for user, state in new_states.items():
        ops.set[session_key(user)] = (session_value(state), limits.session_ttl_s)
        ops.hset[features_key(user)] = (features_value(state), limits.user_features_ttl_s)
        ops.set[state_key(user)] = (state_value(state), limits.user_features_ttl_s)
    return BatchPlan(new_states, ops, processed, duplicates)


def _position(inc: Incoming) -> tuple[int, int]:
    return inc.partition, inc.offset


def _count(ops: RedisOps, e: Event, category: str | None, covisits: Sequence[tuple[str, str]],
           copurchases: Sequence[tuple[str, str]], cfg: FeatureConfig,
           limits: Limits) -> None:
    weight = cfg.weights[e.event_type]
    d = popularity.day(e.timestamp)
    key = popularity.count_key(e.event_type, d)
    ops.incr[(key, e.product_id)] += 1
    ops.expire_at[key] = popularity.expires_at(d, limits.window_days)
    lm = popularity.landmark(e.timestamp)
    trend = popularity.trend_increment(weight, e.timestamp, limits.trending_half_life_s)
    for k in (popularity.trend_key(lm), *([popularity.trend_key(lm, category)] if category else [])):
        ops.incr[(k, e.product_id)] += trend
        ops.expire_at[k] = popularity.trend_expires_at(lm)
    if category:
        key = popularity.category_key(category, d)
        ops.incr[(key, e.product_id)] += weight
        ops.expire_at[key] = popularity.expires_at(d, limits.window_days)
    incr, trim, most = ops.incr, ops.trim, limits.cooccurrence_max
    for kind, pairs in (("covis", covisits), ("cobuy", copurchases)):
        for a, b in pairs:
            ka, kb = keys.neighbours(kind, a), keys.neighbours(kind, b)
            incr[(ka, b)] += 1
            incr[(kb, a)] += 1
            trim[ka] = trim[kb] = most
