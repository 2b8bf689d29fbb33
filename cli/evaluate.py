"""`recstream evaluate`: a protocol's split, our models trained on its training part, every method side by side.

Ours runs the code the agents serve, called in-process: `batch.train.fit` (Spark ALS and
co-occurrence, content model, FAISS index, XGBoost ranker) on the training events only; the
feature agents' `plan` folds the training events into online state in a Redis namespace of the
run's own (deleted at the end); the agents' `Retrieval.handle` and `Ranking.handle` answer each
query with their clocks set to the query's moment. Three variants of ours share that retrieval:
ALS alone (the FAISS candidates in ALS order), ALS with the rule-based retrievers (every source,
the rules-only ranking that serves before a ranker exists), and the full pipeline (the ranker
with session features). Each passes the same business rules (stock, dedupe, diversity).

Leak-freedom: the Spark job, the ranker and the online counters see only `split.train`. During
the test period the online state takes in a query's own session events (`Query.apply`) as the
session state only: popularity, trending and co-occurrence stay as training left them, as they
do for the baselines. Every method answers the same queries, from the training items (or the
query's universe), with `Query.exclude` removed.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from agents.models import ModelHolder, ServingModel, load_bundle
from agents.ranking import Ranking
from agents.retrieval import Retrieval
from batch import train as training
from batch.publish import publish
from recstream.evaluation import baselines as bl
from recstream.evaluation.core import Method, Query, Split
from recstream.evaluation.metrics import evaluate as score_lists
from recstream.evaluation.metrics import set_recall
from recstream.evaluation.protocols import PROTOCOLS, catalogue_from_events
from recstream.features.config import feature_config, limits
from recstream.features.plan import Incoming, plan
from recstream.features.session import UserState
from recstream.settings import Settings
from schemas import CandidateSet, Event, RecommendationReply, RecommendationRequest
from schemas.recommendations import MAX_COUNT, SOURCES
from streams.online_store import open_store, unlink_matching
from streams.redisconn import connect
from streams.store import Store

Progress = Callable[[str], None]
OURS = ("ours_als", "ours_als_rules", "ours_full")
FOLD_CHUNK = 4000          # training events per online-state batch, as the feature agent takes them
FAR_OFFSET = 1 << 62       # "already counted": test events update the session state only


@dataclass
class MethodResult:
    name: str
    ours: bool
    metrics: dict[str, float]
    curve: list[float]              # the primary metric at K = 1 .. max K
    seconds: float


@dataclass
class Evaluation:
    split: Split
    results: list[MethodResult]
    training: dict[str, float] = field(default_factory=dict)
    # the primary metric's family over ours' unordered candidate set, whole ("all") and per source, with the
    # mean set size ("size"): the ceiling of every ordering (see metrics.set_recall)
    candidate_recall: dict[str, float] = field(default_factory=dict)
    baselines: str = ""             # how the baselines' hyper-parameters were set (tuned or not, and where)

    def result(self, name: str) -> MethodResult:
        return next(r for r in self.results if r.name == name)

    @property
    def full_pipeline(self) -> MethodResult:
        return self.result("ours_content" if self.split.protocol == "new_items" else "ours_full")

    @property
    def best_baseline(self) -> MethodResult:
        return max((r for r in self.results if not r.ours), key=lambda r: r.metrics[self.split.primary])

    @property
    def lift(self) -> float:
        """Relative gain of the full pipeline over the best baseline on the primary metric."""
        base = self.best_baseline.metrics[self.split.primary]
        return self.full_pipeline.metrics[self.split.primary] / base - 1 if base > 0 else math.inf


def default_baselines(s: Settings, protocol: str | None = None) -> list[Method]:
    """Every baseline, on every protocol (the table is never a selected subset). Untuned, implicit's ALS is at
    our rank and the others at their constructors' defaults; for a protocol, the hyper-parameters chosen on its
    validation split (bl.tuned_params: bench/tune_baselines.py) replace those."""
    tuned = bl.tuned_params(protocol) if protocol is not None else {}
    als = {"factors": s.als_rank, "regularization": s.als_reg, "alpha": s.als_alpha, "iterations": s.als_iterations}
    return [bl.Popularity(**tuned.get("pop", {})), bl.SessionPopularity(), bl.ItemKNN(**tuned.get("iknn", {})),
            bl.SessionKNN(**tuned.get("vsknn", {})), bl.ImplicitALS(**{**als, **tuned.get("ials", {})}),
            bl.GenreProfile(), bl.Random()]


def baselines_note(protocol: str) -> str:
    """How the default baselines of `protocol` were set, for the report."""
    tuned = bl.tuned_params(protocol)
    if not tuned:
        return "baselines untuned: their constructors' defaults (implicit's ALS at our rank)"
    return ("baselines tuned on this protocol's validation split (bench/tune_baselines.py; chosen settings in "
            "recstream/evaluation/tuned_baselines.json, figures in bench/results/baseline_tuning.json): " +
            "; ".join(f"{name} " + ", ".join(f"{k}={v}" for k, v in params.items()) for name, params in tuned.items()))


def eval_settings(s: Settings, split: Split) -> Settings:
    """The training window spans the whole split; the run's own Redis namespace; no popularity cache
    (each query has its own moment); the serving filter "exclude purchased" off, since the filter
    every method shares is Query.exclude (the homepage protocol puts the user's purchases in it;
    Groceries shoppers buy milk again, and a grocer would turn the setting off); no diversity cap
    per category and no widget tiers (co-purchased items first on the cart widget), which no
    baseline has (display rules that trade accuracy for variety or a promise: a shop's choice). The
    protocol's settings chosen on its validation split (ProtocolSpec.settings) apply too."""
    first, last = split.train[0].timestamp, split.train[-1].timestamp
    days = int(math.ceil((last - first) / 86_400)) + 2
    ns = f"{s.redis_namespace}eval:{split.protocol}:{uuid.uuid4().hex[:8]}:"
    chosen = PROTOCOLS[split.protocol].settings if split.protocol in PROTOCOLS else {}
    return dataclasses.replace(s, train_window_days=max(s.train_window_days, days), redis_namespace=ns,
                               item_stats_ttl_s=0.0, item_cache_ttl_s=3600.0,
                               exclude_purchased=False, max_per_category=0, widget_tiers=False, **chosen)


class RedisUnavailable(RuntimeError):
    pass


async def _ping(url: str) -> None:
    client = aioredis.from_url(url)
    try:
        await client.ping()
    except (aioredis.ConnectionError, OSError) as exc:
        raise RedisUnavailable(f"Redis at {url} does not answer ({exc}): our pipeline serves from Redis; "
                               f"start it with `recstream services up`") from None
    finally:
        await client.aclose()


def run(s: Settings, split: Split, baselines: Sequence[Method] | None = None, progress: Progress = print,
        workdir: Path | None = None) -> Evaluation:
    asyncio.run(_ping(s.redis_url))   # before minutes of training
    ks = list(range(1, split.max_k + 1))   # the curve: the primary metric at every K
    universe = {e.product_id for e in split.train}
    if split.protocol == "new_items":
        universe = set(split.held_out_items)
    results: list[MethodResult] = []
    note = baselines_note(split.protocol) if baselines is None else "baselines given by the caller"
    if baselines is None:
        baselines = default_baselines(s, split.protocol)
        progress(f"[evaluate] {note}")
    for method in baselines:
        t0 = time.perf_counter()
        method.fit(split)
        lists = method.recommend(split.queries, split.max_k)
        results.append(_result(method.name, False, split, lists, ks, universe, time.perf_counter() - t0))
        progress(f"[evaluate] {method.name}: {split.primary} {results[-1].metrics[split.primary]:.4f} "
                 f"[{results[-1].seconds:.1f} s]")
    es = eval_settings(s, split)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t0 = time.perf_counter()
        progress(f"[evaluate] training ours on {len(split.train):,} events (Spark, content model, index, ranker) ...")
        fitted = training.fit(es, split.train, catalogue_from_events(split.train, split.products), Path(tmp), progress)
        train_s = time.perf_counter() - t0
        progress(f"[evaluate] trained in {train_s:.1f} s; ranker {fitted.metrics.get('ranker_ndcg_at_8', float('nan')):.4f} "
                 f"NDCG@8 on its own held-out targets")
        t0 = time.perf_counter()
        recall: dict[str, float] = {}
        if split.protocol == "new_items":
            lists = {"ours_content": _content_lists(fitted, split)}
        else:
            bundle = training.write_bundle(Path(tmp) / "bundle", fitted.out, fitted.index, fitted.content, fitted.ranker,
                                      fitted.metrics, training.Source("evaluation"), es)
            lists, candidates = asyncio.run(_serve(es, split, fitted, bundle, progress))
            recall = candidate_recall(split, candidates, universe)
            progress("[evaluate] candidate " + split.primary.split("@")[0] + ": " +
                     ", ".join(f"{k} {v:.4f}" if k != "size" else f"{k} {v:.1f}" for k, v in recall.items()))
        seconds = (time.perf_counter() - t0) / len(lists)
        for name, ranked in lists.items():
            clean = [_filtered(q, r, universe, split.max_k) for q, r in zip(split.queries, ranked)]
            results.append(_result(name, True, split, clean, ks, universe, seconds))
            progress(f"[evaluate] {name}: {split.primary} {results[-1].metrics[split.primary]:.4f}")
    return Evaluation(split, results, {"train_s": train_s, **fitted.metrics}, recall, note)


def candidate_recall(split: Split, candidates: dict[str, list[list[str]]], universe: set[str]) -> dict[str, float]:
    """Per source (and "all"), what ours' candidate sets hold of the targets, under the filter every method
    shares (a candidate the query excludes cannot be a hit); "size": the mean number of candidates."""
    family = split.primary.split("@")[0]
    clean = {name: [[x for x in c if x not in q.exclude and x in (q.universe if q.universe is not None else universe)]
                    for q, c in zip(split.queries, sets)] for name, sets in candidates.items()}
    out = {name: set_recall(split.queries, sets, family) for name, sets in clean.items()}
    out["size"] = float(np.mean([len(c) for c in clean["all"]])) if clean.get("all") else 0.0
    return out


def _result(name: str, ours: bool, split: Split, lists: list[list[str]], ks: list[int], universe: set[str],
            seconds: float) -> MethodResult:
    m = score_lists(split.queries, lists, sorted(set(ks) | set(split.ks)), universe)
    family = split.primary.split("@")[0]
    curve = [m[f"{family}@{k}"] for k in ks]
    keep = {k: v for k, v in m.items() if "@" not in k or int(k.split("@")[1].split("_")[0]) in split.ks}
    return MethodResult(name, ours, keep, curve, seconds)


def _filtered(q: Query, ranked: list[str], universe: set[str], k: int) -> list[str]:
    """Our lists under the filter every method shares: the query's exclusions, the item universe."""
    allowed = q.universe if q.universe is not None else universe
    return [x for x in dict.fromkeys(ranked) if x not in q.exclude and x in allowed][:k]


def _content_lists(fitted: training.Fitted, split: Split) -> list[list[str]]:
    """New items, through the content model: the user's ALS vector against the vectors the content
    model gave the held-out items (the rows the serving index holds for them)."""
    items = fitted.items.index()
    users = fitted.out.user_embeddings.index()
    out = []
    for q in split.queries:
        cands = sorted(x for x in (q.universe or ()) if x in items and x not in q.exclude)
        u = users.get(q.user_id)
        if u is None or not cands:
            out.append(cands[: split.max_k])
            continue
        scores = fitted.items.vectors[[items[x] for x in cands]] @ fitted.out.user_embeddings.vectors[u]
        out.append([cands[i] for i in np.argsort(-scores, kind="stable")[: split.max_k]])
    return out


# -- ours, served in-process ------------------------------------------------------------------------

Lists = dict[str, list[list[str]]]


async def _serve(s: Settings, split: Split, fitted: training.Fitted, bundle: Path,
                 progress: Progress) -> tuple[Lists, Lists]:
    client = connect(s)
    store = open_store(s, client, group=f"{s.app_id}-evaluate")
    version = "eval"
    try:
        await store.write_items(catalogue_from_events(split.train, split.products))
        await publish(s, s.model_name, version, fitted.out, fitted.items, progress=lambda m: None, announce=False)
        states = await _fold_training(s, store, split.train, progress)
        retrieval_model = load_bundle(bundle, version, "retrieval", threads=1)
        ranking_model = load_bundle(bundle, version, "ranking", threads=1)
        plain = dataclasses.replace(ranking_model, booster=None, orderings={}, task_boosters={})   # the rules
        # the whole index in this process (every shard's file, if the version is sharded): one unsharded agent
        retrieval = Retrieval(dataclasses.replace(s, retrieval_shards=1, retrieval_shard=0), store,
                              _holder(s, "retrieval", retrieval_model))
        full, rules = Ranking(s, store, _holder(s, "ranking", ranking_model)), Ranking(s, store, _holder(s, "ranking", plain))
        try:
            return await _answer(s, split, store, states, retrieval, full, rules, progress)
        finally:
            for agent in (retrieval, full, rules):
                agent.close()
    finally:
        await unlink_matching(client, s.redis_namespace + "*")
        await client.aclose()


def _holder(s: Settings, role: str, model: ServingModel) -> ModelHolder:
    holder = ModelHolder(s, role)
    holder.current = model
    return holder


async def _fold_training(s: Settings, store: Store, events: list[Event], progress: Progress) -> dict[str, UserState]:
    """The feature agents' writes for the training events, in time order. Expiry times are dropped:
    they are absolute (a past day's counts would expire at once), and the namespace goes at the end."""
    cfg, lim = feature_config(s), dataclasses.replace(limits(s), session_ttl_s=7 * 86_400)
    states: dict[str, UserState] = {}
    categories = {e.product_id: e.category for e in events if e.category}
    t0 = time.perf_counter()
    for start in range(0, len(events), FOLD_CHUNK):
        batch = [Incoming(e, 0, start + i) for i, e in enumerate(events[start:start + FOLD_CHUNK])]
        result = plan(batch, states, {}, categories, cfg, lim)
        result.ops.expire_at.clear()
        result.ops.offsets.clear()
        await store.apply(result.ops)
        states.update(result.states)
    progress(f"[evaluate] online state: {len(events):,} training events folded for {len(states):,} users "
             f"[{time.perf_counter() - t0:.1f} s]")
    return states


async def _answer(s: Settings, split: Split, store: Store, states: dict[str, UserState], retrieval: Retrieval,
                  full: Ranking, rules: Ranking, progress: Progress) -> tuple[Lists, Lists]:
    """Ours' ranked lists per variant, and the candidate sets retrieval proposed, whole ("all") and per source."""
    cfg, lim = feature_config(s), dataclasses.replace(limits(s), session_ttl_s=7 * 86_400)
    out: Lists = {name: [] for name in OURS}
    proposed: Lists = {"all": [], **{source: [] for source in SOURCES}}
    offset, t0, last = 0, time.perf_counter(), time.perf_counter()
    train_end = split.train[-1].timestamp
    for n, q in enumerate(split.queries):
        shift = _shift(q.now_s, train_end)
        q = dataclasses.replace(q, now_s=q.now_s - shift,
                                apply=tuple(dataclasses.replace(e, timestamp=e.timestamp - shift) for e in q.apply))
        if q.apply:
            batch = []
            for e in q.apply:
                batch.append(Incoming(e, 1, offset))
                offset += 1
            result = plan(batch, states, {1: FAR_OFFSET}, {}, cfg, lim)   # session state only
            await store.apply(result.ops)
            states.update(result.states)
        for agent in (retrieval, full, rules):
            agent.clock = lambda t=q.now_s: t
        request = RecommendationRequest(
            request_id=f"eval-{q.qid}", kind=q.kind, created_at=q.now_s, user_id=q.user_id,
            session_id=states[q.user_id].session_id if q.user_id in states else None,
            cart_items=q.cart[:100], count=MAX_COUNT, deadline_ms=10_000)
        [candidates] = await retrieval.handle([request])
        cs = CandidateSet.from_json(candidates.value, now=q.now_s)
        proposed["all"].append(list(cs.product_ids))
        for source in SOURCES:
            col = cs.scores.get(source) or ()
            proposed[source].append([x for x, sc in zip(cs.product_ids, col) if sc is not None and not math.isnan(sc)])
        als_only = _als_only(cs)
        for name, agent, c in (("ours_full", full, cs), ("ours_als_rules", rules, cs), ("ours_als", rules, als_only)):
            [reply] = await agent.handle([c])
            out[name].append([it.product_id for it in RecommendationReply.from_json(reply.value, now=q.now_s).items])
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            progress(f"[evaluate] ours: {n + 1:,} of {len(split.queries):,} queries "
                     f"({(n + 1) / (last - t0):.0f}/s)")
    return out, {name: sets for name, sets in proposed.items() if name == "all" or any(sets)}


def _shift(now_s: float, train_end_s: float) -> float:
    """Whole days to move a query back so it comes within a day of the end of training. The online
    counters stay as training left them (no test event is counted), and their windows are read
    back from the request's moment: a basket five months later would read empty 7-day popularity
    and trending, where a shop's counters would be current. The time of day is kept."""
    return max(0.0, math.floor((now_s - train_end_s) / 86_400) * 86_400)


def _als_only(cs: CandidateSet) -> CandidateSet:
    """The candidate set as FAISS alone proposed it: ALS-scored items only, in ALS order."""
    als = cs.scores.get("als") or ()
    rows = [i for i, x in enumerate(als) if x is not None and not math.isnan(x)]
    rows.sort(key=lambda i: -als[i])
    pick = lambda col: tuple(col[i] for i in rows)   # noqa: E731
    return dataclasses.replace(cs, product_ids=pick(cs.product_ids), scores={"als": pick(als)},
                               anchors={"als": pick(cs.anchors["als"])} if "als" in cs.anchors else {})

