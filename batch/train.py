"""One training run, end to end: events -> Spark (ALS, co-occurrence, aggregates) -> content model
-> FAISS index -> ranker -> one MLflow version -> publish to serving when it becomes champion.

A run that fails at any stage registers and publishes nothing: serving keeps the version it has,
and the error says which stage failed and why.
"""
from __future__ import annotations

import asyncio
import json
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from batch import job, ranker
from batch.publish import current as serving_pointer
from batch.publish import publish, publish_registered
from models import index as faiss_index
from models.artifacts import BatchOutputs, Embeddings
from models.content import ContentModel
from models.registry import CHAMPION, Registry, write_manifest
from recstream import ordering
from recstream.data import ShopConfig, load_dataset, shop_dataset
from recstream.privacy import pseudonymise_events, without_erased
from recstream.ranking import FEATURE_NAMES
from recstream.settings import Settings
from schemas import Event, Product

PROMOTION_METRIC = "ranker_novel_ndcg_at_8"  # held-out NDCG@8 on items new to the session: repeats are easy


class TrainingFailed(RuntimeError):
    def __init__(self, stage: str, reason: str, serving: str | None):
        self.stage, self.reason, self.serving = stage, reason, serving
        keeps = f"serving keeps version {serving}" if serving else "no version is serving yet"
        super().__init__(f"training failed at {stage}: {reason}; {keeps}")


@dataclass
class Source:
    """Where a run reads its events: the Parquet archive (default) or an imported dataset."""
    dataset: str | None = None   # None: the archive; else a recstream.data format or "shop"
    path: Path | None = None
    shop: ShopConfig | None = None  # the generated shop's size and seed (dataset "shop")

    def describe(self) -> str:
        return "archive" if self.dataset is None else f"{self.dataset}:{self.path or 'embedded'}"


@dataclass
class TrainReport:
    version: str
    alias: str
    promotion: str
    metrics: dict[str, float]
    window: dict
    stage_s: dict[str, float]
    peak_rss_mb: float
    warnings: list[str] = field(default_factory=list)
    published_keys: int = 0


def load_source(s: Settings, source: Source) -> tuple[list[Event], list[Product]]:
    # a dataset's ids hashed as the edges hash the stream's (RECSTREAM_USER_ID_KEY; the archive holds them hashed)
    if source.dataset == "shop" and source.shop is not None:
        data = shop_dataset(source.shop)
        return pseudonymise_events(data.events, s.user_id_key), data.products
    if source.dataset is not None:
        data = load_dataset(source.dataset, source.path)
        return pseudonymise_events(data.events, s.user_id_key), data.products
    from streams.archive import dataset_dir, read_archive
    from streams.catalogue import read_catalogue

    folder = dataset_dir(s)
    if not folder.exists():
        raise job.TrainingDataError(f"no archive at {folder}: run `recstream worker archive` first")
    names = [f.name for f in Event.__dataclass_fields__.values()]
    rows = read_archive(folder).select(names).to_pylist()
    events = sorted((Event(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()}) for r in rows),
                    key=lambda e: e.timestamp)
    products, _ = asyncio.run(read_catalogue(s))
    return events, products


def without_erased_shoppers(s: Settings, events: list[Event]) -> tuple[list[Event], int]:
    """`events` less those of every shopper erased so far (the erasures topic and Redis' copy,
    streams/erasures.py), so no model trained after an erasure has seen the shopper; and how many went.
    The archive drops them too, but its rewrite runs in the background: this filter does not wait for it."""
    from streams.erasures import read_erased
    from streams.online_store import open_store
    from streams.redisconn import connect

    async def erased() -> set[str]:
        client = connect(s)
        try:
            return await read_erased(s, open_store(s, client))
        finally:
            await client.aclose()

    gone = asyncio.run(erased())
    if not gone:
        return events, 0
    kept = list(without_erased(events, gone))
    return kept, len(events) - len(kept)


