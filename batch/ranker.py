"""Ranker training: point-in-time examples replayed from history, XGBoost LambdaMART, offline metrics.

Each user's events are folded in time order with recstream.features.session.apply, the function the
online feature agents run, and popularity, trending and co-occurrence are counted with the same keys
and decay as the feature agents (`ReplayState`); so the state behind every example is what Redis held
just before the target event. Candidates come from recstream.candidates, the function the retrieval
agent calls, with this replay answering its reads as Redis does (ZREVRANGE order, trending read 2n
deep per landmark); features from recstream.ranking.matrix, the function the ranking agent calls.
Each target stands for a task (recstream.ordering): the homepage on arrival or within a live session,
or the cart widget over the basket the session holds, and its candidates are that widget's.
"""
from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import xgboost as xgb
from tqdm import tqdm

from models.artifacts import BatchOutputs
from models.booster import score
from recstream import candidates, ordering
from recstream.features import popularity
from recstream.features.config import feature_config
from recstream.features.session import FeatureConfig, UserState, apply
from recstream.ranking import FEATURE_NAMES, SOURCES, Columns, Context, ItemFields, matrix
from recstream.settings import Settings
from schemas import Event, Product

GRADES = {"view": 1, "click": 1, "add_to_cart": 2, "purchase": 3}
EARLY_STOP = 25     # boosting rounds without a better held-out NDCG before training stops
TASK_BOOSTERS = ("cart",)   # tasks that may get a ranker of their own examples
MIN_TASK_GROUPS = 200       # training groups a task needs for one


@dataclass(frozen=True, slots=True)
class RankerConfig:
    trees: int = 200
    depth: int = 8
    learning_rate: float = 0.1
    negatives: int = 0                # negatives kept per training group beside its positives (0: all)
    nthread: int = 2                  # set explicitly: OpenMP's default oversubscribes shared cores
    seed: int = 0
    als_candidates: int = 50          # ANN candidates, as retrieval's RECSTREAM_RETRIEVAL_CANDIDATES
    knn_per_anchor: int = 20          # item-kNN neighbours per anchor, as retrieval's RECSTREAM_KNN_PER_ANCHOR
    train_fraction: float = 0.8       # earliest share of targets, by time, to train on
    target_sample: float = 1.0        # share of targets kept, chosen by a hash of the event id (deterministic)
    targets_from_s: float = float("-inf")   # only events from here on are targets (earlier ones build the state)
    label_horizon_s: float = 86_400.0  # positives: what the user engaged with within this long (0: the next event)
    k: int = 8                        # NDCG@k and recall@k
    pins: Mapping[str, str] = field(default_factory=dict)   # task -> ordering it serves whatever the held-out says
    fusion_weights: tuple[float, ...] | None = None   # fusion's weight per source column, as the ranking agent's
    popularity_window_days: int = 7
    trending_half_life_s: float = 6 * 3600
    features: FeatureConfig = field(default_factory=FeatureConfig)
    progress: bool = True


def _tuple(weights: np.ndarray | None) -> tuple[float, ...] | None:
    return None if weights is None else tuple(float(w) for w in weights)


def ranker_config(s: Settings, **overrides) -> RankerConfig:
    # as many ALS candidates as retrieval hands to ranking: trained on 50 while serving 200, the ranker
    # met items far down the ALS list only at serving, and scored them arbitrarily (Groceries, 167 items)
    return RankerConfig(trees=s.ranker_trees, depth=s.ranker_depth, negatives=s.ranker_negatives,
                        popularity_window_days=s.popularity_window_days,
                        als_candidates=s.retrieval_candidates, knn_per_anchor=s.knn_per_anchor,
                        label_horizon_s=s.ranker_label_horizon_s,
                        trending_half_life_s=s.trending_half_life_s, features=feature_config(s),
                        pins=s.ordering_pins, fusion_weights=_tuple(s.fusion_weight_vector), **overrides)


# -- items and point-in-time popularity --------------------------------------------------------

