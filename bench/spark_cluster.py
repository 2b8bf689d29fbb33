"""Benchmark: the same training job on local[*] and, through spark-submit, on a standalone Spark cluster.

Run from the repository root, with Kafka, Redis and MLflow up (`recstream services up`); it starts
the standalone master and worker itself (`recstream spark up`) and stops them afterwards if it
started them:

    .venv/bin/python bench/spark_cluster.py                     # bench/results/spark_cluster.json
    .venv/bin/python bench/spark_cluster.py --shop-users 800    # a smaller generated shop

Both runs train on the same generated shop (recstream.data.shop, --shop-users / --shop-products /
--shop-seed) with the same settings (RECSTREAM_* from the environment, except model_name
bench-<id>-<mode> and --ranker-trees), `--no-publish`, each in a fresh process:

1. local: `recstream train --dataset shop ...`, as a user runs it (RECSTREAM_SPARK_MASTER, local[*]).
2. standalone: `spark-submit --master spark://127.0.0.1:7077 cli/submit.py train --dataset shop ...`
   (cli.spark_cluster.submit_command: the driver here, one executor of RECSTREAM_SPARK_WORKER_CORES
   cores and RECSTREAM_SPARK_WORKER_MEMORY on the worker, one shuffle partition per core as locally).

Figures: each process's wall time (Python and JVM start included); the training stages the command
prints (`stages load ... s, spark ... s, ...`); the Spark job's own steps from its progress lines
(`batch load|als|cooccurrence|aggregates ... [s]`; the job runs twice per training run, for serving
and for the ranker's features, and both are kept); for the standalone run, the application's
duration as the master records it; the Spark job's exact step times from the registered version's
metrics (batch_*_s). Models registered by the runs (and their MLflow runs) are deleted afterwards.
Wall times are truncated to 0.1 s; the stage and step times printed by the command are its own
rounding to 0.1 s, so the JSON keeps the exact metrics beside them.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench import harness  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "spark_cluster.json"
STAGES = re.compile(r"stages (.+)$", re.M)
STEP = re.compile(r"^batch (load|als|cooccurrence|aggregates): .*\[(\d+\.\d) s\]$", re.M)


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def parse(stdout: str) -> dict:
    """The training stages and the Spark job's steps from what `recstream train` prints."""
    stages: dict[str, float] = {}
    m = STAGES.search(stdout)
    if m:
        for part in m.group(1).split(", "):
            name, value, _ = part.rsplit(" ", 2)
            stages[name] = float(value)
    steps: dict[str, list[float]] = {}
    for name, value in STEP.findall(stdout):
        steps.setdefault(name, []).append(float(value))
    return {"stage_s": stages, "spark_job_step_s": steps}


def run(mode: str, cmd: list[str], env: dict[str, str]) -> dict:
    log(f"{mode}: {shlex.join(cmd)}")
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    out = {"wall_s": harness.down(wall, 1), **parse(done.stdout), "load_average_after": os.getloadavg()}
    log(f"{mode}: {out['wall_s']} s; stages {out['stage_s']}")
    return out


def batch_metrics(s) -> dict[str, float]:
    """The Spark job's exact step times (the serving build) and data sizes, from the registered version."""
    from models.registry import Registry

    m = Registry(s.mlflow_tracking_uri, s.model_name).champion_metrics() or {}
    return {k: v for k, v in sorted(m.items()) if k.startswith("batch_") or k in ("events", "users", "items")}


def cleanup(s) -> dict:
    """Delete the run's registered model and the MLflow runs behind it. `--no-publish` runs write
    nothing to Redis, so there is nothing to delete there."""
    from bench.training import delete_model

    done = delete_model(s)
    log(f"cleanup: {done}")
    return done


def main() -> int:
    from cli import spark_cluster
    from recstream.settings import load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shop-users", type=int, default=3000)
    p.add_argument("--shop-products", type=int, default=6000)
    p.add_argument("--shop-seed", type=int, default=11)
    p.add_argument("--ranker-trees", type=int, default=50, help="as bench/training.py (200 makes the ranker dominate)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    tag = uuid.uuid4().hex[:8]
    # A namespace of its own all the same: nothing here may touch another deployment's Redis keys.
    base = dataclasses.replace(load(), ranker_trees=args.ranker_trees, redis_namespace=f"bench{tag}:")
    train = ["train", "--dataset", "shop", "--shop-users", str(args.shop_users), "--shop-products",
             str(args.shop_products), "--shop-seed", str(args.shop_seed), "--no-publish"]
    started = spark_cluster.up(base, say=log)
    figures: dict = {"load_average_before": os.getloadavg()}
    try:
        local = dataclasses.replace(base, model_name=f"bench-{tag}-local")
        cluster = dataclasses.replace(base, model_name=f"bench-{tag}-standalone")
        recstream = str(Path(sys.executable).with_name("recstream"))
        try:
            figures["local"] = run("local", [recstream, *train], spark_cluster.submit_env(local))
            figures["local"]["registered"] = batch_metrics(local)
            before = {a["id"] for a in spark_cluster.applications(spark_cluster.master_state(base))}
            figures["standalone"] = run("standalone", spark_cluster.submit_command(cluster, train),
                                        spark_cluster.submit_env(cluster))
            figures["standalone"]["registered"] = batch_metrics(cluster)
            apps = [a for a in spark_cluster.applications(spark_cluster.master_state(base)) if a["id"] not in before]
            figures["standalone"]["applications"] = [{k: a.get(k) for k in ("id", "name", "state", "cores",
                                                                              "memoryperexecutor", "duration")}
                                                     for a in apps]
        finally:
            figures["cleanup"] = [cleanup(local), cleanup(cluster)]
    finally:
        spark_cluster.down(base, say=log, only=started)
    f = figures
    f["local_wall_s"], f["standalone_wall_s"] = f["local"]["wall_s"], f["standalone"]["wall_s"]
    f["local_spark_stage_s"] = f["local"]["stage_s"].get("spark")
    f["standalone_spark_stage_s"] = f["standalone"]["stage_s"].get("spark")
    harness.write_result(
        "spark_cluster", f, out=args.out, command=harness.command_line("flock", "/tmp/recstream-heavy.lock"),
        parameters={"shop_users": args.shop_users, "shop_products": args.shop_products,
                             "shop_seed": args.shop_seed, "ranker_trees": args.ranker_trees,
                             "als_rank": base.als_rank, "als_iterations": base.als_iterations,
                             "local_master": base.spark_master, "standalone_master": spark_cluster.master_url(base),
                             "spark_driver_memory": base.spark_driver_memory,
                             "spark_worker_cores": base.spark_worker_cores,
                             "spark_worker_memory": base.spark_worker_memory,
                             "standalone_command": shlex.join(spark_cluster.submit_command(base, train))})
    log(f"local[*] {f['local_wall_s']} s, standalone {f['standalone_wall_s']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