def train_once(s: Settings, source: Source, progress: Callable[[str], None] = print, publish_to_serving: bool = True,
               workdir: Path | None = None) -> TrainReport:
    registry = Registry(s.mlflow_tracking_uri, s.model_name)
    serving = registry.champion_version()
    stages: dict[str, float] = {}
    current = "start"

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        nonlocal current
        current = name
        progress(f"[train] {name} ...")
        t = time.perf_counter()
        yield
        stages[name] = time.perf_counter() - t
        progress(f"[train] {name} done in {stages[name]:.1f} s")

    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            work = Path(tmp)
            with stage("load"):
                events, products = load_source(s, source)
                events, n_erased = without_erased_shoppers(s, events)
                if n_erased:
                    progress(f"[train] {n_erased} events of erased shoppers left out of the window")
                if not events:
                    raise job.TrainingDataError(f"{source.describe()} holds no events")
            fitted = fit(s, events, products, work, progress, stage)
            out, idx, content, result, metrics, items = (fitted.out, fitted.index, fitted.content, fitted.ranker,
                                                         fitted.metrics, fitted.items)
            with stage("register"):
                bundle = write_bundle(work / "bundle", out, idx, content, result, metrics, source, s)
                reg = registry.register(bundle, metrics, _params(s, idx, source), PROMOTION_METRIC, s.promotion_margin)
                progress(f"[train] version {reg.version} is {reg.alias}: {reg.decision.reason}")
            published = 0
            if publish_to_serving and reg.alias == CHAMPION:
                with stage("publish"):
                    try:
                        published = asyncio.run(publish(s, s.model_name, reg.version, out, items, progress)).keys
                    except Exception:   # the registry's champion stays what serving serves
                        registry.restore_champion(serving, reg.version)
                        raise
            elif publish_to_serving and serving is not None and not _published(asyncio.run(serving_pointer(s)), s):
                # serving has no model (Redis lost its keys) while the registry has a champion: serve that one
                with stage("publish"):
                    progress(f"[train] serving has no model: publishing the champion, version {serving}")
                    published = publish_registered(s, serving, progress).keys
            return TrainReport(reg.version, reg.alias, reg.decision.reason, metrics, out.window.__dict__, stages,
                               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, out.warnings, published)
    except Exception as exc:  # every stage: report which, keep serving as it is
        raise TrainingFailed(current, f"{type(exc).__name__}: {exc}", serving) from exc


@dataclass
class Fitted:
    """What one run trains, before the registry: Spark's outputs, the index, the content model, the ranker."""
    out: BatchOutputs
    items: Embeddings               # ALS item vectors, plus content-model vectors for untouched catalogue items
    index: faiss_index.RetrievalIndex | faiss_index.ShardedIndex
    content: ContentModel | None
    ranker: ranker.RankerResult
    metrics: dict[str, float]


@contextmanager
def _quiet_stage(name: str) -> Iterator[None]:
    yield


def fit(s: Settings, events: list[Event], products: list[Product], work: Path, progress: Callable[[str], None] = print,
        stage: Callable[[str], AbstractContextManager[None]] = _quiet_stage) -> Fitted:
    """Train every model of a version on `events` (time-ordered): `recstream train` and `recstream evaluate`."""
    with stage("spark"):
        from batch.spark import session

        spark = session(s)
        try:
            df = job.load_events(spark, job.events_to_parquet(events, work / "events.parquet"))
            out = job.build(spark, df, s, progress=progress)
            window_events = _window(events, out)
            cut, past = _ranker_cut(window_events, s.ranker_target_share), out
            if cut is not None:   # the ranker's features come from vectors that never saw its targets
                progress(f"[train] ALS for the ranker's features: events before {cut:.0f} (the latest "
                         f"{s.ranker_target_share:.0%} are its targets)")
                past = job.build(spark, df.filter(df.timestamp < cut), s, end_s=cut, progress=progress)
        finally:
            spark.stop()
    with stage("content"):
        items, content, cold = _items_with_cold_start(out, products, progress)
    with stage("index"):
        idx, recall = _index(items, out.user_embeddings, progress, s.index_kind, shards=s.retrieval_shards)
    with stage("ranker"):
        cfg = ranker.ranker_config(s, nthread=2, progress=False, target_sample=s.ranker_target_sample,
                                   targets_from_s=cut if cut is not None else float("-inf"))
        result = ranker.train(window_events, past, products, cfg)
        progress("[train] ordering per task, by held-out NDCG@8 (the ranker serves a task only where it beats "
                 "the simpler orderings clearly): " + "; ".join(_ordering_line(t, o, result.metrics, t in cfg.pins)
                                                                for t, o in result.orderings.items()))
    metrics = {**{f"batch_{k}": v for k, v in out.metrics.items()},
               **{k.replace("@", "_at_"): v for k, v in result.metrics.items()},
               "faiss_recall_at_200": recall, "items_cold_start": float(cold),
               "events": float(out.window.events), "users": float(out.window.users),
               "items": float(out.window.items)}
    return Fitted(out, items, idx, content, result, metrics)