class ItemTable:
    """Catalogue fields and ALS vectors as arrays by row, so a request's columns are fancy indexing."""

    def __init__(self, products: Sequence[Product], outputs: BatchOutputs):
        ids = [p.product_id for p in products]
        fields = [ItemFields.from_product(p) for p in products]
        known = set(ids)
        for pid in outputs.item_embeddings.ids:            # embedded but not in the catalogue: fields unknown
            if pid not in known:
                ids.append(pid)
                fields.append(ItemFields(category=outputs.item_category.get(pid)))
        self.ids = ids
        self.index = {pid: i for i, pid in enumerate(ids)}
        self.category = [f.category for f in fields]
        self.brand = [f.brand for f in fields]
        self.num = {a: np.array([getattr(f, a) for f in fields], np.float64)
                    for a in ("price", "rating", "seller_rating", "in_stock", "created_at")}
        emb = outputs.item_embeddings
        self.embeddings = np.full((len(ids), emb.rank), np.nan, np.float32)
        rows = np.array([self.index[pid] for pid in emb.ids], np.int64)
        self.embeddings[rows] = emb.vectors
        self.als_rows, self.als_vectors = rows, emb.vectors
        by_cat: dict[str, list[int]] = {}
        for i, c in enumerate(self.category):
            if c is not None:
                by_cat.setdefault(c, []).append(i)
        self.category_rows = {c: np.array(r, np.int64) for c, r in by_cat.items()}
        self.all_rows = np.arange(len(ids), dtype=np.int64)

    def columns(self, rows: np.ndarray, sources: np.ndarray, pop: np.ndarray, bought: np.ndarray,
                trend: np.ndarray, window: np.ndarray | None = None) -> Columns:
        n = self.num
        emb = self.embeddings[rows] if self.embeddings.shape[1] else None
        return Columns(ids=[self.ids[i] for i in rows], categories=[self.category[i] for i in rows],
                       embeddings=emb, price=n["price"][rows], rating=n["rating"][rows],
                       seller_rating=n["seller_rating"][rows], in_stock=n["in_stock"][rows],
                       created_at=n["created_at"][rows], popularity_7d=pop, purchases_7d=bought, trending=trend,
                       sources=sources, popularity_window=window)


class Popularity:
    """What the pop:*, popcat:* and trend:* keys hold at a moment, counted from the events so far."""

    def __init__(self, n_items: int, window_days: int, half_life_s: float, weights: dict[str, float]):
        self.n, self.window, self.half_life, self.weights = n_items, window_days, half_life_s, weights
        self.days: dict[int, np.ndarray] = {}     # day -> (3, n): views+clicks, purchases, weighted events
        self.trend: dict[int, np.ndarray] = {}    # landmark -> forward-decayed increments
        self.total = np.zeros(n_items)            # weighted events since the window's start (the version's counts)

    def add(self, row: int, event_type: str, ts: float) -> None:
        d = self.days.setdefault(popularity.day(ts), np.zeros((3, self.n)))
        if event_type in ("view", "click"):
            d[0, row] += 1
        elif event_type == "purchase":
            d[1, row] += 1
        weight = self.weights[event_type]
        d[2, row] += weight
        self.total[row] += weight
        t = self.trend.setdefault(popularity.landmark(ts), np.zeros(self.n))
        t[row] += popularity.trend_increment(weight, ts, self.half_life)

    def window_counts(self, now: float, rows: np.ndarray) -> np.ndarray:
        """(3, len(rows)): views+clicks, purchases and weighted events over the window, at `now`."""
        total = np.zeros((3, len(rows)))
        for d in popularity.window_days(now, self.window):
            if d in self.days:
                total += self.days[d][:, rows]
        return total

    def trending(self, now: float, rows: np.ndarray) -> np.ndarray:
        out = np.zeros(len(rows))
        for lm, w in popularity.trend_read_weights(now, self.half_life).items():
            if lm in self.trend:
                out += self.trend[lm][rows] * w
        return out


# -- examples ----------------------------------------------------------------------------------

@dataclass(slots=True)
class Group:
    """One target: its request context and candidates, kept so tests can rebuild it the online way."""
    ctx: Context
    rows: np.ndarray            # candidate rows in the ItemTable
    sources: np.ndarray
    popularity_7d: np.ndarray
    purchases_7d: np.ndarray
    trending: np.ndarray
    popularity_window: np.ndarray   # weighted events since the window's start (what the version will carry)
    target: str
    grade: int
    novel: bool                 # the target was not in the session, cart or purchases already
    later: dict[str, int] = field(default_factory=dict)   # what the user engaged with within the horizon: grade
    task: str = "home"          # the widget the target stands for (recstream.ordering.task_of_target)


