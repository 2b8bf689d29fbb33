"""Benchmark: the training pipeline (batch/train.py), Spark ALS against the `implicit` library, and the
Spark job on a large generated shop.

Run from the repository root, with Redis and MLflow up (`recstream services up`):

    .venv/bin/python bench/training.py                       # the run: bench/results/training.json
    .venv/bin/python bench/training.py --shop-users 20000    # a smaller generated shop

Each phase runs in its own Python process (`bench/training.py --phase NAME`), so each gets a fresh
Spark JVM and its own peak RSS. A sampler thread in the phase reads /proc every 0.5 s: the RSS of the
phase's Python process and of its `java` descendants (the Spark driver JVM that pyspark starts),
attributed to the stage running at that moment. JVM start (the first SparkSession) is timed apart.

1. taobao: one whole training run, `batch.train.train_once` on the Taobao UserBehavior head with
   the settings of `recstream.settings.load()` except model_name bench-<id>, redis_namespace
   bench<id>:, train_window_days 90 (35 rows go back to 2017-09-11) and --ranker-trees (50: with the
   default 200 trees the ranker stage took 316 s in a trial run, over the 4-minute limit). Wall time and
   peak RSS per stage (TrainReport.stage_s; the sampler), TrainReport.peak_rss_mb, the metrics. Its
   Redis keys and its registered MLflow model (and the model's runs) are deleted afterwards.
2. als: Spark ALS and implicit ALS on one matrix. Time split: the test period is the last day of the
   data (newest event - 86,400 s, on); the training matrix is every event before it,
   r(user, item) = summed event weights (settings: view 1, click 2, cart 3, purchase 5; Taobao fav ->
   click), confidence 1 + alpha * r, rank, reg and alpha from the settings, 10 iterations.
   Spark: pyspark.ml ALS (implicitPrefs, the blocks and seed of batch/job.py) on a Parquet of
   (user_idx, item_idx, r), input cached and counted first; fits with maxIter 2 and 10; seconds per
   iteration = (t10 - t2) / 8 (JVM start, JIT warm-up and per-fit setup fall into the constant).
   Spark's event log (enabled for this phase only) splits each fit, and the difference per
   iteration, into task CPU, GC, shuffle, deserialisation and time with no stage running.
   implicit: implicit.cpu.als (CPU), BLAS limited to 1 thread (threadpoolctl), num_threads 2,
   seconds per iteration from its fit callback; its default conjugate-gradient solver, and the exact
   Cholesky solver (use_cg=False) that solves the same normal equations Spark does.
   Quality: users with a training row; targets = the items they carted or bought in the test
   period, less items they touched in training, less items absent from training (no model can
   score them); also the variant with every test interaction as a target. Scores over all training
   items, the user's training items removed. recall@20 = hits / |targets|; NDCG@20 binary, ideal
   DCG over min(|targets|, 20). TopPop (training interactions per item) under the same protocol.
3. shop: the Spark job alone (`batch.job.build`) on a generated shop of --shop-users users and
   --shop-products products (recstream.data.shop; about 71 events per user), rank --shop-rank.
4. FAISS: the taobao run's faiss_recall_at_200 (index kind chosen by the trainer); the 1M-item
   figures are cited from bench/results/retrieval_index.json (bench/retrieval_index.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench import harness  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "training.json"
INDEX_RESULTS = ROOT / "bench" / "results" / "retrieval_index.json"
TAOBAO = ROOT.parent / "shared" / "data" / "taobao-userbehavior-head" / "UserBehavior_head.csv"
DAY_S = 86_400
K = 20
POLL_S = 0.5


# -- memory sampling -------------------------------------------------------------------------------

def _rss_mb(pid: int | str) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB; (0, 0) when it is gone."""
    rss = hwm = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, hwm


def _java_descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    comm: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        pid = int(d.name)
        comm[pid] = name
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            todo.append(c)
            if comm.get(c) == "java":
                found.append(c)
    return found