def _ordering_line(task: str, chosen: str, metrics: dict[str, float], pinned: bool) -> str:
    figures = ", ".join(f"{o} {metrics[f'{task}_{o}_ndcg@8']:.4f}" for o in (*ordering.ORDERINGS, "task_ranker")
                        if f"{task}_{o}_ndcg@8" in metrics)
    return (f"{task} -> {chosen}{' (pinned: RECSTREAM_TASK_ORDERINGS)' if pinned else ''} "
            f"({int(metrics.get(f'{task}_groups', 0))} groups: {figures or 'none held out'})")


def _published(pointer: dict | None, s: Settings) -> bool:
    """Whether the model pointer in Redis names a version of this model."""
    return bool(pointer) and pointer.get("name") == s.model_name and "version" in pointer


def _ranker_cut(events: list[Event], share: float) -> float | None:
    """The moment from which the latest `share` of the window's events are the ranker's targets;
    None when the share is 0 or 1, or when too few events come before it (then the ranker's
    vectors are the serving ones, which have seen its targets)."""
    if not 0 < share < 1 or len(events) < 100:
        return None
    cut = events[int(len(events) * (1 - share))].timestamp
    return cut if sum(1 for e in events if e.timestamp < cut) >= 50 else None


def _window(events: list[Event], out: BatchOutputs) -> list[Event]:
    """The events the Spark job trained on, de-duplicated by event_id, in time order."""
    seen: set[str] = set()
    kept = []
    for e in events:
        if out.window.start_s <= e.timestamp <= out.window.end_s and e.event_id not in seen:
            seen.add(e.event_id)
            kept.append(e)
    return kept


def _items_with_cold_start(out: BatchOutputs, products: list[Product], progress) -> tuple[Embeddings, ContentModel | None, int]:
    """ALS item embeddings, plus content-model embeddings for catalogue items nobody touched yet."""
    known = out.item_embeddings.index()
    if not any(p.product_id in known for p in products):
        out.warnings.append("no catalogue rows for the trained items: no content model, no cold-start embeddings")
        return out.item_embeddings, None, 0
    content = ContentModel.fit(products, out.item_embeddings)
    cold = [p for p in products if p.product_id not in known]
    if not cold:
        return out.item_embeddings, content, 0
    predicted = content.predict(cold)
    progress(f"[train] content model: embeddings for {len(cold)} products without interactions")
    return (Embeddings(out.item_embeddings.ids + predicted.ids,
                       np.vstack([out.item_embeddings.vectors, predicted.vectors])), content, len(cold))


