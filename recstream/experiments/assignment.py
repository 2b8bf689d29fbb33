"""A/B assignment: stable hashing of a unit (user, cookie or session) into layers, experiments and variants.

Per layer, the unit hashes once, `bucket(unit, "layer:" + layer)`, to a point in [0, 1); the layer's
experiments own disjoint slices of that space (laid out by definition.cross_check, first-fit by
(start, id), fixed for the life of the file), so a unit falls into at most one experiment per layer
and into none when its point lies outside every active slice. Within the experiment a second,
independent hash, `bucket(unit, "experiment:" + id)`, picks the variant against the cumulative
weights. blake2b is used instead of Python's hash(), which is salted per process (PYTHONHASHSEED),
so assignments are the same across processes, restarts and machines.

`resolve` turns the assignment into what serving runs with: the file's defaults overlaid, field by
field, by the changes of each assigned variant (definition.cross_check guarantees that experiments
running together in different layers never change the same field, so the order does not matter).
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools

from recstream.experiments.definition import Changes, Experiment, ExperimentError, ExperimentSet

# Prefixes keep the id spaces apart: anonymous cookie "42" must not share a bucket with user "42".
USER_PREFIX, COOKIE_PREFIX, SESSION_PREFIX = "u:", "c:", "s:"


def bucket(unit_id: str, salt: str) -> float:
    """A uniform, stable point in [0, 1) for (unit_id, salt), from an 8-byte blake2b digest."""
    # Length-prefixing the salt keeps ("ab", "c") and ("a", "bc") distinct.
    digest = hashlib.blake2b(f"{len(salt)}:{salt}|{unit_id}".encode(), digest_size=8).digest()
    # Top 53 bits only: a 64-bit integer divided by 2**64 can round up to exactly 1.0 as a float.
    return (int.from_bytes(digest, "big") >> 11) / float(1 << 53)


def unit_for(user_id: str | None, session_id: str | None = None, cookie: str | None = None) -> str:
    """The assignment unit: the user id when known, else the stable cookie, else the session id."""
    if user_id:
        return USER_PREFIX + user_id
    if cookie:
        return COOKIE_PREFIX + cookie
    if session_id:
        return SESSION_PREFIX + session_id
    raise ExperimentError("unit_for: needs a user id, a cookie or a session id")


def variant_of(experiment: Experiment, unit_id: str) -> str:
    """The variant a unit gets in an experiment it is in (ignores traffic and time)."""
    cumulative = list(itertools.accumulate(v.weight for v in experiment.variants))
    k = bisect.bisect_right(cumulative, bucket(unit_id, "experiment:" + experiment.id))
    # Weights sum to 1 within 1e-9, so a point just under 1 may pass the last bound: it is the last variant.
    return experiment.variants[min(k, len(experiment.variants) - 1)].name


def assign(experiments: ExperimentSet, unit_id: str, now_s: float, kind: str | None = None) -> dict[str, tuple[str, str]]:
    """layer -> (experiment id, variant name) for each active experiment the unit falls in (of those
    covering recommendation `kind`; None: all). The slices do not depend on kinds: a unit in an
    experiment of another widget is in none of its layer for this one."""
    out: dict[str, tuple[str, str]] = {}
    points: dict[str, float] = {}
    for e in experiments.active(now_s):
        if not e.covers(kind):
            continue
        if e.layer not in points:
            points[e.layer] = bucket(unit_id, "layer:" + e.layer)
        lo, hi = experiments.slices[e.id]
        if lo <= points[e.layer] < hi:
            out[e.layer] = (e.id, variant_of(e, unit_id))
    return out


def resolve(experiments: ExperimentSet, unit_id: str, now_s: float, kind: str | None = None
            ) -> tuple[dict[str, str], Changes]:
    """{experiment id: variant name} for the unit now, and the Changes it runs with: the set's defaults
    overlaid by each assigned variant's changes (their non-None fields win)."""
    chosen = dict(assign(experiments, unit_id, now_s, kind).values())
    merged = experiments.defaults
    for eid, name in chosen.items():
        changes = experiments.get(eid).variant(name).changes
        merged = dataclasses.replace(merged, **{f.name: getattr(changes, f.name) for f in dataclasses.fields(changes)
                                                if getattr(changes, f.name) is not None})
    return chosen, merged
