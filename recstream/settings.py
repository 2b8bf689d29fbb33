"""The one typed settings object, read once from RECSTREAM_* environment variables."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

PREFIX = "RECSTREAM_"
INDEX_KINDS = ("auto", "flat", "flat16", "ivf", "ivfpq", "hnsw")   # models/index.py KINDS


def _setting(default: Any, doc: str, secret: bool = False) -> Any:
    """A field; a secret one is left out of the object's repr (tracebacks, test failures, logs)."""
    return field(default=default, metadata={"doc": doc, "secret": secret}, repr=not secret)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every field is read from RECSTREAM_<FIELD_NAME_IN_CAPITALS>; units are in the names."""

    # -- where things run --------------------------------------------------------------------
    home_dir: Path = _setting(Path(".local"), "folder for service data, jars, logs and pid files (path; relative to the working directory)")
    kafka_bootstrap: str = _setting("127.0.0.1:9092", "Kafka bootstrap servers (host:port[,host:port])")
    kafka_controller_port: int = _setting(9093, "KRaft controller listener of the local broker (TCP port)")
    kafka_heap_mb: int = _setting(768, "JVM heap of the local Kafka broker (MiB)")
    redis_url: str = _setting("redis://127.0.0.1:6379/0", "Redis URL for online features (redis://host:port/db)")
    redis_namespace: str = _setting("", "prefix of every Redis key, so deployments can share one Redis (text; no '{' or '}')")
    redis_cluster: bool = _setting(False, "redis_url names a node of a Redis Cluster: the feature store writes and "
                                          "reads slot by slot (true/false; see README \"Redis Cluster\")")
    redis_cluster_ports: str = _setting("7001,7002,7003", "loopback ports of the local Redis Cluster's masters that "
                                                          "`recstream services cluster-up` starts (TCP ports, comma-separated)")
    mlflow_tracking_uri: str = _setting("http://127.0.0.1:5000", "MLflow tracking/registry server (URL)")
    # -- topics ------------------------------------------------------------------------------
    topic_prefix: str = _setting("recs", "prefix of every recstream topic name (dotted lowercase)")
    clickstream_partitions: int = _setting(8, "partitions of the clickstream topic, keyed by user_id (count)")
    request_partitions: int = _setting(4, "partitions of the recommendation request/reply topics (count)")
    replication_factor: int = _setting(1, "replication factor of topics the project creates (count; 3 in production)")
    clickstream_retention_h: int = _setting(24 * 7, "clickstream topic retention (hours; personal data: README "
                                                    "\"Personal data\")")
    # -- producers ---------------------------------------------------------------------------
    produce_timeout_ms: int = _setting(5000, "longest wait for Kafka to acknowledge a produced record (milliseconds)")
    producer_linger_ms: int = _setting(5, "producer batching delay (milliseconds)")
    background_fetch_min_bytes: int = _setting(256 * 1024, "the archive and attribution consumers' fetches wait at the "
                                                          "broker for this much data, or half a second: a few large "
                                                          "fetches a second instead of hundreds of small ones, for "
                                                          "consumers whose lag delays no answer (bytes; 1: at once)")
    # -- app ---------------------------------------------------------------------------------
    app_id: str = _setting("recstream", "Faust application id: consumer group and changelog prefix (name)")
    table_store: str = _setting("rocksdb://", "Faust table store URL: rocksdb:// (durable) or memory:// (name)")
    table_write_buffer_mb: int = _setting(8, "RocksDB memtable size of each session-table partition; 2 per partition "
                                             "at most (MiB; Faust's default, 64 x 3, let a worker grow by GBs)")
    table_block_cache_mb: int = _setting(32, "RocksDB block cache of each session-table partition (MiB; Faust's default: 2048)")
    table_standby_replicas: int = _setting(0, "other feature-worker processes that keep a warm copy of each session-table "
                                              "partition from its changelog; off by default: with 1, a standby promoted in a "
                                              "rebalance served stale sessions in 3 of 9 runs of test_rebalance.py, with 0 in "
                                              "none of 5 (count; 0: a partition's new owner restores it from the changelog first)")
    session_idle_timeout_s: int = _setting(30 * 60, "a session ends after this much inactivity (seconds)")
    # -- HTTP ingest -------------------------------------------------------------------------
    http_max_batch_events: int = _setting(500, "most events in one POST /api/v1/events; more is answered 413 (count)")
    http_max_body_bytes: int = _setting(1024 * 1024, "largest POST body accepted; more is answered 413 (bytes)")
    http_keepalive_s: int = _setting(75, "the API closes an idle keep-alive connection after this long; longer than the "
                                         "idle timeout of clients and load balancers (httpx 5, ALB 60), so a request "
                                         "never races the server closing its connection (seconds; uvicorn's default: 5)")
    # -- real-time features ------------------------------------------------------------------
    weight_view: float = _setting(1.0, "implicit-feedback weight of a view (weight)")
    weight_click: float = _setting(2.0, "weight of a click: more intent than a view, less than a cart (weight)")
    weight_add_to_cart: float = _setting(3.0, "weight of an add_to_cart (weight)")
    weight_purchase: float = _setting(5.0, "weight of a purchase (weight)")
    session_recent_max: int = _setting(20, "products kept in user_session:{id}, newest first (count)")
    covisit_window: int = _setting(5, "a view pairs with this many previous session views for 'also viewed' (count)")
    cooccurrence_max_per_item: int = _setting(100, "neighbours kept per item in covis:/cobuy: sets (count)")
    user_features_ttl_s: int = _setting(30 * 86400, "expiry of user_features:{id} after the last event (seconds)")
    popularity_window_days: int = _setting(7, "popularity counts cover this many UTC days (days)")
    trending_half_life_s: int = _setting(6 * 3600, "trending scores halve after this long (seconds)")
    feature_batch_max: int = _setting(4000, "events the feature agent takes per batch (count)")
    worker_stall_timeout_s: float = _setting(120.0, "a worker whose committed offsets stop while it keeps "
                                                    "processing exits (status 3) for its supervisor to restart (seconds)")
    feature_batch_within_ms: int = _setting(20, "longest wait to fill a batch while the agent keeps up (milliseconds)")
    feature_batch_within_max_ms: int = _setting(1000, "... while it is behind: the wait grows to half of how far "
                                                      "behind its last batch was, up to this (milliseconds)")
    # -- batch layer -------------------------------------------------------------------------
    spark_master: str = _setting("local[*]", "Spark master URL: local[*] here, spark://host:7077 or yarn on a cluster (URL)")
    spark_driver_memory: str = _setting("4g", "Spark driver memory (JVM size, e.g. 4g)")
    spark_master_port: int = _setting(7077, "`recstream spark up`: the standalone master's port on loopback (TCP port)")
    spark_master_webui_port: int = _setting(8080, "... its web UI, whose /json/ lists workers and applications (TCP port)")
    spark_worker_webui_port: int = _setting(8081, "... the worker's web UI (TCP port)")
    spark_worker_cores: int = _setting(2, "... cores the worker offers its executors (count)")
    spark_worker_memory: str = _setting("2g", "... memory the worker offers; one executor takes it all (JVM size, e.g. 2g)")
    train_window_days: int = _setting(30, "history a training run reads, back from its newest event (days)")
    trainer_every_hours: float = _setting(4.0, "`recstream trainer` retrains this often (hours)")
    als_rank: int = _setting(128, "dimension of the ALS user and item embeddings (count)")
    als_iterations: int = _setting(10, "ALS sweeps (count)")
    als_reg: float = _setting(0.1, "ALS L2 regularisation, Spark's regParam (weight)")
    als_alpha: float = _setting(10.0, "implicit-feedback confidence = 1 + alpha * summed event weights (weight)")
    index_kind: str = _setting("auto", "the trained retrieval index: auto (exact below 5k items, else IVF tuned for "
                                       "recall@200 0.95), ivfpq (IVF-PQ codes, 42 bytes an item instead of 512 on the GPU, "
                                       "re-ranked from a float16 copy in host memory), ivf, flat, flat16 or hnsw (name)")
    cooccurrence_top_n: int = _setting(50, "neighbours kept per item by the batch co-occurrence (count)")
    knn_per_anchor: int = _setting(20, "item-kNN neighbours the candidate stage reads per anchor item, at most "
                                       "cooccurrence_top_n (count)")
    knn_shrink: float = _setting(0.0, "item kNN's shrinkage: similarity c_ab / (sqrt(c_a c_b) + shrink), so pairs "
                                      "seen in few sessions count less (sessions)")
    ranker_trees: int = _setting(200, "XGBoost boosting rounds of the ranker (count)")
    ranker_depth: int = _setting(8, "XGBoost max tree depth of the ranker (count)")
    ranker_negatives: int = _setting(0, "negatives per training group the ranker keeps, drawn at random (seeded) beside "
                                        "every positive; the held-out groups keep all (count; 0: every candidate)")
    ranker_target_sample: float = _setting(1.0, "share of interactions the ranker trains on, chosen by event id (fraction)")
    ranker_label_horizon_s: float = _setting(86_400.0, "the ranker's positives: every item the shopper engaged with "
                                                       "within this long after the request, graded (seconds; 0: the next event only)")
    ranker_target_share: float = _setting(0.2, "the ranker learns from the window's latest events (this share), with ALS "
                                               "vectors trained on the events before them, as serving meets the future (fraction)")
    retrieval_candidates: int = _setting(200, "candidates retrieval hands to ranking (count)")
    task_orderings: str = _setting("", "pin a task's ordering over the trainer's choice, empty: the trainer chooses "
                                   "each on its held-out targets (TASK=ORDERING list, e.g. next=rules,cart=popular; "
                                   "tasks home, next, cart; orderings popular, als, rules, fusion, ranker)")
    fusion_weights: str = _setting("", "reciprocal rank fusion's weight per candidate source, where a task is served "
                                       "by the fusion ordering (SOURCE=WEIGHT list, e.g. als=1,knn=1: a source not "
                                       "named weighs 0; empty: every source 1)")
    retrieval_shards: int = _setting(1, "the catalogue's index is split by item into this many shards: the trainer "
                                        "builds one index a shard, one retrieval group serves each, ranking merges "
                                        "their top k (count; 1: one index)")
    retrieval_shard: int = _setting(0, "the shard a retrieval worker serves, 0 to RETRIEVAL_SHARDS - 1 (index)")
    retrieval_gather_ms: float = _setting(10.0, "ranking waits this long after a request's first shard answer for "
                                                "the others, then ranks what came (milliseconds)")
    promotion_margin: float = _setting(0.02, "a new model becomes champion unless its offline metric is worse "
                                            "than the champion's by more than this fraction (fraction)")
    model_name: str = _setting("recstream", "registered model name in MLflow (name)")
    # -- online serving ----------------------------------------------------------------------
    serving_deadline_ms: int = _setting(40, "the API answers from the agents within this, else with the fallback (milliseconds)")
    retrieval_batch_window_ms: float = _setting(2.0, "requests arriving within this window are searched as one FAISS batch (milliseconds)")
    serving_reserve_ms: float = _setting(5.0, "the ranking agent drops a request with less than this left of its deadline, "
                                              "retrieval with less than twice this: it could not be answered in time, "
                                              "and under overload the time goes to requests that can (milliseconds)")
    serving_batch_max: int = _setting(64, "most requests a serving agent takes per batch (count)")
    serving_threads: int = _setting(1, "threads FAISS and XGBoost use per serving agent (count)")
    serving_shed_loop_lag_ms: float = _setting(100.0, "while the API's event loop stays this late (every firing "
                                                      "of its timer over the last 0.5 s), recommendation "
                                                      "requests are answered from the fallback at once (flagged, "
                                                      "error 'overloaded'), without Kafka or Redis, so the loop "
                                                      "catches up (milliseconds; 0: never)")
    serving_shed_feature_lag_s: float = _setting(5.0, "while the real-time feature consumer's committed lag (the "
                                                      "API samples it every lag_sample_s) is this far behind, "
                                                      "recommendation requests are answered from the fallback at once "
                                                      "(flagged, error 'overloaded'): freshness first, the serving "
                                                      "path gives the host's CPU to the features before they pass "
                                                      "alert_lag_s (seconds; 0: never)")
    serving_nice: int = _setting(5, "the retrieval and ranking workers run this much below the normal CPU priority "
                                    "(nice), so on a host they share, an overload of requests falls back (flagged) "
                                    "before the real-time features and the API's ingest fall behind (0..19; 0: equal)")
    background_nice: int = _setting(5, "... the archive and attribution workers too: their lag delays a training run or "
                                       "an A/B count, never an answer, so they yield to the features (0..19; 0: equal)")
    homepage_cache_ttl_s: int = _setting(300, "homepage replies are reused for a user this long unless their session moves (seconds)")
    fallback_refresh_s: float = _setting(5.0, "the API refreshes its in-memory trending fallback this often (seconds)")
    item_cache_ttl_s: float = _setting(60.0, "the ranking agent keeps item fields (not stock) in memory this long (seconds)")
    item_stats_ttl_s: float = _setting(60.0, "... and items' popularity and trending counts this long (seconds)")
    max_per_category: int = _setting(3, "diversity: at most this many items of one category in a reply (count; 0 = no cap)")
    exclude_purchased: bool = _setting(True, "never recommend what the user recently bought (true/false)")
    widget_tiers: bool = _setting(True, "each widget's promise first: co-viewed items on also viewed, co-purchased on "
                                  "the cart, the product's category on similar (true/false)")
    model_retry_s: float = _setting(30.0, "an agent without a model retries loading one this often (seconds)")
    # -- A/B experiments ---------------------------------------------------------------------
    experiments_file: Path = _setting(Path(".local/experiments.toml"), "the experiments file (TOML, see README "
                                      "\"A/B testing\"); absent: no experiments (path)")
    experiments_reload_s: float = _setting(2.0, "API processes re-read the experiments file when it changed, this often (seconds)")
    admin_token: str = _setting("", "bearer token of the admin API (/api/v1/admin/...); empty: the admin API is off (secret)",
                                secret=True)
    attribution_window_s: int = _setting(1800, "an event without rec_request_id is attributed to the user's latest "
                                               "exposure listing its product within this long before it (seconds)")
    attribution_ttl_s: int = _setting(7 * 86400, "an exposure can be cited by rec_request_id for this long (seconds)")
    exposures_retention_h: int = _setting(24 * 30, "exposures topic retention (hours; it holds user ids: "
                                                   "personal data, README \"Personal data\")")
    # -- operations: metrics, on-call dashboard, alerts --------------------------------------
    metrics_port: int = _setting(0, "workers serve Prometheus /metrics on this port (TCP port; 0 = off; "
                                    "the API serves /metrics on its own port)")
    ops_sample_s: float = _setting(2.0, "the API samples its latency, fallbacks and the workers' metrics "
                                        "for the dashboard this often (seconds)")
    lag_sample_s: float = _setting(2.0, "the API samples consumer lag (records and seconds) this often (seconds)")
    ops_history_s: int = _setting(900, "history the dashboard's charts keep in the API process (seconds)")
    alert_lag_s: float = _setting(10.0, "alert when the real-time feature consumer is this far behind (seconds)")
    alert_p99_ms: float = _setting(50.0, "alert when serving p99 over the last minute passes this (milliseconds)")
    # -- archive -----------------------------------------------------------------------------
    archive_flush_records: int = _setting(20000, "the archive writes a Parquet file after this many records (count)")
    archive_flush_interval_s: float = _setting(10.0, "... or after this long, whichever comes first (seconds)")
    archive_retention_days: int = _setting(0, "the archive worker drops date partitions (dt=...) older than this, "
                                              "once an hour; set it to the shop's retention policy, e.g. 90 (days; "
                                              "0: kept for ever)")
    erasure_cpu_share: float = _setting(0.25, "an erasure's background work, its passes over the Redis keyspace and "
                                              "the archive's rewrite, keeps Redis and its own process busy at most "
                                              "this share of the time (it pauses between SCAN calls and files; the "
                                              "rewrite at the lowest CPU priority), so serving beside it keeps its "
                                              "latency (fraction; 1: no pause)")
    # -- privacy (README "Personal data") -----------------------------------------------------
    user_id_key: str = _setting("", "key of the keyed hash (blake2b) that replaces every user id at the edge: the "
                                    "HTTP API, replay and `recstream erase`; empty: ids are stored as sent. Never "
                                    "change it on a running deployment (every shopper would become new) (secret)",
                                secret=True)

    @property
    def archive_dir(self) -> Path:
        return self.home_dir / "archive"

    @property
    def event_weights(self) -> dict[str, float]:
        return {"view": self.weight_view, "click": self.weight_click,
                "add_to_cart": self.weight_add_to_cart, "purchase": self.weight_purchase}

    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])

    @property
    def redis_port(self) -> int:
        return int(self.redis_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])

    @property
    def redis_cluster_port_list(self) -> list[int]:
        return [int(p) for p in self.redis_cluster_ports.split(",") if p.strip()]

    @property
    def mlflow_port(self) -> int:
        return int(self.mlflow_tracking_uri.rstrip("/").rsplit(":", 1)[1])

    @property
    def ordering_pins(self) -> dict[str, str]:
        """task_orderings as task -> ordering (recstream.ordering.parse_pins)."""
        from recstream.ordering import parse_pins

        return parse_pins(self.task_orderings)

    @property
    def fusion_weight_vector(self) -> np.ndarray | None:
        """fusion_weights per column of schemas.recommendations.SOURCES (recstream.ordering.parse_weights)."""
        from recstream.ordering import parse_weights
        from schemas.recommendations import SOURCES

        return parse_weights(self.fusion_weights, SOURCES)

    def niceness(self, worker: str) -> int:
        """How far below the normal CPU priority `recstream worker <worker>` runs (README "Freshness first"):
        the feature worker and the API, which take the events in, at the normal one."""
        return {"retrieval": self.serving_nice, "ranking": self.serving_nice,
                "archive": self.background_nice, "attribution": self.background_nice}.get(worker, 0)

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"

    def retrieval_agents(self) -> list[str]:
        """Names of the retrieval consumer groups (less the app id): one per index shard."""
        n = self.retrieval_shards
        return ["retrieval"] if n == 1 else [f"retrieval-{i}-of-{n}" for i in range(n)]

    def consumer_groups(self) -> list[tuple[str, str]]:
        """(group, topic) of every consumer group of the app, for lag."""
        a, click = self.app_id, self.topic("clickstream")
        return [(a, click), (f"{a}-archive", click),
                *((f"{a}-{name}", self.topic("rec.requests")) for name in self.retrieval_agents()),
                (f"{a}-ranking", self.topic("rec.candidates")), (f"{a}-attribution", self.topic("exposures")),
                (f"{a}-attribution", click)]


class SettingsError(ValueError):
    pass


def _coerce(name: str, kind: type, raw: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError("expected true/false")
        return kind(raw)
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}{name.upper()}={raw!r}: {exc}") from None


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment; an unknown RECSTREAM_* variable is an error (typos)."""
    environ = os.environ if environ is None else environ
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    types = {"Path": Path, "str": str, "int": int, "float": float, "bool": bool}
    values: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):].lower()
        if name not in fields:
            raise SettingsError(f"unknown setting {key}; known: {', '.join(PREFIX + n.upper() for n in fields)}")
        values[name] = _coerce(name, types[str(fields[name].type)], raw)
    settings = Settings(**values)
    for name in ("clickstream_partitions", "request_partitions", "replication_factor", "produce_timeout_ms",
                 "retrieval_shards", "background_fetch_min_bytes"):
        if getattr(settings, name) < 1:
            raise SettingsError(f"{PREFIX}{name.upper()} must be at least 1")
    for name in ("serving_shed_loop_lag_ms", "serving_shed_feature_lag_s"):
        if getattr(settings, name) < 0:
            raise SettingsError(f"{PREFIX}{name.upper()} must be 0 (never) or more")
    if not 1 <= settings.feature_batch_within_ms <= settings.feature_batch_within_max_ms:
        raise SettingsError(f"{PREFIX}FEATURE_BATCH_WITHIN_MS is {settings.feature_batch_within_ms} and "
                            f"{PREFIX}FEATURE_BATCH_WITHIN_MAX_MS {settings.feature_batch_within_max_ms}; "
                            "the first must be at least 1 and at most the second")
    if settings.ranker_negatives < 0:
        raise SettingsError(f"{PREFIX}RANKER_NEGATIVES is {settings.ranker_negatives}; it must be 0 (every candidate) or more")
    for name in ("serving_nice", "background_nice"):
        if not 0 <= getattr(settings, name) <= 19:
            raise SettingsError(f"{PREFIX}{name.upper()} is {getattr(settings, name)}; it must be 0 to 19 (a niceness)")
    if not 0 < settings.erasure_cpu_share <= 1:
        raise SettingsError(f"{PREFIX}ERASURE_CPU_SHARE is {settings.erasure_cpu_share}; it must be over 0 and at most 1")
    if "{" in settings.redis_namespace or "}" in settings.redis_namespace:   # it would move the keys' hash tags
        raise SettingsError(f"{PREFIX}REDIS_NAMESPACE must not contain '{{' or '}}'")
    if not 0 <= settings.retrieval_shard < settings.retrieval_shards:
        raise SettingsError(f"{PREFIX}RETRIEVAL_SHARD is {settings.retrieval_shard}; with {PREFIX}RETRIEVAL_SHARDS="
                            f"{settings.retrieval_shards} it must be 0 to {settings.retrieval_shards - 1}")
    try:
        _ = settings.ordering_pins   # parsed here, so a bad pin fails at start-up
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}TASK_ORDERINGS={settings.task_orderings!r}: {exc}") from None
    try:
        _ = settings.fusion_weight_vector
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}FUSION_WEIGHTS={settings.fusion_weights!r}: {exc}") from None
    if settings.index_kind not in INDEX_KINDS:
        raise SettingsError(f"{PREFIX}INDEX_KIND is {settings.index_kind!r}; one of: {', '.join(INDEX_KINDS)}")
    return settings


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, documentation) for every setting, for `recstream settings`."""
    return [(PREFIX + f.name.upper(), str(f.default), f.metadata["doc"]) for f in dataclasses.fields(Settings)]