@dataclass(slots=True)
class Examples:
    X: np.ndarray               # (rows, len(FEATURE_NAMES)) float32
    y: np.ndarray               # graded labels
    qid: np.ndarray             # group index per row, non-decreasing (time order)
    offsets: np.ndarray         # group g is rows offsets[g]:offsets[g+1]
    groups: list[Group]
    table: ItemTable
    targets: int = 0            # targets seen, before dropping those retrieval missed


def build_examples(events: Iterable[Event], outputs: BatchOutputs, products: Sequence[Product],
                   cfg: RankerConfig) -> Examples:
    """The ranker's training examples: the events replayed in time order through the serving path's
    state (sessions, popularity, trending), each held-out step a group of candidates from the same
    candidate stage the agents run, labelled by what the shopper did within `label_horizon_s`."""
    table = ItemTable(products, outputs)
    replay = ReplayState(table, Popularity(len(table.ids), cfg.popularity_window_days, cfg.trending_half_life_s,
                                           cfg.features.weights), cfg.trending_half_life_s,
                         candidates.ItemLists(outputs.knn))
    users = outputs.user_embeddings.index()
    user_vectors = outputs.user_embeddings.vectors
    idle = cfg.features.session_idle_timeout_s
    states: dict[str, UserState] = {}
    last_request: dict[str, tuple[str, str]] = {}       # user -> (device, page) of the previous event
    groups: list[Group] = []
    blocks: list[np.ndarray] = []
    targets = 0
    ordered = sorted(events, key=lambda e: e.timestamp)
    future = _Future(ordered, cfg.label_horizon_s)
    for e in tqdm(ordered, desc="ranker examples", unit="event", mininterval=1, disable=not cfg.progress):
        state = states.get(e.user_id, UserState())
        row = table.index.get(e.product_id)
        # a target: any interaction of a user seen before, in time order: one that continues a live
        # session (real-time adaptation), or one that opens a new visit (the homepage on arrival,
        # the state then holding the previous session)
        if (row is not None and e.timestamp >= cfg.targets_from_s and state.events
                and state.session_start_s <= e.timestamp and _sampled(e.event_id, cfg.target_sample)):
            targets += 1
            shopper = candidates.Shopper.from_state(state, e.timestamp, idle)
            live = candidates.is_live(state.last_s, state.events, e.timestamp, idle)
            task = ordering.task_of_target(e.event_type, live, bool(shopper.cart or shopper.basket))
            basket = tuple(dict.fromkeys((*shopper.cart, *shopper.basket)))[:100]
            ask = candidates.Ask("cart", cart_items=basket) if task == "cart" else candidates.Ask("homepage")
            u = users.get(e.user_id)
            q = candidates.query(ask, shopper, user_vectors[u] if u is not None else None, replay.vector)
            device, page = last_request[e.user_id]
            ctx = Context(now_s=e.timestamp, user_embedding=q.rank_vector, session=state,
                          category_affinity=outputs.category_affinity.get(e.user_id, {}),
                          median_price=outputs.user_median_price.get(e.user_id), device=device, page=page,
                          session_idle_timeout_s=idle)
            group = _group(ctx, ask, shopper, q, state, e, row, replay, cfg)
            if group is not None:
                group.later = future.after(e)
                group.task = task
                groups.append(group)
                blocks.append(matrix(ctx, table.columns(group.rows, group.sources, group.popularity_7d,
                                                        group.purchases_7d, group.trending, group.popularity_window)))
        update = apply(state, e, cfg.features, table.category[row] if row is not None else None)
        if update.duplicate:
            continue
        states[e.user_id] = update.state
        last_request[e.user_id] = (e.device, e.page)
        replay.fold(update.covisits, update.copurchases, row, e)
    return _examples(groups, blocks, table, targets)