class Sampler(threading.Thread):
    """Peak RSS of this process and of its java descendants, per label (the stage running), every 0.5 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.label = "start"
        self.python: dict[str, float] = {}
        self.java: dict[str, float] = {}
        self.java_hwm = 0.0
        self._halt = threading.Event()

    def sample(self) -> None:
        label = self.label
        rss, _ = _rss_mb(os.getpid())
        self.python[label] = max(self.python.get(label, 0.0), rss)
        java = 0.0
        for pid in _java_descendants(os.getpid()):
            r, hwm = _rss_mb(pid)
            java += r
            self.java_hwm = max(self.java_hwm, hwm)
        if java:
            self.java[label] = max(self.java.get(label, 0.0), java)

    def run(self) -> None:
        while not self._halt.wait(POLL_S):
            self.sample()

    def stop(self) -> dict:
        self.sample()
        self._halt.set()
        self.join()
        return {"python_peak_rss_mb_by_stage": self.python, "java_peak_rss_mb_by_stage": self.java,
                "java_peak_rss_mb": max(self.java.values(), default=0.0), "java_vmhwm_mb": self.java_hwm,
                "python_vmhwm_mb": _rss_mb(os.getpid())[1]}


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# -- phase 1: one whole training run on Taobao ------------------------------------------------------

def phase_taobao(args: argparse.Namespace) -> dict:
    from batch.train import Source, train_once
    from recstream.settings import load

    tag = uuid.uuid4().hex[:8]
    s = dataclasses.replace(load(), model_name=f"bench-{tag}", redis_namespace=f"bench{tag}:",
                            train_window_days=90, ranker_trees=args.ranker_trees)
    sampler = Sampler()
    sampler.start()

    def progress(msg: str) -> None:
        if msg.startswith("[train] ") and msg.endswith(" ..."):
            sampler.label = msg[len("[train] "):-len(" ...")]
        elif msg.startswith("[train] ") and " done in " in msg:
            sampler.label = "between stages"
        log(msg)

    out: dict = {"model_name": s.model_name, "redis_namespace": s.redis_namespace,
                 "settings": {"als_rank": s.als_rank, "als_iterations": s.als_iterations, "als_reg": s.als_reg,
                              "als_alpha": s.als_alpha, "train_window_days": s.train_window_days,
                              "ranker_trees": s.ranker_trees, "ranker_depth": s.ranker_depth,
                              "spark_master": s.spark_master, "spark_driver_memory": s.spark_driver_memory}}
    t = time.perf_counter()
    try:
        report = train_once(s, Source(dataset="taobao", path=args.taobao), progress=progress)
        out["total_train_s"] = time.perf_counter() - t
        mem = sampler.stop()
        out.update({"version": report.version, "alias": report.alias, "promotion": report.promotion,
                    "stage_s": report.stage_s, "sum_stage_s": sum(report.stage_s.values()),
                    "peak_rss_mb": report.peak_rss_mb, "metrics": report.metrics, "window": report.window,
                    "warnings": report.warnings, "published_keys": report.published_keys, **mem})
    finally:
        if sampler.is_alive():
            sampler.stop()
        out["cleanup"] = cleanup(s)
    return out


def delete_model(s) -> dict:
    """Delete the run's registered model and the MLflow runs behind it; what was deleted (or the error)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        ml = MlflowClient(s.mlflow_tracking_uri)
        runs = {mv.run_id for mv in ml.search_model_versions(f"name='{s.model_name}'")}
        ml.delete_registered_model(s.model_name)
        for run_id in runs:
            ml.delete_run(run_id)
        return {"mlflow_model_deleted": s.model_name, "mlflow_runs_deleted": len(runs)}
    except MlflowException as exc:
        return {"mlflow_error": str(exc)[:300]}


