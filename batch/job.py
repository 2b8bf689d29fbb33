"""The batch training job: archived events in a window -> ALS embeddings, co-occurrence and aggregates.

One run reads the clickstream Parquet (the archive, or any file of `schemas.Event` rows), keeps the
window [end - train_window_days, end] (end: the newest event unless given), drops repeated event_ids
(at-least-once delivery), and produces `models.artifacts.BatchOutputs`. Everything runs in Spark's
JVM (DataFrames and MLlib, no Python UDFs): executors need no Python, only the driver collects the
final, per-item and per-user results that the contract holds in memory.

Run it here (local[*], settings from RECSTREAM_* variables):

    .venv/bin/python -m batch.job --events .local/archive/clickstream --out .local/batch/latest

Run the same file on a cluster; spark-submit's --master and --driver-memory then win over the
settings, and the driver needs this project installed (`pip install .` in the Python that
PYSPARK_PYTHON names); executors run no Python code, so they need nothing beyond Spark:

    PYSPARK_PYTHON=.venv/bin/python spark-submit --master spark://HOST:7077 \\
        --driver-memory 8g --executor-memory 8g --conf spark.sql.shuffle.partitions=400 \\
        --packages org.apache.hadoop:hadoop-aws:3.4.1 \\
        batch/job.py --events s3a://BUCKET/archive/clickstream --out /data/batch/latest

(`--packages` only for reading object storage: hadoop-aws must match Spark's Hadoop version;
`--master yarn` works the same way.) Exit status 2 means the data cannot train a model
(TrainingDataError, message on stderr); nothing is written then.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark import StorageLevel
from pyspark.ml.feature import StringIndexer
from pyspark.ml.recommendation import ALS
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import Window as W
from pyspark.sql import functions as F
from pyspark.sql import types as T

from batch.spark import session
from models.artifacts import BatchOutputs, Embeddings, Neighbours, Window
from recstream.settings import Settings, load
from schemas import Event
from schemas.arrow import arrow_schema, to_table

DAY_S = 86_400
ALS_SEED = 20_251_125        # fixed: the same events and settings give the same embeddings
MAX_SESSION_ITEMS = 100      # co-occurrence reads a session's last 100 distinct items (pairs grow as k^2)
KNN, COBUY = 0, 1             # the two co-occurrence tables, as integers in the job
Progress = Callable[[str], None]
_SPARK_TYPES = {pa.string(): T.StringType(), pa.float64(): T.DoubleType(), pa.int64(): T.LongType(),
                pa.bool_(): T.BooleanType()}
_KEEP = ["user_id", "session_id", "product_id", "event_type", "timestamp", "price", "category"]


class TrainingDataError(ValueError):
    """The events cannot train a model (nothing in the window, nothing readable); the message says why."""


# -- reading ---------------------------------------------------------------------------------------

def event_schema() -> T.StructType:
    """Spark's schema of the clickstream, derived from schemas.Event through its Arrow schema."""
    return T.StructType([T.StructField(f.name, _SPARK_TYPES[f.type], True) for f in arrow_schema(Event)])