def _examples(groups: list[Group], blocks: list[np.ndarray], table: ItemTable, targets: int) -> Examples:
    """The groups' feature blocks as one matrix, labelled: everything engaged with soon after a
    target is a positive, graded by how far the shopper went (Group.later)."""
    sizes = np.array([len(g.rows) for g in groups], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    y = np.zeros(int(offsets[-1]), np.float32)
    for g, start in zip(groups, offsets[:-1]):
        for pid, grade in g.later.items():
            at = np.flatnonzero(g.rows == table.index.get(pid, -1))
            if len(at):
                y[start + at] = np.maximum(y[start + at], grade)
    X = np.concatenate(blocks) if blocks else np.empty((0, len(FEATURE_NAMES)), np.float32)
    qid = np.repeat(np.arange(len(groups), dtype=np.uint32), sizes)
    return Examples(X, y, qid, offsets, groups, table, targets)


class ReplayState:
    """What the feature agents' Redis keys hold at a moment of the replay, answering the candidate
    stage's reads (recstream.candidates.plan) as streams.online_store.RedisStore.candidate_reads does:
    neighbour lists best count first, ties by member descending (ZREVRANGE); trending as the current
    and previous landmark's scores, each read 2n deep, summed and cut to n; a brand's items by rating."""

    def __init__(self, table: ItemTable, pop: Popularity, half_life_s: float, knn: candidates.ItemLists | None = None):
        self.table, self.pop, self.half_life_s, self.knn = table, pop, half_life_s, knn
        self.cooccurrence: dict[str, dict[str, Counter]] = {"covis": {}, "cobuy": {}}   # covis:/cobuy: so far

    def fold(self, covisits: Iterable[tuple[str, str]], copurchases: Iterable[tuple[str, str]], row: int | None,
             e: Event) -> None:
        for source, pairs in (("covis", covisits), ("cobuy", copurchases)):
            for a, b in pairs:
                for x, y in ((a, b), (b, a)):
                    self.cooccurrence[source].setdefault(x, Counter())[y] += 1
        if row is not None:
            self.pop.add(row, e.event_type, e.timestamp)

    def vector(self, product_id: str) -> np.ndarray | None:
        row = self.table.index.get(product_id)
        if row is None or not self.table.embeddings.shape[1]:
            return None
        v = self.table.embeddings[row]
        return None if np.isnan(v).any() else v

    def anchor_items(self, ids: Sequence[str]) -> list[dict[str, str]]:
        """The anchors' item_features fields the candidate stage reads ({} for an unknown item)."""
        out = []
        for pid in ids:
            row = self.table.index.get(pid)
            out.append({} if row is None else {"category": self.table.category[row] or "",
                                               "brand": self.table.brand[row] or ""})
        return out

    def answer(self, reads: Sequence[candidates.Read], now: float) -> list[Sequence[tuple[str, float]]]:
        stored = [self._trending(rd.key, rd.n, now) if rd.table == "trend" else
                  self._brand(rd.key, rd.n) if rd.table == "brand" else self._neighbours(rd.table, rd.key, rd.n)
                  for rd in reads if rd.table not in candidates.MODEL_TABLES]
        return candidates.answer(reads, stored, self.knn)

    def nearest(self, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        t = self.table
        if not len(t.als_rows):
            return []
        scores = t.als_vectors @ query
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(t.ids[t.als_rows[i]], float(scores[i])) for i in top]

    def _neighbours(self, table: str, item: str | None, n: int) -> list[tuple[str, float]]:
        counts = self.cooccurrence[table].get(item)
        if not counts:
            return []
        return [(pid, float(c)) for pid, c in heapq.nlargest(n, counts.items(), key=lambda kv: (kv[1], kv[0]))]

    def _trending(self, category: str | None, n: int, now: float) -> list[tuple[str, float]]:
        rows = self.table.category_rows.get(category) if category is not None else self.table.all_rows
        if rows is None:
            return []
        ids = self.table.ids
        acc: dict[str, float] = {}
        for lm, w in popularity.trend_read_weights(now, self.half_life_s).items():
            held = self.pop.trend.get(lm)
            if held is None:
                continue
            values = held[rows]
            kept = np.flatnonzero(values > 0)   # a trend key holds the items with events at that landmark
            best = sorted(kept, key=lambda i: (values[i], ids[rows[i]]), reverse=True)[: 2 * n] if len(kept) <= 4 * n \
                else _top_members(values, rows, ids, 2 * n)
            for i in best:
                pid = ids[rows[i]]
                acc[pid] = acc.get(pid, 0.0) + float(values[i]) * w
        return sorted(acc.items(), key=lambda x: -x[1])[:n]

    def _brand(self, brand: str | None, n: int) -> list[tuple[str, float]]:
        t = self.table
        rated = [(t.ids[i], float(np.nan_to_num(t.num["rating"][i]))) for i in range(len(t.ids)) if t.brand[i] == brand]
        return heapq.nlargest(n, rated, key=lambda kv: (kv[1], kv[0]))


def _top_members(values: np.ndarray, rows: np.ndarray, ids: list[str], n: int) -> list[int]:
    """Positions of the n largest positive values, ties by member id descending (ZREVRANGE's order),
    without sorting every value (trending overall runs over the whole catalogue for every target)."""
    kth = np.partition(values, len(values) - n)[len(values) - n]
    near = np.flatnonzero((values >= kth) & (values > 0))   # the n best and every tie with the last
    return sorted(near, key=lambda i: (values[i], ids[rows[i]]), reverse=True)[:n]


class _Future:
    """Per user, the events in time order, to label a request with what followed it within the horizon."""

    def __init__(self, ordered: Sequence[Event], horizon_s: float):
        self.horizon_s = horizon_s
        self.by_user: dict[str, list[Event]] = {}
        self.position: dict[str, int] = {}
        for e in ordered:
            self.by_user.setdefault(e.user_id, []).append(e)

    def after(self, e: Event) -> dict[str, int]:
        """Grades (best per product) of the user's events from `e` on, up to horizon_s after it."""
        events = self.by_user[e.user_id]
        i = self.position.get(e.user_id, 0)
        while events[i].event_id != e.event_id:
            i += 1
        self.position[e.user_id] = i
        out: dict[str, int] = {}
        end = e.timestamp + self.horizon_s
        for later in events[i:]:
            if later.timestamp > end and later is not e:
                break
            out[later.product_id] = max(out.get(later.product_id, 0), GRADES[later.event_type])
        return out


def _sampled(event_id: str, share: float) -> bool:
    if share >= 1.0:
        return True
    h = int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < share


def _group(ctx: Context, ask: candidates.Ask, shopper: candidates.Shopper, q: candidates.Query, state: UserState,
           e: Event, target_row: int, replay: ReplayState, cfg: RankerConfig) -> Group | None:
    """The candidates retrieval would propose for `ask` at this moment; None when the target is not among them."""
    reads = candidates.plan(ask, shopper, replay.anchor_items(candidates.anchors(ask)), SOURCES, cfg.knn_per_anchor)
    proposals = candidates.propose(ask, shopper, reads, replay.answer(reads, ctx.now_s), SOURCES)
    if q.vector is not None:
        candidates.add_ann(proposals, replay.nearest(q.vector, cfg.als_candidates + 1), q.anchor)
    ids, scores, _ = proposals.columns()
    index = replay.table.index
    keep = [i for i, pid in enumerate(ids) if pid in index]   # an item neither in the catalogue nor embedded
    rows = np.array([index[ids[i]] for i in keep], np.int64)
    if target_row not in set(rows.tolist()):
        return None
    sources = np.full((len(rows), len(SOURCES)), np.nan)
    for j, source in enumerate(SOURCES):
        col = scores.get(source)
        if col is not None:
            sources[:, j] = [np.nan if col[i] is None else col[i] for i in keep]
    counts = replay.pop.window_counts(ctx.now_s, rows)
    known = {*state.recent, *state.cart, *state.purchases}
    return Group(ctx, rows, sources, counts[0], counts[1], replay.pop.trending(ctx.now_s, rows),
                 replay.pop.total[rows].copy(), e.product_id, GRADES[e.event_type], e.product_id not in known)


# -- training and evaluation -------------------------------------------------------------------

@dataclass
class RankerResult:
    booster: xgb.Booster
    model: bytes                    # booster.save_raw("ubj"): what the registry stores
    feature_names: list[str]
    metrics: dict[str, float]
    n_examples: int
    n_groups: int
    orderings: dict[str, str] = field(default_factory=dict)   # task -> the ordering it serves (recstream.ordering)
    task_models: dict[str, bytes] = field(default_factory=dict)  # task -> its own ranker, where it serves the task


def fit(ex: Examples, cfg: RankerConfig) -> RankerResult:
    """Train on the earliest `train_fraction` of groups by time; evaluate on the rest."""
    n_groups = len(ex.groups)
    cut = int(n_groups * cfg.train_fraction)
    if cut < 1 or cut >= n_groups:
        raise ValueError(f"{n_groups} groups with a positive: too few to train and evaluate")
    r = int(ex.offsets[cut])
    names = list(FEATURE_NAMES)
    test = slice(r, None)
    booster = _boost(ex, slice(0, r), test, cfg)
    offsets = ex.offsets[cut:] - r
    novel = np.array([g.novel for g in ex.groups[cut:]])
    ranker = score(booster, ex.X[test])
    dot = ex.X[test, FEATURE_NAMES.index("ui_dot")]
    baseline = np.where(np.isnan(dot), -np.inf, dot)   # retrieval order: by dot product
    metrics: dict[str, float] = {"train_groups": float(cut), "test_groups": float(n_groups - cut),
                                 "ranker_trees_kept": float(booster.num_boosted_rounds()),
                                 "test_novel_groups": float(novel.sum())}
    for name, s in (("ranker", ranker), ("baseline", baseline)):
        ndcg, recall = evaluate(s, ex.y[test], offsets, cfg.k)
        metrics[f"{name}_ndcg@{cfg.k}"], metrics[f"{name}_recall@{cfg.k}"] = float(ndcg.mean()), float(recall.mean())
        if novel.any():
            metrics[f"{name}_novel_ndcg@{cfg.k}"] = float(ndcg[novel].mean())
            metrics[f"{name}_novel_recall@{cfg.k}"] = float(recall[novel].mean())
    orderings, task_models = {}, {}
    tasks = np.array([g.task for g in ex.groups])
    held_tasks = tasks[cut:]
    per_ordering = {name: evaluate(_ordering_scores(name, ex.X[test], ranker, offsets, cfg.fusion_weights), ex.y[test],
                                   offsets, cfg.k)[0]
                    for name in ordering.ORDERINGS}
    for task in ordering.TASKS:   # the ranker serves a task only where it beats every simpler ordering
        mine = np.flatnonzero(held_tasks == task)
        ndcg = {name: values[mine] for name, values in per_ordering.items()}
        for name, values in ndcg.items():
            if len(mine):
                metrics[f"{task}_{name}_ndcg@{cfg.k}"] = float(values.mean())
        own = np.flatnonzero(tasks[:cut] == task)
        if task in TASK_BOOSTERS and len(own) >= MIN_TASK_GROUPS and len(mine):
            # a ranker of the task's own examples (baskets to complete are another task than the next
            # click): kept where it beats the ranker of every task on the task's held-out groups
            rows = lambda groups: np.concatenate([np.arange(ex.offsets[g], ex.offsets[g + 1]) for g in groups])  # noqa: E731
            task_booster = _boost(ex, rows(own), rows(mine + cut), cfg)
            values = evaluate(score(task_booster, ex.X[test]), ex.y[test], offsets, cfg.k)[0][mine]
            metrics[f"{task}_task_ranker_ndcg@{cfg.k}"] = float(values.mean())
            if values.mean() > ndcg["ranker"].mean():
                task_models[task], ndcg["ranker"] = task_booster, values
        metrics[f"{task}_groups"] = float(len(mine))
        orderings[task] = cfg.pins.get(task) or ordering.choose(ndcg)
    return RankerResult(booster, bytes(booster.save_raw("ubj")), names, metrics, int(ex.X.shape[0]), n_groups,
                        orderings, {t: bytes(b.save_raw("ubj")) for t, b in task_models.items()
                                    if orderings[t] == "ranker"})


def _boost(ex: Examples, train: slice | np.ndarray, held_out: slice | np.ndarray, cfg: RankerConfig) -> xgb.Booster:
    """LambdaMART on the rows `train`, boosting stopped when NDCG on the rows `held_out` stops improving."""
    names = list(FEATURE_NAMES)
    params = {"objective": "rank:ndcg", "eval_metric": f"ndcg@{cfg.k}", "max_depth": cfg.depth,
              "eta": cfg.learning_rate, "nthread": cfg.nthread, "tree_method": "hist", "seed": cfg.seed}
    if cfg.negatives > 0:
        train = sample_negatives(np.arange(len(ex.y))[train], ex.y, ex.qid, cfg.negatives, cfg.seed)
    dtrain, dtest = (xgb.DMatrix(ex.X[rows], label=ex.y[rows], qid=ex.qid[rows], feature_names=names,
                                 nthread=cfg.nthread) for rows in (train, held_out))
    # at most cfg.trees rounds, fewer when the later groups stop improving (small data overfits:
    # Groceries gives ~3k groups); the held-out figures are then slightly optimistic
    booster = xgb.train(params, dtrain, num_boost_round=cfg.trees, evals=[(dtrain, "train"), (dtest, "held_out")],
                        early_stopping_rounds=EARLY_STOP, verbose_eval=max(1, cfg.trees // 10) if cfg.progress else False)
    if booster.best_iteration + 1 < booster.num_boosted_rounds():
        booster = booster[: booster.best_iteration + 1]
    return booster


def sample_negatives(rows: np.ndarray, y: np.ndarray, qid: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`rows` (ascending) less negatives: every positive (y > 0) of each group (qid) and at most `n` of its
    negatives, drawn at random with `seed`; ascending, so the groups stay contiguous."""
    key = np.random.default_rng(seed).random(len(rows))
    negative = y[rows] <= 0
    order = np.lexsort((key, ~negative, qid[rows]))    # by group, positives first, then negatives at random
    s, neg = rows[order], negative[order]
    g = qid[s]
    start = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    before = np.cumsum(neg) - neg                      # negatives before each row, over all groups
    within = before - np.repeat(before[start], np.diff(np.r_[start, len(s)]))
    return np.sort(s[~neg | (within < n)])


_SCORE_COLUMNS = [FEATURE_NAMES.index(f"score_{s}") for s in SOURCES]
_COLUMN = {name: FEATURE_NAMES.index(name)
           for name in ("log_popularity_7d", "log_purchases_7d", "log_trending", "ui_dot", "log_popularity_window")}


def _ordering_scores(name: str, X: np.ndarray, ranker_scores: np.ndarray, offsets: np.ndarray,
                     fusion_weights: tuple[float, ...] | None = None) -> np.ndarray:
    """One ordering's scores of feature rows, from the columns the agent orders by at serving, group by
    group (rows offsets[g]:offsets[g+1]): as at serving, an ordering sees one request's candidates."""
    sources, dot, trending = X[:, _SCORE_COLUMNS], X[:, _COLUMN["ui_dot"]], np.expm1(X[:, _COLUMN["log_trending"]])
    engaged = (np.nan_to_num(np.expm1(X[:, _COLUMN["log_popularity_7d"]]))
               + np.nan_to_num(np.expm1(X[:, _COLUMN["log_purchases_7d"]])))
    window = np.expm1(X[:, _COLUMN["log_popularity_window"]])
    weights = None if fusion_weights is None else np.asarray(fusion_weights)
    out = np.empty(len(X))
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        out[lo:hi] = ordering.scores(name, sources[lo:hi], engaged[lo:hi], trending[lo:hi], dot[lo:hi],
                                     ranker_scores[lo:hi], window[lo:hi], weights)
    return out


def train(events: Iterable[Event], outputs: BatchOutputs, products: Sequence[Product],
          cfg: RankerConfig) -> RankerResult:
    return fit(build_examples(events, outputs, products, cfg), cfg)


def evaluate(scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group NDCG@k (gain 2^label - 1) and recall@k; ties keep candidate order."""
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ndcg, recall = np.zeros(len(offsets) - 1), np.zeros(len(offsets) - 1)
    for g in range(len(offsets) - 1):
        s, y = scores[offsets[g]:offsets[g + 1]], labels[offsets[g]:offsets[g + 1]]
        top = y[np.argsort(-s, kind="stable")[:k]]
        ideal = np.sort(y)[::-1][:k]
        idcg = float(((2.0 ** ideal - 1) * discount[: len(ideal)]).sum())
        ndcg[g] = float(((2.0 ** top - 1) * discount[: len(top)]).sum()) / idcg if idcg > 0 else 0.0
        recall[g] = float((top > 0).sum()) / max(int((y > 0).sum()), 1)
    return ndcg, recall
