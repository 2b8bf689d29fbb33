"""Evaluation protocols: a dataset's events made into a leak-free, seeded `Split` of training events and queries."""
from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple

from recstream.data.importers import import_events
from recstream.evaluation.core import Query, Split
from schemas import Event, Product

SEED = 20261125
DAY_S = 86_400.0
HISTORY_LEN = 20
TEST_SHARE = 0.2                            # movielens / fbt: the last 20 % is test
HELD_OUT_SHARE = 0.1                        # new_items: share of rated items removed from training
LOCAL_UTC_OFFSET_H = {"taobao": 8.0}        # Tianchi's days are China time; other formats: UTC days


def _fail(protocol: str, reason: str) -> ValueError:
    return ValueError(f"protocol {protocol!r}: {reason}")


def _sorted(events: Iterable[Event], protocol: str) -> list[Event]:
    out = sorted(events, key=lambda e: e.timestamp)   # stable: ties keep the file's order
    if not out:
        raise _fail(protocol, "no events")
    return out


def _iso(t: float, offset_h: float = 0.0) -> str:
    if math.isinf(t):
        return "end of data"
    return datetime.fromtimestamp(t, timezone(timedelta(hours=offset_h))).isoformat(timespec="seconds")


def _last_day(events: Sequence[Event], offset_h: float) -> float:
    """Start of the test day: 24 h before the last event, moved to the nearest local midnight so a
    dataset cut at midnight gets a whole test day (the max, not the min, so old outliers do not matter)."""
    off = offset_h * 3600
    return math.floor((events[-1].timestamp - DAY_S + off) / DAY_S + 0.5) * DAY_S - off