def events_to_parquet(events: list[Event], path: Path) -> Path:
    """Write events as one Parquet file with the archive's schema (for tests and imported datasets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table(events, Event), path)
    return path


def load_events(spark: SparkSession, path: str | Path) -> DataFrame:
    """Event rows from a Parquet file, a folder of them, or the archive (dt=/hour= folders: the
    partition columns are dropped). Repeats are kept: `build` drops and counts them."""
    text = str(path)
    if "://" not in text and not Path(text).exists():
        raise TrainingDataError(f"{text}: no such file or folder")
    schema = event_schema()
    return spark.read.schema(schema).parquet(text).select(*schema.fieldNames())


# -- the job ---------------------------------------------------------------------------------------

def build(spark: SparkSession, events_df: DataFrame, s: Settings, end_s: float | None = None,
          progress: Progress = print) -> BatchOutputs:
    """Train on the window [end - s.train_window_days, end] of `events_df` (end: `end_s`, or the newest event)."""
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    warnings: list[str] = []
    events, window = _window_events(events_df, s, end_s, warnings, progress)
    metrics["load_s"] = time.perf_counter() - started
    try:
        mark = time.perf_counter()
        users, items, ratings = _als(events, s)
        metrics["als_s"], metrics["ratings"] = time.perf_counter() - mark, float(ratings)
        progress(f"batch als: rank {s.als_rank}, {s.als_iterations} iterations on {ratings:,} user-item pairs: "
                 f"{len(users.ids):,} users, {len(items.ids):,} items [{metrics['als_s']:.1f} s]")
        mark = time.perf_counter()
        knn, cobuy, capped = _cooccurrence(events, s.cooccurrence_top_n, s.knn_shrink)
        if capped:
            warnings.append(f"sessions with more than {MAX_SESSION_ITEMS} distinct items viewed (or bought): "
                            f"{capped:,}; co-occurrence counts only their last {MAX_SESSION_ITEMS}")
        if window.purchases == 0:
            warnings.append("no purchases in the window: cobuy (frequently bought together) is empty")
        metrics["cooccurrence_s"] = time.perf_counter() - mark
        progress(f"batch cooccurrence: knn for {len(knn):,} items, cobuy for {len(cobuy):,} items "
                 f"[{metrics['cooccurrence_s']:.1f} s]")
        mark = time.perf_counter()
        aggregates = _aggregates(events, window, s, warnings)
        metrics["aggregates_s"] = time.perf_counter() - mark
        progress(f"batch aggregates: categories for {len(aggregates['item_category']):,} items, affinity for "
                 f"{len(aggregates['category_affinity']):,} users [{metrics['aggregates_s']:.1f} s]")
    finally:
        events.unpersist()
    metrics["total_s"] = time.perf_counter() - started
    for w in warnings:
        progress(f"batch warning: {w}")
    return BatchOutputs(window, users, items, knn, cobuy, metrics=metrics, warnings=warnings, **aggregates)


def _weight(weights: dict[str, float]) -> Column:
    """Event weight by type (s.event_weights, the same the real-time features use); null for unknown types."""
    expr = None
    for kind, w in weights.items():
        cond = F.col("event_type") == kind
        expr = F.when(cond, F.lit(float(w))) if expr is None else expr.when(cond, F.lit(float(w)))
    return expr


def _utc(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _window_events(df: DataFrame, s: Settings, end_s: float | None, warnings: list[str],
                   progress: Progress) -> tuple[DataFrame, Window]:
    """The window's events, one row per event_id (the first by time), persisted; and their counts."""
    started = time.perf_counter()
    weight = _weight(s.event_weights)
    valid = (F.col("event_id").isNotNull() & F.col("user_id").isNotNull() & F.col("session_id").isNotNull()
             & F.col("product_id").isNotNull() & F.col("timestamp").isNotNull() & weight.isNotNull())
    seen = df.agg(F.count(F.lit(1)).alias("rows"), F.count(F.when(~valid, 1)).alias("invalid"),
                  F.min(F.when(valid, F.col("timestamp"))).alias("first"),
                  F.max(F.when(valid, F.col("timestamp"))).alias("last")).first()
    end = float(end_s) if end_s is not None else seen["last"]
    if end is None:
        raise TrainingDataError(f"no events to train on: {seen['rows']:,} rows read, {seen['invalid']:,} invalid")
    start = end - s.train_window_days * DAY_S
    by_id = W.partitionBy("event_id")
    events = (df.filter(valid & F.col("timestamp").between(start, end))
              .withColumn("weight", weight)
              .withColumn("copies", F.count(F.lit(1)).over(by_id))
              .withColumn("nth", F.row_number().over(by_id.orderBy("timestamp", "user_id", "product_id", "event_type")))
              .filter(F.col("nth") == 1)
              .select(*_KEEP, "weight", "copies")
              .persist(StorageLevel.MEMORY_AND_DISK))
    c = events.agg(F.count(F.lit(1)).alias("events"), F.sum(F.col("copies") - 1).alias("duplicates"),
                   F.countDistinct("user_id").alias("users"), F.countDistinct("product_id").alias("items"),
                   F.count(F.when(F.col("event_type") == "purchase", 1)).alias("purchases")).first()
    if c["events"] == 0:
        events.unpersist()
        raise TrainingDataError(
            f"no events in the training window {_utc(start)} .. {_utc(end)} ({s.train_window_days} days back from "
            f"{'the given end' if end_s is not None else 'the newest event'}): {seen['rows']:,} rows read, "
            f"{seen['invalid']:,} invalid, valid events from {_utc(seen['first'])} to {_utc(seen['last'])}")
    window = Window(start, end, c["events"], c["duplicates"] or 0, c["users"], c["items"], c["purchases"])
    outside = seen["rows"] - seen["invalid"] - window.events - window.duplicates
    if seen["invalid"]:
        warnings.append(f"{seen['invalid']:,} rows dropped: a missing id or timestamp, or an event type "
                        f"outside {sorted(s.event_weights)}")
    progress(f"batch load: {window.events:,} events in {_utc(start)} .. {_utc(end)} ({window.duplicates:,} duplicates "
             f"dropped, {outside:,} rows outside the window): {window.users:,} users, {window.items:,} items, "
             f"{window.purchases:,} purchases [{time.perf_counter() - started:.1f} s]")
    return events, window