def _index(items: Embeddings, users: Embeddings, progress, kind: str = "auto", k: int = 200, target: float = 0.95,
           shards: int = 1):
    """The `kind` of index (RECSTREAM_INDEX_KIND), its nprobe tuned for recall@200 >= target on user
    queries. For "auto": exact search when IVF would have to scan more than a quarter of its lists for
    that (weakly clustered embeddings), since it costs the same: over float16 vectors on a CPU (2.4x
    faster, same recall), float32 on a GPU. An IVF-PQ index stays one (it is chosen for its memory).
    With shards > 1 (RECSTREAM_RETRIEVAL_SHARDS), one such index per shard of the items, each tuned on
    its own items, and the recall is that of their merged top k."""
    if shards > 1:
        parts = [_index(part, users, progress, kind, k, target)[0] if len(part.ids) else faiss_index.build(part, "flat")
                 for part in faiss_index.split_by_shard(items, shards)]
        idx = faiss_index.ShardedIndex(parts)
        progress(f"[train] index: {shards} shards of {', '.join(str(len(p)) for p in parts)} items ({idx.kind})")
        return idx, _recall(idx, items, users, k)
    idx = faiss_index.build(items, kind)
    if len(users.ids) == 0:
        return idx, float("nan")
    q = _user_queries(users)
    if idx.kind in faiss_index.IVF_KINDS:
        nprobe, recall = faiss_index.tune_nprobe(idx, items, q, k, target=target)
        if kind == "auto" and nprobe > idx.params["nlist"] // 4:
            exact = "flat" if faiss_index.GPU.available() else "flat16"
            progress(f"[train] IVF needs nprobe {nprobe} of {idx.params['nlist']} lists for recall {recall:.3f}: "
                     f"exact search ({exact}) instead")
            idx = faiss_index.build(items, exact)
    return idx, _recall(idx, items, users, k)


def _user_queries(users: Embeddings, n: int = 500) -> np.ndarray:
    """The queries an index is tuned and measured with: a fixed sample of the users' vectors."""
    rng = np.random.default_rng(0)
    return users.vectors[rng.choice(len(users.ids), size=min(n, len(users.ids)), replace=False)]


def _recall(idx, items: Embeddings, users: Embeddings, k: int) -> float:
    if len(users.ids) == 0:
        return float("nan")
    return faiss_index.recall_at_k(idx, items, _user_queries(users), min(k, len(items.ids)))


def write_bundle(folder: Path, out: BatchOutputs, idx, content, result, metrics, source: Source, s: Settings) -> Path:
    out.save(folder / "batch")
    for name, data in faiss_index.index_files(idx).items():
        (folder / name).write_bytes(data)
    if content is not None:
        (folder / "content.npz").write_bytes(content.to_bytes())
    (folder / "ranker.ubj").write_bytes(result.model)
    (folder / "orderings.json").write_text(json.dumps(result.orderings))
    for task, model in result.task_models.items():
        (folder / f"ranker-{task}.ubj").write_bytes(model)
    (folder / "features.json").write_text(json.dumps(list(FEATURE_NAMES)))
    write_manifest(folder, {"created_at": time.time(), "source": source.describe(), "window": out.window.__dict__,
                            "metrics": metrics, "orderings": result.orderings, "warnings": out.warnings,
                            "index": {"kind": idx.kind, **idx.params},
                            "als": {"rank": s.als_rank, "iterations": s.als_iterations, "reg": s.als_reg,
                                    "alpha": s.als_alpha}})
    return folder


def _params(s: Settings, idx, source: Source) -> dict[str, object]:
    return {"source": source.describe(), "als_rank": s.als_rank, "als_iterations": s.als_iterations,
            "als_reg": s.als_reg, "als_alpha": s.als_alpha, "window_days": s.train_window_days,
            "ranker_trees": s.ranker_trees, "ranker_depth": s.ranker_depth, "ranker_negatives": s.ranker_negatives,
            "index_kind": idx.kind,
            **{f"index_{k}": v for k, v in idx.params.items()}}


def run_forever(s: Settings, source: Source, every_hours: float, stop: Callable[[], bool],
                progress: Callable[[str], None] = print) -> None:
    """`recstream trainer`: retrain every `every_hours`; a failed run is reported and the next one tried."""
    while not stop():
        t = time.monotonic()
        try:
            report = train_once(s, source, progress)
            progress(f"[trainer] version {report.version} ({report.alias}) in {sum(report.stage_s.values()):.0f} s")
        except TrainingFailed as exc:
            progress(f"[trainer] {exc}")
        while not stop() and time.monotonic() - t < every_hours * 3600:
            time.sleep(1.0)