def cleanup(s) -> dict:
    """Delete the run's Redis keys (its namespace) and its registered model with the runs behind it."""
    import redis

    done: dict = {}
    if not s.redis_namespace:   # the pattern would be "*": every key of every deployment in this Redis
        raise ValueError("cleanup needs a Redis namespace of the run's own (redis_namespace is empty)")
    client = redis.Redis.from_url(s.redis_url)
    n, batch = 0, []
    for key in client.scan_iter(f"{s.redis_namespace}*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            n += client.unlink(*batch)
            batch = []
    if batch:
        n += client.unlink(*batch)
    done["redis_keys_deleted"] = n
    done["redis_keys_left"] = sum(1 for _ in client.scan_iter(f"{s.redis_namespace}*", count=5000))
    client.close()
    done.update(delete_model(s))
    log(f"cleanup: {done}")
    return done


# -- phase 2: Spark ALS against implicit ALS on one matrix ----------------------------------------

def split(path: Path, weights: dict[str, float]) -> dict:
    """Training matrix (events before the last day) and test targets per user, as index arrays."""
    import scipy.sparse as sp

    from recstream.data import import_events

    data = import_events("taobao", path)
    seen_ids: set[str] = set()
    events = []
    for e in data.events:                      # de-duplicated by event_id, as the Spark job does
        if e.event_id not in seen_ids:
            seen_ids.add(e.event_id)
            events.append(e)
    end = max(e.timestamp for e in events)
    cut = end - DAY_S
    train = [e for e in events if e.timestamp < cut]
    test = [e for e in events if e.timestamp >= cut]
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    rows, cols, vals = [], [], []
    for e in train:
        rows.append(users.setdefault(e.user_id, len(users)))
        cols.append(items.setdefault(e.product_id, len(items)))
        vals.append(weights[e.event_type])
    r = sp.csr_matrix((np.array(vals, np.float32), (rows, cols)), shape=(len(users), len(items)))
    r.sum_duplicates()
    counts = np.bincount(np.array(cols), minlength=len(items)).astype(np.float64)  # TopPop: interactions per item
    targets: dict[str, dict[int, set[int]]] = {"cart_purchase": {}, "all": {}}
    dropped = {"cart_purchase": {"touched_in_training": 0, "unknown_item": 0},
               "all": {"touched_in_training": 0, "unknown_item": 0}}
    for e in test:
        u = users.get(e.user_id)
        if u is None:
            continue
        for variant in ("cart_purchase", "all"):
            if variant == "cart_purchase" and e.event_type not in ("add_to_cart", "purchase"):
                continue
            i = items.get(e.product_id)
            if i is None:
                dropped[variant]["unknown_item"] += 1
            elif r[u, i] > 0:
                dropped[variant]["touched_in_training"] += 1
            else:
                targets[variant].setdefault(u, set()).add(i)
    return {"r": r, "counts": counts, "targets": targets, "dropped": dropped,
            "info": {"events": len(events), "train_events": len(train), "test_events": len(test),
                     "cut_s": cut, "end_s": end, "users": len(users), "items": len(items), "nnz": int(r.nnz),
                     "test_users": {v: len(t) for v, t in targets.items()},
                     "test_targets": {v: sum(len(x) for x in t.values()) for v, t in targets.items()},
                     "test_targets_dropped": dropped}}


def quality(score_fn, r, targets: dict[int, set[int]], k: int = K) -> dict:
    """recall@k and NDCG@k over all items, the user's training items excluded; means over test users."""
    users = np.array(sorted(targets))
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    recall, ndcg = [], []
    for start in range(0, len(users), 256):
        batch = users[start:start + 256]
        scores = np.asarray(score_fn(batch), np.float64)
        seen = r[batch]
        scores[np.repeat(np.arange(len(batch)), np.diff(seen.indptr)), seen.indices] = -np.inf
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        for row, u in zip(top, batch):
            t = targets[u]
            hit = np.array([i in t for i in row], np.float64)
            recall.append(hit.sum() / len(t))
            ndcg.append(float((hit * discount).sum() / discount[:min(len(t), k)].sum()))
    return {f"recall_at_{k}": float(np.mean(recall)), f"ndcg_at_{k}": float(np.mean(ndcg)), "users": len(users)}


def evaluate_all(name: str, score_fn, m: dict) -> dict:
    return {variant: quality(score_fn, m["r"], t) for variant, t in m["targets"].items()}


def implicit_fit(r, s, use_cg: bool) -> tuple[dict, np.ndarray, np.ndarray]:
    import threadpoolctl
    from implicit.cpu.als import AlternatingLeastSquares

    c = r.copy()
    c.data = 1 + s.als_alpha * c.data
    per_iter: list[float] = []
    with threadpoolctl.threadpool_limits(1, "blas"):
        # implicit.cpu.als is the CPU class (what implicit.als.AlternatingLeastSquares(use_gpu=False) returns)
        als = AlternatingLeastSquares(factors=s.als_rank, iterations=s.als_iterations, regularization=s.als_reg,
                                      use_cg=use_cg, random_state=1, num_threads=2)
        t = time.perf_counter()
        als.fit(c, show_progress=False, callback=lambda it, elapsed, loss: per_iter.append(elapsed))
        fit_s = time.perf_counter() - t
    return ({"fit_s": fit_s, "s_per_iter": float(np.mean(per_iter)), "per_iter_s": per_iter,
             "solver": "conjugate gradient (3 steps, implicit's default)" if use_cg else "Cholesky (exact)"},
            np.asarray(als.user_factors, np.float32), np.asarray(als.item_factors, np.float32))


def spark_fit(r, s, work: Path, sampler: Sampler, eventlog: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark import StorageLevel
    from pyspark.ml.recommendation import ALS

    from batch.job import ALS_SEED
    from batch.spark import session

    coo = r.tocoo()
    path = work / "ratings.parquet"
    pq.write_table(pa.table({"user_idx": coo.row.astype(np.int32), "item_idx": coo.col.astype(np.int32),
                             "r": coo.data.astype(np.float64)}), path)
    sampler.label = "spark: JVM start"
    t = time.perf_counter()
    spark = session(s)
    out: dict = {"jvm_start_s": time.perf_counter() - t}
    try:
        sc = spark.sparkContext
        out["app_id"] = sc.applicationId
        blocks = max(1, sc.defaultParallelism)
        sampler.label = "spark: read + cache"
        t = time.perf_counter()
        df = spark.read.parquet(str(path)).persist(StorageLevel.MEMORY_AND_DISK)
        out["input_rows"] = df.count()
        out["read_cache_s"] = time.perf_counter() - t
        fits = {}
        model = None
        for iters in (2, s.als_iterations):
            sampler.label = f"spark: fit maxIter {iters}"
            sc.setJobGroup(f"fit{iters}", f"ALS fit, maxIter {iters}")
            als = ALS(rank=s.als_rank, maxIter=iters, regParam=s.als_reg, alpha=s.als_alpha, implicitPrefs=True,
                      userCol="user_idx", itemCol="item_idx", ratingCol="r", numUserBlocks=blocks,
                      numItemBlocks=blocks, coldStartStrategy="drop", seed=ALS_SEED)
            t = time.perf_counter()
            model = als.fit(df)
            fits[iters] = time.perf_counter() - t
            log(f"als: spark fit maxIter {iters}: {fits[iters]:.1f} s")
        sc.setJobGroup("collect", "factors to numpy")
        sampler.label = "spark: collect factors"
        users = _factors(model.userFactors, r.shape[0], s.als_rank)
        items = _factors(model.itemFactors, r.shape[1], s.als_rank)
        t2, t10 = fits[2], fits[s.als_iterations]
        out.update({"blocks": blocks, "fit_s_by_max_iter": {str(k): v for k, v in fits.items()},
                    "s_per_iter": (t10 - t2) / (s.als_iterations - 2),
                    "fixed_s": t2 - 2 * (t10 - t2) / (s.als_iterations - 2)})
        df.unpersist()
    finally:
        sampler.label = "spark: stop"
        spark.stop()
    # where the time goes: each fit's jobs from the event log, and per iteration (fit 10 - fit 2) / 8
    logs = {str(n): spark_eventlog(eventlog, f"fit{n}") for n in (2, s.als_iterations)}
    for n, e in logs.items():
        if "error" not in e:
            e["driver_outside_jobs_s"] = out["fit_s_by_max_iter"][n] - e["jobs_wall_s"]
    out["eventlog"] = logs
    a, b = logs["2"], logs[str(s.als_iterations)]
    if "error" not in a and "error" not in b:
        out["eventlog_per_iter"] = {k: (b[k] - a[k]) / (s.als_iterations - 2) for k in b
                                    if isinstance(b[k], (int, float)) and k != "median_stage_ms"}
    return out, users, items


def _factors(factors, n: int, rank: int) -> np.ndarray:
    table = factors.toArrow()
    ids = np.asarray(table.column("id").to_numpy(), np.int64)
    values = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    out = np.zeros((n, rank), np.float32)
    out[ids] = np.asarray(values, np.float32).reshape(len(ids), rank)
    return out


def spark_eventlog(folder: Path, group: str) -> dict:
    """Where one job group's time went, from Spark's event log: jobs, stages, tasks, task time split."""
    # Spark 4 writes a folder per application (eventlog_v2_<app>/events_<n>_<app>), older ones one file
    files = sorted((f for f in folder.rglob("*") if f.is_file() and f.name.startswith(("events_", "local-"))),
                   key=lambda f: (f.parent.name, int(f.name.split("_")[1]) if f.name.startswith("events_") else 0))
    if not files:
        return {"error": f"no event log in {folder}"}
    jobs: dict[int, dict] = {}
    stage_job: dict[int, int] = {}
    stages: dict[int, dict] = {}
    tasks = {"n": 0, "run_ms": 0.0, "cpu_ms": 0.0, "gc_ms": 0.0, "deser_ms": 0.0, "result_ser_ms": 0.0,
             "shuffle_write_ms": 0.0, "shuffle_fetch_wait_ms": 0.0, "shuffle_write_bytes": 0, "shuffle_read_bytes": 0,
             "task_wall_ms": 0.0}
    for line in (line for f in files for line in f.read_text().splitlines()):
        ev = json.loads(line)
        kind = ev.get("Event")
        if kind == "SparkListenerJobStart":
            if (ev.get("Properties") or {}).get("spark.jobGroup.id") == group:
                jobs[ev["Job ID"]] = {"start": ev["Submission Time"]}
                for sid in ev["Stage IDs"]:
                    stage_job[sid] = ev["Job ID"]
        elif kind == "SparkListenerJobEnd" and ev["Job ID"] in jobs:
            jobs[ev["Job ID"]]["end"] = ev["Completion Time"]
        elif kind == "SparkListenerStageCompleted":
            info = ev["Stage Info"]
            if info["Stage ID"] in stage_job and "Submission Time" in info:
                stages[info["Stage ID"]] = {"start": info["Submission Time"], "end": info["Completion Time"],
                                            "tasks": info["Number of Tasks"], "name": info["Stage Name"]}
        elif kind == "SparkListenerTaskEnd" and ev.get("Stage ID") in stage_job:
            m = ev.get("Task Metrics") or {}
            ti = ev["Task Info"]
            tasks["n"] += 1
            tasks["task_wall_ms"] += ti["Finish Time"] - ti["Launch Time"]
            tasks["run_ms"] += m.get("Executor Run Time", 0)
            tasks["cpu_ms"] += m.get("Executor CPU Time", 0) / 1e6
            tasks["gc_ms"] += m.get("JVM GC Time", 0)
            tasks["deser_ms"] += m.get("Executor Deserialize Time", 0)
            tasks["result_ser_ms"] += m.get("Result Serialization Time", 0)
            sw = m.get("Shuffle Write Metrics") or {}
            sr = m.get("Shuffle Read Metrics") or {}
            tasks["shuffle_write_ms"] += sw.get("Shuffle Write Time", 0) / 1e6
            tasks["shuffle_write_bytes"] += sw.get("Shuffle Bytes Written", 0)
            tasks["shuffle_fetch_wait_ms"] += sr.get("Fetch Wait Time", 0)
            tasks["shuffle_read_bytes"] += sr.get("Remote Bytes Read", 0) + sr.get("Local Bytes Read", 0)
    if not jobs:
        return {"error": f"no jobs of group {group} in the event log"}
    start = min(j["start"] for j in jobs.values())
    end = max(j.get("end", j["start"]) for j in jobs.values())
    spans = sorted((st["start"], st["end"]) for st in stages.values())
    covered, cur_s, cur_e = 0, None, None          # wall time with at least one stage running
    for a, b in spans:
        if cur_e is None or a > cur_e:
            if cur_e is not None:
                covered += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    if cur_e is not None:
        covered += cur_e - cur_s
    return {"group": group, "jobs": len(jobs), "stages": len(stages), "tasks": tasks["n"],
            "jobs_wall_s": (end - start) / 1000, "stage_running_wall_s": covered / 1000,
            "no_stage_running_s": (end - start - covered) / 1000,
            "task_run_s": tasks["run_ms"] / 1000, "task_cpu_s": tasks["cpu_ms"] / 1000,
            "task_gc_s": tasks["gc_ms"] / 1000, "task_deserialize_s": tasks["deser_ms"] / 1000,
            "task_result_serialize_s": tasks["result_ser_ms"] / 1000,
            "task_shuffle_write_s": tasks["shuffle_write_ms"] / 1000,
            "task_shuffle_fetch_wait_s": tasks["shuffle_fetch_wait_ms"] / 1000,
            "task_wall_s": tasks["task_wall_ms"] / 1000,
            "shuffle_write_mb": tasks["shuffle_write_bytes"] / 2**20, "shuffle_read_mb": tasks["shuffle_read_bytes"] / 2**20,
            "median_stage_ms": float(np.median([st["end"] - st["start"] for st in stages.values()])) if stages else None}


def phase_als(args: argparse.Namespace) -> dict:
    from recstream.settings import load

    s = load()
    sampler = Sampler()
    sampler.start()
    out: dict = {"settings": {"rank": s.als_rank, "iterations": s.als_iterations, "reg": s.als_reg,
                              "alpha": s.als_alpha, "weights": s.event_weights}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sampler.label = "split"
        t = time.perf_counter()
        m = split(args.taobao, s.event_weights)
        out["split_s"] = time.perf_counter() - t
        out["data"] = m["info"]
        log(f"als: split in {out['split_s']:.1f} s: {m['info']}")
        r = m["r"]
        counts = m["counts"]
        out["toppop"] = evaluate_all("toppop", lambda u: np.broadcast_to(counts, (len(u), len(counts))).copy(), m)
        log(f"als: TopPop {out['toppop']}")
        for use_cg, key in ((True, "implicit_cg"), (False, "implicit_cholesky")):
            sampler.label = key
            fit, uf, itf = implicit_fit(r, s, use_cg)
            fit["quality"] = evaluate_all(key, lambda u, uf=uf, itf=itf: uf[u] @ itf.T, m)
            out[key] = fit
            log(f"als: {key}: {fit['s_per_iter']:.3f} s/iter, fit {fit['fit_s']:.1f} s; {fit['quality']}")
        eventlog = args.eventlog
        fit, uf, itf = spark_fit(r, s, work, sampler, eventlog)
        fit["quality"] = evaluate_all("spark", lambda u: uf[u] @ itf.T, m)
        out["spark"] = fit
        log(f"als: spark {fit['s_per_iter']:.2f} s/iter; {fit['quality']}")
    out.update(sampler.stop())
    return out


# -- phase 3: the Spark job on a large generated shop -----------------------------------------------

def phase_shop(args: argparse.Namespace) -> dict:
    from batch import job
    from batch.spark import session
    from recstream.data import ShopConfig
    from recstream.data.shop import generate
    from recstream.settings import load

    s = dataclasses.replace(load(), als_rank=args.shop_rank)
    cfg = ShopConfig(users=args.shop_users, products=args.shop_products, end_s=1_764_000_000.0)
    sampler = Sampler()
    sampler.start()
    out: dict = {"users": cfg.users, "products": cfg.products, "rank": s.als_rank, "iterations": s.als_iterations}
    with tempfile.TemporaryDirectory() as tmp:
        sampler.label = "generate"
        t = time.perf_counter()
        shop = generate(cfg)
        out["generate_s"] = time.perf_counter() - t
        out["events"] = len(shop.events)
        log(f"shop: {len(shop.events):,} events generated in {out['generate_s']:.1f} s")
        sampler.label = "to parquet"
        t = time.perf_counter()
        path = job.events_to_parquet(shop.events, Path(tmp) / "events.parquet")
        out["parquet_s"] = time.perf_counter() - t
        out["parquet_mb"] = path.stat().st_size / 2**20
        del shop
        sampler.label = "spark: JVM start"
        t = time.perf_counter()
        spark = session(s)
        out["jvm_start_s"] = time.perf_counter() - t
        # the job reports each part as it ends: the label moves on to the next part then
        stage = {"batch load": "spark: als", "batch als": "spark: cooccurrence",
                 "batch cooccurrence": "spark: aggregates", "batch aggregates": "spark: collect"}

        def progress(msg: str) -> None:
            for prefix, label in stage.items():
                if msg.startswith(prefix):
                    sampler.label = label
            log(msg)

        try:
            sampler.label = "spark: load"
            t = time.perf_counter()
            built = job.build(spark, job.load_events(spark, path), s, progress=progress)
            out["build_s"] = time.perf_counter() - t
        finally:
            spark.stop()
        out["metrics"] = built.metrics
        out["window"] = built.window.__dict__
        out["items_embedded"] = len(built.item_embeddings.ids)
        out["users_embedded"] = len(built.user_embeddings.ids)
    out.update(sampler.stop())
    return out


# -- the run ---------------------------------------------------------------------------------------

def run_phase(name: str, args: argparse.Namespace, work: Path) -> dict:
    dest = work / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--phase-out", str(dest),
           "--taobao", str(args.taobao), "--ranker-trees", str(args.ranker_trees),
           "--shop-users", str(args.shop_users), "--shop-products", str(args.shop_products),
           "--shop-rank", str(args.shop_rank)]
    env = dict(os.environ)
    if name == "als":
        folder = work / "eventlog"
        folder.mkdir()
        cmd += ["--eventlog", str(folder)]
        env["PYSPARK_SUBMIT_ARGS"] = (f"--conf spark.eventLog.enabled=true --conf spark.eventLog.dir=file://{folder} "
                                      "--conf spark.eventLog.compress=false pyspark-shell")
    log(f"phase {name} ...")
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    res = json.loads(dest.read_text())
    res["phase_wall_s"] = time.perf_counter() - t
    log(f"phase {name} done in {res['phase_wall_s']:.1f} s")
    return res


def faiss_1m() -> dict:
    d = json.loads(INDEX_RESULTS.read_text())
    f = d["figures"]["synthetic_1000k_x128"]
    return {"source": "bench/results/retrieval_index.json", "date": d["date"], "items": f["items"],
            "ivf_build_s": f["ivf"]["build_s"], "nlist": f["ivf"]["nlist"], "nprobe": f["ivf"]["nprobe"],
            "faiss_recall_at_200": f["ivf"]["faiss_recall_at_200"],
            "hnsw_build_s": f["hnsw"]["build_s"], "hnsw_items": f["hnsw"]["items"],
            "hnsw_recall_at_200": f["hnsw"]["faiss_recall_at_200"], "flat_build_s": f["flat"]["build_s"],
            "flat_query_ms": f["flat"]["raw_faiss_query_ms"]}


def table(fig: dict) -> str:
    tb, als, shop = fig["taobao"], fig["als"], fig["shop"]
    lines = ["Taobao head, one whole training run (train_once)",
             f"{'stage':<16}{'wall s':>9}{'python peak MiB':>17}{'JVM peak MiB':>14}"]
    for st, sec in tb["stage_s"].items():
        lines.append(f"{st:<16}{sec:>9.2f}{tb['python_peak_rss_mb_by_stage'].get(st, float('nan')):>17.0f}"
                     f"{tb['java_peak_rss_mb_by_stage'].get(st, float('nan')):>14.0f}")
    lines.append(f"{'total':<16}{tb['total_train_s']:>9.2f}{tb['peak_rss_mb']:>17.0f}{tb['java_peak_rss_mb']:>14.0f}"
                 "  (python: ru_maxrss; JVM: polled)")
    m = tb["metrics"]
    lines.append(f"ranker NDCG@8 {m.get('ranker_ndcg_at_8', float('nan')):.4f} vs baseline "
                 f"{m.get('baseline_ndcg_at_8', float('nan')):.4f}; novel {m.get('ranker_novel_ndcg_at_8', float('nan')):.4f}"
                 f" vs {m.get('baseline_novel_ndcg_at_8', float('nan')):.4f}; faiss_recall_at_200 {m['faiss_recall_at_200']:.4f}")
    lines += ["", f"ALS on one matrix (Taobao before the last day: {als['data']['users']} users, {als['data']['items']} items,"
              f" {als['data']['nnz']} pairs; rank {als['settings']['rank']}, {als['settings']['iterations']} iterations)",
              f"{'model':<22}{'s/iter':>9}{'fit s':>9}{'recall@20':>11}{'NDCG@20':>9}{'recall@20 all':>15}{'NDCG@20 all':>13}"]
    rows = [("TopPop", None, None, als["toppop"]),
            ("implicit (CG)", als["implicit_cg"]["s_per_iter"], als["implicit_cg"]["fit_s"], als["implicit_cg"]["quality"]),
            ("implicit (Cholesky)", als["implicit_cholesky"]["s_per_iter"], als["implicit_cholesky"]["fit_s"],
             als["implicit_cholesky"]["quality"]),
            ("Spark ALS", als["spark"]["s_per_iter"], als["spark"]["fit_s_by_max_iter"][str(als["settings"]["iterations"])],
             als["spark"]["quality"])]
    for name, per, fit, q in rows:
        cp, al = q["cart_purchase"], q["all"]
        lines.append(f"{name:<22}{'-' if per is None else f'{per:.3f}':>9}{'-' if fit is None else f'{fit:.2f}':>9}"
                     f"{cp['recall_at_20']:>11.4f}{cp['ndcg_at_20']:>9.4f}{al['recall_at_20']:>15.4f}{al['ndcg_at_20']:>13.4f}")
    lines += ["", f"Spark job on a generated shop: {shop['users']:,} users, {shop['products']:,} products, "
              f"{shop['events']:,} events, rank {shop['rank']}",
              "  " + ", ".join(f"{k} {v:.1f} s" for k, v in shop["metrics"].items() if k.endswith("_s")) +
              f"; JVM peak {shop['java_peak_rss_mb']:.0f} MiB (VmHWM {shop['java_vmhwm_mb']:.0f})"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--taobao", type=Path, default=TAOBAO)
    ap.add_argument("--ranker-trees", type=int, default=50)
    ap.add_argument("--shop-users", type=int, default=30_000)
    ap.add_argument("--shop-products", type=int, default=60_000)
    ap.add_argument("--shop-rank", type=int, default=64)
    ap.add_argument("--phases", default="taobao,als,shop")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--eventlog", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        res = {"taobao": phase_taobao, "als": phase_als, "shop": phase_shop}[args.phase](args)
        args.phase_out.write_text(json.dumps(res, indent=1, default=float))
        return
    started = time.perf_counter()
    load_start = os.getloadavg()
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.phases.split(","):
            figures[name] = run_phase(name, args, Path(tmp))
    figures["faiss_1m"] = faiss_1m()
    if not {"taobao", "als", "shop"} <= set(figures):
        print(json.dumps(figures, indent=1, default=float))
        return
    print(table(figures))
    tb, als = figures["taobao"], figures["als"]
    headline = {"spark_als_s_per_iter": als["spark"]["s_per_iter"],
                "implicit_als_s_per_iter": als["implicit_cg"]["s_per_iter"],
                "implicit_als_cholesky_s_per_iter": als["implicit_cholesky"]["s_per_iter"],
                "spark_over_implicit": als["spark"]["s_per_iter"] / als["implicit_cg"]["s_per_iter"],
                "spark_over_implicit_cholesky": als["spark"]["s_per_iter"] / als["implicit_cholesky"]["s_per_iter"],
                "faiss_recall_at_200": tb["metrics"]["faiss_recall_at_200"],
                "total_train_s": tb["total_train_s"], "stage_s": tb["stage_s"],
                "peak_rss_mb": tb["peak_rss_mb"], "spark_jvm_peak_rss_mb": tb["java_peak_rss_mb"],
                "ranker_ndcg_at_8": tb["metrics"].get("ranker_ndcg_at_8"),
                "baseline_ndcg_at_8": tb["metrics"].get("baseline_ndcg_at_8"),
                "ranker_novel_ndcg_at_8": tb["metrics"].get("ranker_novel_ndcg_at_8"),
                "baseline_novel_ndcg_at_8": tb["metrics"].get("baseline_novel_ndcg_at_8"),
                "shop_spark_job_s": figures["shop"]["metrics"]["total_s"],
                "shop_spark_jvm_peak_rss_mb": figures["shop"]["java_peak_rss_mb"]}
    harness.write_result("training", {**headline, **figures}, out=args.out, parameters={
                       "taobao": str(args.taobao), "ranker_trees": args.ranker_trees, "shop_users": args.shop_users,
                       "shop_products": args.shop_products, "shop_rank": args.shop_rank, "k": K,
                       "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
                       "wall_s": time.perf_counter() - started})
    log(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} "
        f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