def _als(events: DataFrame, s: Settings) -> tuple[Embeddings, Embeddings, int]:
    """Implicit ALS (Hu, Koren, Volinsky, ICDM 2008) on r(user, item) = summed event weights; confidence
    1 + alpha * r. String ids are indexed densely (0..n-1, alphabetical) and mapped back."""
    ratings = events.groupBy("user_id", "product_id").agg(F.sum("weight").alias("rating"))
    users = StringIndexer(inputCol="user_id", outputCol="user", stringOrderType="alphabetAsc").fit(ratings)
    items = StringIndexer(inputCol="product_id", outputCol="item", stringOrderType="alphabetAsc").fit(ratings)
    indexed = (items.transform(users.transform(ratings))
               .select(F.col("user").cast("int"), F.col("item").cast("int"), "rating")
               .persist(StorageLevel.MEMORY_AND_DISK))
    try:
        n = indexed.count()
        # One block per core (Spark's default, 10, only adds tasks on a small machine).
        blocks = max(1, events.sparkSession.sparkContext.defaultParallelism)
        als = ALS(rank=s.als_rank, maxIter=s.als_iterations, regParam=s.als_reg, alpha=s.als_alpha,
                  implicitPrefs=True, userCol="user", itemCol="item", ratingCol="rating",
                  numUserBlocks=blocks, numItemBlocks=blocks, coldStartStrategy="drop", seed=ALS_SEED)
        model = als.fit(indexed)
        return (_embeddings(model.userFactors, users.labelsArray[0], s.als_rank),
                _embeddings(model.itemFactors, items.labelsArray[0], s.als_rank), n)
    finally:
        indexed.unpersist()


def _embeddings(factors: DataFrame, labels: list[str], rank: int) -> Embeddings:
    table = factors.toArrow().sort_by("id")
    ids = [labels[i] for i in table.column("id").to_pylist()]
    values = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return Embeddings(ids, np.asarray(values, dtype=np.float32).reshape(len(ids), rank))