def _by_user(events: Iterable[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {}
    for e in events:
        out.setdefault(e.user_id, []).append(e)
    return out


def _distinct(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _recent(events: Sequence[Event], n: int = HISTORY_LEN) -> tuple[str, ...]:
    """The last n distinct items, oldest first (an item counts at its latest touch)."""
    latest = _distinct(e.product_id for e in reversed(events))[:n]
    return tuple(reversed(latest))


def _finish(protocol: str, dataset: str, train: list[Event], products: Sequence[Product], queries: list[Query],
            ks: tuple[int, ...], primary: str, seed: int, notes: list[str], held_out: frozenset[str] = frozenset(),
            why: str = "") -> Split:
    if not queries:
        raise _fail(protocol, f"the data yields no query: {why}")   # every protocol's query needs training events
    queries = sorted(queries, key=lambda q: q.now_s)   # stable: a session's prefixes keep their order
    queries = [replace(q, qid=i) for i, q in enumerate(queries)]
    return Split(protocol, dataset, train, list(products), queries, ks, primary, seed, notes, held_out)


# -- homepage: the last day of a clickstream ----------------------------------------------------

def homepage(events: Sequence[Event], products: Sequence[Product] = (), *, validation: bool = False,
             seed: int = SEED, utc_offset_h: float = 0.0, dataset: str = "events") -> Split:
    """Train before the last (local) day, one query per user active on both sides of the cutoff."""
    events = _sorted(events, "homepage")
    cutoff, end = _last_day(events, utc_offset_h), math.inf
    if validation:   # the day before the test day; the test day itself is never read
        cutoff, end = cutoff - DAY_S, cutoff
    train = [e for e in events if e.timestamp < cutoff]
    past_by_user = _by_user(train)
    queries, unreachable, n_targets = [], 0, 0
    known = {e.product_id for e in train}
    for user, evs in _by_user(e for e in events if cutoff <= e.timestamp < end).items():
        past = past_by_user.get(user)
        if not past:
            continue
        bought = frozenset(e.product_id for e in past if e.event_type == "purchase")
        targets = frozenset(e.product_id for e in evs) - bought   # an excluded item can never be a hit
        if targets:
            seen = {e.product_id for e in past}
            queries.append(Query(0, "homepage", user, cutoff, _recent(past), targets,
                                 new_targets=targets - seen, exclude=bought))
            n_targets += len(targets)
            unreachable += len(targets - known)
    notes = [f"temporal split at {_iso(cutoff, utc_offset_h)} (UTC{utc_offset_h:+g}): the local midnight nearest to "
             f"24 h before the last event; train = every event before it; queries at the cutoff from the events "
             f"up to {_iso(end, utc_offset_h)}" + (" (validation: the day before the test day)" if validation else ""),
             "targets: distinct items a user touched in the query period (any event type), minus the items the user "
             "purchased in training, which every method excludes (exclude = purchased in training)",
             f"{unreachable} of {n_targets} targets are items absent from training (no method can rank them)",
             f"no random choice (seed {seed} recorded for the record); "
             f"{len(queries)} users with events on both sides of the cutoff"]
    return _finish("homepage", dataset, train, products, queries, (8, 20, 50), "recall@20", seed, notes,
                   why=f"no user has events both before and after {_iso(cutoff, utc_offset_h)}")


# -- session: next click from every prefix -------------------------------------------------------

def session(events: Sequence[Event], products: Sequence[Product] = (), *, validation: bool = False,
            seed: int = SEED, utc_offset_h: float = 0.0, dataset: str = "events") -> Split:
    """Sessions that start in the last (local) day are test, everything before them trains."""
    events = _sorted(events, "session")
    cutoff, end = _last_day(events, utc_offset_h), math.inf
    if validation:
        cutoff, end = cutoff - DAY_S, cutoff
    start: dict[tuple[str, str], float] = {}
    for e in events:
        start.setdefault((e.user_id, e.session_id), e.timestamp)
    train = [e for e in events if e.timestamp < cutoff]   # a session straddling the cutoff trains on its early part
    test = [e for e in events if cutoff <= e.timestamp < end and start[(e.user_id, e.session_id)] >= cutoff]
    note = (f"time split at {_iso(cutoff, utc_offset_h)} (UTC{utc_offset_h:+g}, the local midnight nearest to 24 h "
            f"before the last event): sessions starting from then to {_iso(end, utc_offset_h)} are test, every event "
            "before it trains" + (" (validation: the day before the test day)" if validation else ""))
    return session_from_parts(train, test, products, seed=seed, dataset=dataset, notes=[note])


def session_from_parts(train: Sequence[Event], test: Sequence[Event], products: Sequence[Product] = (), *,
                       seed: int = SEED, dataset: str = "events", notes: Sequence[str] = ()) -> Split:
    """Next-click queries (SR-GNN protocol) from test sessions, given already separated training events."""
    if not train or not test:
        raise _fail("session", f"no {'test' if train else 'training'} events ({len(train)} train, {len(test)} test)")
    train, test = _sorted(train, "session"), _sorted(test, "session")
    known, last_train = {e.product_id for e in train}, train[-1].timestamp
    items_by_user = {u: {e.product_id for e in evs} for u, evs in _by_user(train).items()}
    sessions: dict[tuple[str, str], list[Event]] = {}
    for e in test:
        sessions.setdefault((e.user_id, e.session_id), []).append(e)
    queries, early, unknown, short = [], 0, 0, 0
    for (user, _), evs in sessions.items():
        if evs[0].timestamp <= last_train:   # a method must see no training event at or after a query
            early += 1
            continue
        kept = [e for e in evs if e.product_id in known]
        unknown += len(evs) - len(kept)
        short += len(kept) < 2
        seen = items_by_user.get(user, set())
        for j in range(1, len(kept)):
            target = frozenset({kept[j].product_id})
            queries.append(Query(0, "homepage", user, kept[j - 1].timestamp, tuple(e.product_id for e in kept[:j]),
                                 target, new_targets=target - seen, apply=(kept[j - 1],)))
    notes = list(notes) + [
        "next-click from every prefix i1..ij of a test session (j = 1..n-1): history = the prefix, target = "
        "i(j+1), apply = the click ij (the online state takes it in before the query), exclude = none "
        "(repeats allowed), now_s = time of ij",
        f"{unknown} test clicks on items absent from training dropped, then {short} sessions shorter than 2 dropped; "
        f"{early} sessions starting at or before the last training event ({_iso(last_train)}) dropped",
        f"no random choice (seed {seed} recorded); {len(sessions) - early - short} sessions -> {len(queries)} queries"]
    return _finish("session", dataset, list(train), products, queries, (20,), "hitrate@20", seed, notes,
                   why="no test session has 2 or more clicks on items known in training")


# -- fbt: complete a basket ----------------------------------------------------------------------

def fbt(events: Sequence[Event], products: Sequence[Product] = (), *, validation: bool = False,
        seed: int = SEED, utc_offset_h: float = 0.0, dataset: str = "events") -> Split:
    """Baskets (a user's session of purchases) of the last 20 % of days: hide one item, show the rest as the cart."""
    events = _sorted(events, "fbt")
    baskets: dict[tuple[str, str], list[Event]] = {}
    for e in events:
        if e.event_type == "purchase":
            baskets.setdefault((e.user_id, e.session_id), []).append(e)
    if not baskets:
        raise _fail("fbt", "no purchase events, so no baskets")
    off = utc_offset_h * 3600
    days = sorted({math.floor((b[0].timestamp + off) / DAY_S) for b in baskets.values()})
    n = max(1, round(TEST_SHARE * len(days)))
    if len(days) < n * (3 if validation else 2):
        raise _fail("fbt", f"{len(days)} distinct basket days are too few for a training and a test period")
    first, last = (days[-2 * n], days[-n]) if validation else (days[-n], None)
    start = first * DAY_S - off
    end = math.inf if last is None else last * DAY_S - off
    train = [e for e in events if e.timestamp < start]
    known = {e.product_id for e in train}
    past_by_user = _by_user(train)
    rng = random.Random(seed)
    queries = []
    for (user, _), evs in sorted(baskets.items(), key=lambda kv: (kv[1][0].timestamp, kv[0])):
        if not (start <= evs[0].timestamp and evs[-1].timestamp < end):
            continue
        items = _distinct(e.product_id for e in evs if e.product_id in known)
        if len(items) < 2:
            continue
        hidden = items[rng.randrange(len(items))]
        cart = tuple(i for i in items if i != hidden)
        past = past_by_user.get(user, [])
        # the cart's own events reach the online state before the widget asks, as in a shop: the basket's
        # events of the shown items (not the hidden one's), at the basket's first moment
        shown = {}
        for e in evs:
            if e.product_id in cart and e.product_id not in shown:
                shown[e.product_id] = replace(e, timestamp=evs[0].timestamp)
        queries.append(Query(0, "cart", user, evs[0].timestamp, _recent(past), frozenset({hidden}), cart=cart,
                             new_targets=frozenset({hidden}) - {e.product_id for e in past}, exclude=frozenset(cart),
                             apply=tuple(shown[i] for i in cart)))
    notes = [f"baskets = purchases grouped by (user, session); {len(days)} distinct basket days (UTC"
             f"{utc_offset_h:+g}); the last {n} are test" + (f", the {n} before them validation" if validation else "")
             + f": baskets in {_iso(start, utc_offset_h)} .. {_iso(end, utc_offset_h)}; train = every event before",
             "per basket with >= 2 distinct items known in training: one hidden item is the target, the others "
             "(known in training, first-purchase order) are the cart and are excluded; their purchase events are the "
             "query's `apply` (the online session state holds the cart, as in a shop); history = the user's last "
             f"{HISTORY_LEN} distinct training items; now_s = the basket's first purchase",
             f"hidden item: random.Random({seed}).randrange over the basket's known items, baskets visited in time "
             f"order; {len(queries)} baskets qualify"]
    return _finish("fbt", dataset, train, products, queries, (4,), "hitrate@4", seed, notes,
                   why="no test basket has 2 or more distinct items known in training")


# -- movielens and new_items: per-user temporal split ---------------------------------------------

def _per_user(events: Sequence[Event]) -> tuple[dict[str, list[Event]], dict[str, list[Event]]]:
    """Each user's events in time order: the last 20 % (at least 1) are test, the rest train."""
    train, test = {}, {}
    for user, evs in _by_user(events).items():
        n_test = max(1, math.floor(TEST_SHARE * len(evs) + 0.5))
        train[user], test[user] = evs[:-n_test], evs[-n_test:]
    return train, test


def _train_part(events: Sequence[Event]) -> list[Event]:
    """Events minus each user's test part, in the original order: what a validation split may read."""
    keep = {id(e) for evs in _per_user(events)[0].values() for e in evs}
    return [e for e in events if id(e) in keep]


PER_USER_NOTE = ("per-user temporal split: each user's events in time order, the last 20 % (at least 1) are test, "
                 "the rest train; other users' later events are in training (the standard protocol, not a global "
                 "time split)")


def movielens(events: Sequence[Event], products: Sequence[Product] = (), *, validation: bool = False,
              seed: int = SEED, utc_offset_h: float = 0.0, dataset: str = "events") -> Split:
    """One query per user: predict the user's later items from the earlier ones, seen items excluded."""
    events = _sorted(events, "movielens")
    if validation:   # the last 20 % of each user's training part; the test part is never read
        events = _train_part(events)
    past_by_user, test_by_user = _per_user(events)
    train = _train_part(events)
    queries = []
    for user, evs in test_by_user.items():
        past = past_by_user[user]
        if not past:
            continue
        seen = frozenset(e.product_id for e in past)
        targets = frozenset(e.product_id for e in evs) - seen   # seen items are excluded: never a hit
        if targets:
            queries.append(Query(0, "homepage", user, past[-1].timestamp + 1, _recent(past), targets,
                                 new_targets=targets, exclude=seen))
    notes = [PER_USER_NOTE + (" (validation: split again inside each user's training part)" if validation else ""),
             "one query per user at 1 s after the user's last training event; targets = the user's test items; "
             "exclude = every item the user touched in training (seen items are not re-recommended)",
             f"no random choice (seed {seed} recorded); {len(queries)} users with training and test items"]
    return _finish("movielens", dataset, train, products, queries, (10, 20, 50), "recall@20", seed, notes,
                   why="no user has both training and new test items")


def new_items(events: Sequence[Event], products: Sequence[Product] = (), *, validation: bool = False,
              seed: int = SEED, utc_offset_h: float = 0.0, dataset: str = "events") -> Split:
    """Cold-start items: 10 % of the items never appear in training; rank only among them."""
    events = _sorted(events, "new_items")
    if validation:
        events = _train_part(events)
    items = sorted({e.product_id for e in events})
    held = frozenset(random.Random(seed).sample(items, max(1, round(HELD_OUT_SHARE * len(items)))))
    past_by_user, test_by_user = _per_user(events)
    train = [e for e in _train_part(events) if e.product_id not in held]
    queries = []
    for user, evs in test_by_user.items():
        # a held-out item the user rated in their training part is seen: excluded like in `movielens`, else
        # a method that reads the user's taste well is marked down for ranking it (about 17 a user here)
        seen = frozenset(e.product_id for e in past_by_user[user]) & held
        targets = (frozenset(e.product_id for e in evs) & held) - seen
        past = [e for e in past_by_user[user] if e.product_id not in held]
        if targets and past:
            queries.append(Query(0, "homepage", user, past_by_user[user][-1].timestamp + 1, _recent(past), targets,
                                 new_targets=targets, exclude=seen, universe=held))
    notes = [f"held out: random.Random({seed}).sample of {len(held)} of the {len(items)} items with events "
             "(sorted ids); every event on them is dropped from training",
             PER_USER_NOTE + (" (validation: split again inside each user's training part, items drawn from it)"
                              if validation else ""),
             "queries only for users whose test part holds held-out items: targets = those items, universe = "
             "the held-out items, exclude = the held-out items the user touched in their own training part (their "
             "events are not in training; the filter stops a seen item counting as a miss)",
             f"{len(queries)} queries, {sum(len(q.exclude) for q in queries)} excluded seen held-out items in all"]
    return _finish("new_items", dataset, train, products, queries, (10, 20), "recall@20", seed, notes, held,
                   why="no user with training events has a held-out item in their test part")


# -- catalogue, registry, datasets ---------------------------------------------------------------

def catalogue_from_events(events: Sequence[Event], products: Sequence[Product] = ()) -> list[Product]:
    """The catalogue plus a stand-in product for every event item it lacks: the ranking pipeline needs one."""
    have = {p.product_id for p in products}
    first: dict[str, Event] = {}
    prices: dict[str, list[float]] = {}
    category: dict[str, str] = {}
    for e in sorted(events, key=lambda e: e.timestamp):
        if e.product_id in have:
            continue
        first.setdefault(e.product_id, e)
        if e.price is not None:
            prices.setdefault(e.product_id, []).append(e.price)
        if e.category is not None:
            category.setdefault(e.product_id, e.category)
    now = max((e.timestamp for e in first.values()), default=0.0)   # created_at is never in the future
    added = [Product.from_dict({
        "product_id": pid, "title": pid, "category_path": (category.get(pid, "unknown"),), "brand": "unknown",
        "price": statistics.median(prices[pid]) if pid in prices else 0.0, "created_at": e.timestamp}, now=now)
        for pid, e in first.items()]
    return list(products) + added


class ProtocolSpec(NamedTuple):
    function: Callable[..., Split]
    format: str
    path: str   # default dataset, relative to a data folder (../shared/data)
    # settings of ours chosen on the protocol's validation split (bench/RESULTS.md, "evaluation": the
    # figures behind each), applied to both of its splits
    settings: dict[str, object] = {}


PROTOCOLS: dict[str, ProtocolSpec] = {
    "homepage": ProtocolSpec(homepage, "taobao", "taobao-userbehavior-head/UserBehavior_head.csv"),
    # bench/tune_ours.py (5,000 validation queries, HitRate@20): ALS rank 128 -> 64 0.6679 -> 0.6707, then ranker depth
    # 8 -> 5 0.6721, item kNN shrink 10 0.6753, ALS regParam 0.1 -> 1 0.6797 (3: 0.6795; alpha 1 or 40, 30 negatives,
    # kNN 50 an anchor: lower); 100 negatives a group 0.6801 (level, half the rows to train on)
    "session": ProtocolSpec(session, "yoochoose", "yoochoose-clicks-100k",
                            {"als_rank": 64, "als_reg": 1.0, "ranker_depth": 5, "knn_shrink": 10.0, "ranker_negatives": 100}),
    "fbt": ProtocolSpec(fbt, "groceries", "groceries-kaggle/Groceries_dataset.csv"),
    # "next" on validation (Recall@20): fusion 0.1565, rules 0.1276, ranker 0.1102, although the trainer's own
    # held-out targets favour the ranker (NDCG@8 0.1412, rules 0.0919, fusion 0.0559): fusion serves it.
    # bench/tune_ours.py (bench/results/ours_tuning.json): item-kNN neighbours per anchor 20 -> 50 (of 400 kept)
    # 0.1558 -> 0.1613 (100: 0.1578, 200: 0.1585), then ALS rank 128 -> 32 0.1640 (64: 0.1605; shrink 10: 0.1615).
    # 2026-12-07 evening: ALS alpha 10 -> 1 lifts ALS alone 0.1318 -> 0.1471 but not the fusion (0.1637; 0.25:
    # 0.1627, 3: 0.1643); fusion of ALS and item kNN only (fusion_weights; all five sources 0.1615 with shrink 10 and
    # 400 an anchor), with kNN shrunk by 10 and read 400, 200 or 100 an anchor: 0.1686, 0.1705, 0.1704 -> 100 (cheaper)
    "movielens": ProtocolSpec(movielens, "movielens", "movielens-latest-small",
                              {"task_orderings": "next=fusion", "cooccurrence_top_n": 400, "knn_per_anchor": 100,
                               "knn_shrink": 10.0, "als_rank": 32, "als_alpha": 1.0, "fusion_weights": "als=1,knn=1"}),
    "new_items": ProtocolSpec(new_items, "movielens", "movielens-latest-small"),
}

YOOCHOOSE_PARTS = ("train_full", "test", "train_tr", "train_valid")


def _yoochoose_parts(folder: Path) -> dict[str, Path]:
    """session-rec's prepared split files, by part name (empty when the folder does not hold all four)."""
    parts = {p: sorted(folder.glob(f"*_{p}.txt")) for p in YOOCHOOSE_PARTS}
    return {p: files[0] for p, files in parts.items() if len(files) == 1} if all(parts.values()) else {}


def _read(fmt: str, path: Path) -> tuple[list[Event], list[Product], int]:
    """(events, products, rows skipped as malformed); a folder of one CSV reads that CSV."""
    if path.is_dir() and fmt == "yoochoose" and (parts := _yoochoose_parts(path)):
        sets = [import_events(fmt, parts[p]) for p in ("train_full", "test")]
        return sorted(sets[0].events + sets[1].events, key=lambda e: e.timestamp), [], sum(len(s.errors) for s in sets)
    if path.is_dir() and fmt != "movielens":
        files = sorted(path.glob("*.csv")) + sorted(path.glob("*.txt")) + sorted(path.glob("*.dat"))
        if len(files) != 1:
            raise ValueError(f"{path}: a folder for format {fmt!r} must hold exactly one data file, found {len(files)}")
        path = files[0]
    data = import_events(fmt, path)
    return data.events, data.products, len(data.errors)


def _session_files(path: Path, validation: bool, seed: int) -> Split:
    """YooChoose's own split files: train_full/test, or train_tr/train_valid for validation."""
    parts = _yoochoose_parts(path)
    train_part, test_part = ("train_tr", "train_valid") if validation else ("train_full", "test")
    train, test = (import_events("yoochoose", parts[p]).events for p in (train_part, test_part))
    note = f"session-rec's prepared split: {parts[train_part].name} trains, {parts[test_part].name} is the test"
    return session_from_parts(train, test, seed=seed, dataset=str(path), notes=[note])


def sample_queries(split: Split, max_queries: int, seed: int) -> Split:
    """Whole users (or sessions standing in for users), drawn with a seeded RNG, until about max_queries."""
    users = sorted({q.user_id for q in split.queries})
    random.Random(seed).shuffle(users)
    count = Counter(q.user_id for q in split.queries)
    chosen, total = set(), 0
    for u in users:
        if total >= max_queries:
            break
        chosen.add(u)
        total += count[u]
    queries = [replace(q, qid=i) for i, q in enumerate(q for q in split.queries if q.user_id in chosen)]
    note = (f"sampled {len(chosen)} of {len(users)} users (random.Random({seed}).shuffle of sorted ids) for "
            f"about {max_queries} queries: {len(queries)} of {len(split.queries)}; training unchanged")
    return replace(split, queries=queries, notes=split.notes + [note])


def make_split(protocol: str, path: str | Path, fmt: str | None = None, *, validation: bool = False,
               seed: int = SEED, max_queries: int | None = None) -> Split:
    """Read a dataset (format `fmt`, default the protocol's) and make the protocol's test or validation split."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    spec, path = PROTOCOLS[protocol], Path(path)
    fmt = fmt or spec.format
    if protocol == "session" and path.is_dir() and fmt == "yoochoose" and _yoochoose_parts(path):
        split = _session_files(path, validation, seed)
    else:
        events, products, skipped = _read(fmt, path)
        split = spec.function(events, products, validation=validation, seed=seed,
                              utc_offset_h=LOCAL_UTC_OFFSET_H.get(fmt, 0.0), dataset=str(path))
        if skipped:
            split.notes.append(f"{skipped} malformed rows skipped by the importer")
    if max_queries is not None and len(split.queries) > max_queries:
        split = sample_queries(split, max_queries, seed)
    return split


def summary(split: Split) -> dict[str, object]:
    """Counts and time ranges of a split, for the report."""
    t = [e.timestamp for e in split.train]
    q = [x.now_s for x in split.queries]
    return {"protocol": split.protocol, "dataset": split.dataset, "train_events": len(t),
            "train_from": _iso(min(t)), "train_to": _iso(max(t)), "queries": len(q),
            "users": len({x.user_id for x in split.queries}),
            "targets": sum(len(x.targets) for x in split.queries),
            "new_targets": sum(len(x.new_targets) for x in split.queries),
            "queries_from": _iso(min(q)), "queries_to": _iso(max(q)), "held_out_items": len(split.held_out_items)}