def _cooccurrence(events: DataFrame, top_n: int, shrink: float = 0.0) -> tuple[Neighbours, Neighbours, int]:
    """Item-to-item neighbours within a session, over every event type ("knn": the retrieval source of
    that name, item kNN as Sarwar et al., WWW 2001) and over purchases ("cobuy"): per item, its top_n
    neighbours by cosine over sessions, c_ab / sqrt(c_a * c_b), where c_ab counts the distinct sessions
    holding both items and c_a those holding a.

    Cosine (Ochiai), not raw counts or lift: for one item a it ranks neighbours by c_ab / sqrt(c_b), so a
    best-seller that sits in every basket no longer tops every list (raw counts), while an item seen once,
    once beside a, does not outrank a partner bought with a in many sessions (lift, c_ab / c_b, gives that
    single co-occurrence the highest possible score). A session is (user_id, session_id): session ids are
    only unique per user. `shrink` is added to item kNN's denominator, c_ab / (sqrt(c_a * c_b) + shrink)
    (Koren's shrinkage, as the item-kNN baseline tuned on validation takes it): a pair seen in two
    sessions of two rare items no longer ties with one seen in two hundred. Returns (knn, cobuy,
    sessions cut to their last MAX_SESSION_ITEMS items)."""
    session = ["kind", "user_id", "session_id"]
    kinds = F.array(F.lit(KNN), F.when(F.col("event_type") == "purchase", F.lit(COBUY)))
    basket = (events.withColumn("kind", F.explode(kinds)).filter(F.col("kind").isNotNull())
              .groupBy(*session, "product_id").agg(F.max("timestamp").alias("last_s"))
              .withColumn("nth", F.row_number().over(W.partitionBy(*session).orderBy(F.desc("last_s"), "product_id")))
              .persist(StorageLevel.MEMORY_AND_DISK))
    try:
        capped = basket.filter(F.col("nth") == MAX_SESSION_ITEMS + 1).count()
        kept = basket.filter(F.col("nth") <= MAX_SESSION_ITEMS)
        # Items as dense integers in id order (ties below still break by id): the pairs' shuffle and
        # aggregation on integer keys take 40 % less time than on the ids' strings
        ids = kept.select("product_id").distinct().withColumn("item", F.row_number().over(W.orderBy("product_id")) - 1)
        names = ids.orderBy("item").toArrow().column("product_id").to_pylist()
        kept = kept.join(F.broadcast(ids), "product_id").select(*session, "item").persist(StorageLevel.MEMORY_AND_DISK)
        sessions = kept.groupBy("kind", "item").agg(F.count(F.lit(1)).alias("c"))
        pairs = (kept.join(kept.withColumnRenamed("item", "neighbour"), session)
                 .filter(F.col("item") != F.col("neighbour"))
                 .groupBy("kind", "item", "neighbour").agg(F.count(F.lit(1)).alias("c_ab"))
                 .join(F.broadcast(sessions.withColumnRenamed("c", "c_a")), ["kind", "item"])
                 .join(F.broadcast(sessions.withColumnsRenamed({"item": "neighbour", "c": "c_b"})), ["kind", "neighbour"])
                 .withColumn("score", F.col("c_ab") / (F.sqrt(F.col("c_a").cast("double") * F.col("c_b"))
                                                       + F.when(F.col("kind") == KNN, F.lit(float(shrink)))
                                                       .otherwise(F.lit(0.0)))))
        best = W.partitionBy("kind", "item").orderBy(F.desc("score"), F.desc("c_ab"), "neighbour")
        top = (pairs.withColumn("nth", F.row_number().over(best)).filter(F.col("nth") <= top_n)
               .select("kind", "item", "nth", "neighbour", "score").toArrow()
               .sort_by([("kind", "ascending"), ("item", "ascending"), ("nth", "ascending")]))
        kept.unpersist()
    finally:
        basket.unpersist()
    found: tuple[Neighbours, Neighbours] = ({}, {})
    for k, item, neighbour, score in zip(*(top.column(c).to_pylist() for c in ("kind", "item", "neighbour", "score"))):
        found[k].setdefault(names[item], []).append((names[neighbour], score))
    return found[KNN], found[COBUY], capped


def _aggregates(events: DataFrame, window: Window, s: Settings, warnings: list[str]) -> dict:
    """item_category, category_affinity, item_popularity, user_median_price; data oddities into warnings.
    The four tables come back in one job as rows (what, key, sub, value): one stage schedule, not five."""
    most = W.partitionBy("product_id").orderBy(F.desc("n"), "category")
    item_category = (events.filter(F.col("category").isNotNull())
                     .groupBy("product_id", "category").agg(F.count(F.lit(1)).alias("n"))
                     .withColumn("nth", F.row_number().over(most)).filter(F.col("nth") == 1)
                     .select("product_id", F.col("category").alias("item_category")))
    # An event without a category takes its item's usual one (from the item's other events).
    affinity = (events.join(item_category, "product_id", "left")
                .withColumn("cat", F.coalesce("category", "item_category")).filter(F.col("cat").isNotNull())
                .groupBy("user_id", "cat").agg(F.sum("weight").alias("w"))
                .withColumn("a", F.col("w") / F.sqrt(F.sum(F.col("w") * F.col("w")).over(W.partitionBy("user_id")))))
    none = F.lit(None).cast("string")
    parts = [
        item_category.select(F.lit("category"), "product_id", "item_category", F.lit(None).cast("double")),
        affinity.select(F.lit("affinity"), "user_id", "cat", "a"),
        (events.groupBy("product_id").agg(F.sum("weight").alias("w"))
         .select(F.lit("popularity"), "product_id", none, "w")),
        (events.filter((F.col("event_type") == "purchase") & F.col("price").isNotNull())
         .groupBy("user_id").agg(F.median("price").alias("p")).select(F.lit("price"), "user_id", none, "p")),
        (events.groupBy("user_id").agg(F.count(F.lit(1)).alias("n")).filter(F.col("n") == 1)
         .agg(F.count(F.lit(1)).cast("double").alias("n")).select(F.lit("single"), none, none, "n")),
    ]
    names = ["what", "key", "sub", "value"]
    union = parts[0].toDF(*names)
    for part in parts[1:]:
        union = union.unionByName(part.toDF(*names))
    table = union.toArrow()
    out: dict = {"item_category": {}, "category_affinity": {}, "item_popularity": {}, "user_median_price": {}}
    single = 0
    for what, key, sub, value in zip(*(table.column(c).to_pylist() for c in names)):
        if what == "category":
            out["item_category"][key] = sub
        elif what == "affinity":
            out["category_affinity"].setdefault(key, {})[sub] = value
        elif what == "popularity":
            out["item_popularity"][key] = value
        elif what == "price":
            out["user_median_price"][key] = value
        else:
            single = int(value)
    if window.items > len(out["item_category"]):
        warnings.append(f"{window.items - len(out['item_category']):,} of {window.items:,} items have no category "
                        f"in any event: no item_category for them, and their events add to no category affinity")
    if single:
        warnings.append(f"{single:,} of {window.users:,} users have a single event in the window: kept, "
                        f"but their embeddings rest on one interaction")
    if window.purchases and not out["user_median_price"]:
        warnings.append("no purchase carries a price: user_median_price is empty")
    return out


# -- command line ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batch.job", description=__doc__.splitlines()[0])
    parser.add_argument("--events", required=True,
                        help="Parquet file or folder, e.g. the archive: .local/archive/clickstream")
    parser.add_argument("--out", required=True, type=Path, help="folder for BatchOutputs (created)")
    parser.add_argument("--end-s", type=float, default=None, help="window end (Unix s); default: the newest event")
    args = parser.parse_args(argv)
    if "://" not in args.events and not Path(args.events).exists():  # before paying for a JVM
        print(f"batch job: {args.events}: no such file or folder", file=sys.stderr)
        return 2
    s = load()
    spark = session(s)
    try:
        outputs = build(spark, load_events(spark, args.events), s, args.end_s)
    except TrainingDataError as exc:
        print(f"batch job: {exc}", file=sys.stderr)
        return 2
    finally:
        spark.stop()
    outputs.save(args.out)
    print(f"batch job: wrote {args.out} in {outputs.metrics['total_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
