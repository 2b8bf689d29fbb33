"""The `recstream` command: one entry point whose subcommands run every part."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

from recstream import settings as settings_mod
from recstream.settings import Settings


def _services(args: argparse.Namespace, s: Settings) -> int:
    from cli import services

    if args.action == "install":
        services.install(s)
    elif args.action == "up":
        services.install(s)
        services.up(s, with_mlflow=not args.no_mlflow)
    elif args.action == "down":
        services.down(s)
    elif args.action.startswith("cluster-"):
        from cli import redis_cluster

        if args.action == "cluster-up":
            services.install(s)
            redis_cluster.cluster_up(s)
        elif args.action == "cluster-down":
            redis_cluster.cluster_down(s)
        else:
            for name, state in redis_cluster.cluster_status(s).items():
                print(f"{name:20} {state}")
    else:
        for name, state in services.status(s).items():
            print(f"{name:8} {state}")
    return 0


def _spark(args: argparse.Namespace, s: Settings) -> int:
    import shlex

    from cli import spark_cluster

    if args.action == "up":
        spark_cluster.up(s)
        print("submit the training job to it with:\n  " + shlex.join(
            ["SPARK_LOCAL_IP=127.0.0.1", f"PYSPARK_PYTHON={sys.executable}",
             *spark_cluster.submit_command(s, ["train", "--dataset", "shop"])]))
    elif args.action == "down":
        spark_cluster.down(s)
    else:
        for name, state in spark_cluster.status(s).items():
            print(f"{name:13} {state}")
    return 0


def _topics(args: argparse.Namespace, s: Settings) -> int:
    from streams import topics

    if args.action == "create":
        for name, state in asyncio.run(topics.ensure_topics(s)).items():
            print(f"{name:32} {state}")
    else:
        for spec in topics.specs(s):
            print(f"{spec.name:32} partitions={spec.partitions:<3} {spec.doc}")
    return 0


def _replay(args: argparse.Namespace, s: Settings) -> int:
    from recstream.data import load_dataset
    from streams import replay

    data = load_dataset(args.dataset, args.path, on_error=args.on_error, limit=args.limit)
    for err in data.errors[:20]:
        print(f"skipped {err}", file=sys.stderr)
    if len(data.errors) > 20:
        print(f"... and {len(data.errors) - 20} more malformed rows", file=sys.stderr)
    if s.user_id_key:   # the command is an edge too: README "Personal data"
        import dataclasses

        from recstream.privacy import pseudonymise_events

        data = dataclasses.replace(data, events=pseudonymise_events(data.events, s.user_id_key))
    result = asyncio.run(replay.publish_dataset(s, data, rate_per_s=args.rate))
    print(result.summary())
    return 0


def _demo(args: argparse.Namespace, s: Settings) -> int:
    from cli import demo

    return asyncio.run(demo.run(s, args))


def _lower_priority(n: int) -> None:
    """nice(n), and the nice of this process's autogroup when it leads a session of its own. Linux
    (autogroup, on by default) weighs sessions against each other and a process's nice only within its
    session, so a worker started in a session of its own, as recstream's supervisors start each, kept
    an even share of the CPU whatever its nice (measured: 4 busy loops in 4 sessions, one at nice 10,
    got equal shares; with its session's at 10 too, an eighth of each other's). A process that shares its session
    leaves the session's value alone (it would lower its siblings too)."""
    if n <= 0:
        return
    with contextlib.suppress(OSError):
        os.nice(n)
    if os.getsid(0) == os.getpid():
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text(str(n))


def _worker(args: argparse.Namespace, s: Settings) -> int:
    import os

    # FAISS and XGBoost use OpenMP; idle OpenMP threads spin by default, taking CPU from Kafka, Redis
    # and the other agents on a small machine. Read when OpenMP starts: before faiss or xgboost load.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvloop

    logging.getLogger().setLevel(args.log_level.upper())
    # freshness first: under overload the requests fall back at their deadline (the API answers them)
    # and the archive and attribution lag, while the feature worker keeps the cores it needs (README
    # "Operations")
    _lower_priority(s.niceness(args.kind))
    if args.kind == "features":
        from agents.worker import run_features

        return uvloop.run(run_features(s))
    elif args.kind in ("retrieval", "ranking"):
        from agents.worker import run_serving

        return uvloop.run(run_serving(s, args.kind))
    elif args.kind == "attribution":
        from streams.attribution import run_attribution

        return uvloop.run(run_attribution(s))
    else:
        from streams.archive import run as run_archive

        uvloop.run(run_archive(s))
    return 0


def _serve(args: argparse.Namespace, s: Settings) -> int:
    from serving.app import serve
    from streams.topics import ensure_topics

    asyncio.run(ensure_topics(s))  # never let a first produce auto-create a one-partition topic
    serve(s, args.host, args.port)
    return 0


def _source(args: argparse.Namespace):
    from batch.train import Source

    sizes = {k: getattr(args, f"shop_{k}", None) for k in ("users", "products", "seed")}
    if args.dataset == "shop" and any(v is not None for v in sizes.values()):
        import time

        from recstream.data import ShopConfig

        # As `--dataset shop` alone (recstream.data.shop_dataset): the last event a minute before now.
        return Source(dataset="shop", shop=ShopConfig(end_s=float(int(time.time()) // 60 * 60 - 60),
                                                      **{k: v for k, v in sizes.items() if v is not None}))
    return Source(dataset=args.dataset, path=args.path)


def _train(args: argparse.Namespace, s: Settings) -> int:
    from batch.train import TrainingFailed, train_once

    try:
        report = train_once(s, _source(args), publish_to_serving=not args.no_publish)
    except TrainingFailed as exc:
        print(f"recstream: {exc}", file=sys.stderr)
        return 1
    print(f"version {report.version} registered as {report.alias} ({report.promotion}); "
          f"{report.published_keys} keys published; stages " +
          ", ".join(f"{k} {v:.1f} s" for k, v in report.stage_s.items()))
    for key in ("ranker_ndcg_at_8", "baseline_ndcg_at_8", "ranker_novel_ndcg_at_8", "baseline_novel_ndcg_at_8",
                "faiss_recall_at_200"):
        if key in report.metrics:
            print(f"  {key:28} {report.metrics[key]:.4f}")
    for warning in report.warnings:
        print(f"  warning: {warning}")
    return 0


def _erase(args: argparse.Namespace, s: Settings) -> int:
    # a background job beside serving: the lowest CPU priority from here on, its imports included (the
    # threads it starts inherit it); the Redis passes and the archive's rewrite pace themselves as well
    with contextlib.suppress(OSError):
        os.nice(19)
    import orjson

    from streams.erasures import erase_here

    report = asyncio.run(erase_here(s, args.user, archive=not args.no_archive, hashed=args.hashed,
                                    say=lambda line: print(line, file=sys.stderr)))
    print(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())
    return 0


def _evaluate(args: argparse.Namespace, s: Settings) -> int:
    from cli.evaluate import RedisUnavailable, run
    from cli.report import table, write
    from recstream.evaluation.protocols import PROTOCOLS, make_split, summary

    protocols = list(PROTOCOLS) if args.protocol == "all" else [args.protocol]
    for name in protocols:
        path = args.dataset or Path(args.data) / PROTOCOLS[name].path
        try:
            split = make_split(name, path, args.format, validation=args.validation, seed=args.seed,
                               max_queries=args.max_queries)
        except (ValueError, FileNotFoundError) as exc:
            print(f"recstream evaluate: {exc}", file=sys.stderr)
            return 2
        info = summary(split)
        print(f"== {name}{' (validation split)' if args.validation else ''}: {path}; seed {split.seed}; "
              f"{info['train_events']:,} training events, {info['queries']:,} queries, primary {split.primary}")
        for note in split.notes:
            print(f"   {note}")
        try:
            ev = run(s, split)
        except RedisUnavailable as exc:
            print(f"recstream evaluate: {exc}", file=sys.stderr)
            return 2
        print(table(ev))
        command = "recstream evaluate " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "recstream evaluate"
        json_path, png_path = write(ev, args.out, command, name + ("-validation" if args.validation else ""))
        print(f"wrote {json_path} and {png_path}")
    return 0


def _trainer(args: argparse.Namespace, s: Settings) -> int:
    import signal

    from batch.train import run_forever

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    every = args.every_hours if args.every_hours is not None else s.trainer_every_hours
    try:
        run_forever(s, _source(args), every, stop=lambda: bool(stopping))
    except KeyboardInterrupt:
        pass
    return 0


def _experiments(args: argparse.Namespace, s: Settings) -> int:
    from cli import experiments as commands
    from recstream.experiments.definition import ExperimentError, load

    try:
        if args.action == "validate":
            es = load(args.file or s.experiments_file)
            print(f"{args.file or s.experiments_file}: valid, revision {es.revision}, {len(es.experiments)} experiments")
            for e in es.experiments:
                lo, hi = es.slices[e.id]
                print(f"  {e.id:24} layer {e.layer:12} slice [{lo:.3f}, {hi:.3f}) "
                      f"variants {', '.join(f'{v.name}={v.weight:g}' for v in e.variants)}")
        elif args.action == "report":
            text, js, png = commands.report(s, args.id, args.metric, args.out)
            print(text)
            print(f"wrote {js} and {png}")
        else:
            result = commands.promote(s, args.id, args.variant, args.metric, args.force)
            print(f"promoted {args.id}/{args.variant}: {result.decision.reason}")
    except (ExperimentError, commands.PromotionRefused, FileNotFoundError, ValueError) as exc:
        print(f"recstream experiments: {exc}", file=sys.stderr)
        return 2
    return 0


def _lag(args: argparse.Namespace, s: Settings) -> int:
    from streams import lag

    return asyncio.run(lag.report(s))


def _settings(args: argparse.Namespace, s: Settings) -> int:
    """Every setting with its default and, where the environment changed it, the value in effect.
    Secrets never show: settings documented as (secret) print as *** when set, and the password
    (and user) of any URL (redis://:pw@host, http://user:pw@host) print as ***."""
    import re

    def shown(var: str, value: str, doc: str) -> str:
        if doc.rstrip().endswith("(secret)") or any(w in var for w in ("TOKEN", "PASSWORD", "SECRET")):
            return "***" if value else ""
        return re.sub(r"(?<=://)[^/@\s]*@", "***@", value)

    for var, default, doc in settings_mod.describe():
        current = str(getattr(s, var[len(settings_mod.PREFIX):].lower()))
        now = f" (set: {shown(var, current, doc)})" if current != default else ""
        print(f"{var:36} {shown(var, default, doc):28} {doc}{now}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and flag. Why this long: it is the command line's reference, one declaration a
    command, read top to bottom like `recstream --help`; split up, it would only be harder to scan."""
    p = argparse.ArgumentParser(prog="recstream", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("services", help="install, start, stop or show the local Kafka, Redis and MLflow")
    sp.add_argument("action", choices=["install", "up", "down", "status", "cluster-up", "cluster-down", "cluster-status"],
                    help="cluster-*: the local three-master Redis Cluster (RECSTREAM_REDIS_CLUSTER_PORTS)")
    sp.add_argument("--no-mlflow", action="store_true", help="start Kafka and Redis only")
    sp.set_defaults(run=_services)

    sp = sub.add_parser("spark", help="start, stop or show a standalone Spark master and worker on loopback")
    sp.add_argument("action", choices=["up", "down", "status"])
    sp.set_defaults(run=_spark)

    sp = sub.add_parser("topics", help="create (idempotently) or list the project's topics")
    sp.add_argument("action", choices=["create", "list"])
    sp.set_defaults(run=_topics)

    sp = sub.add_parser("replay", help="publish a dataset's events to the clickstream topic")
    sp.add_argument("--dataset", default="shop", help="shop (embedded), csv, taobao, yoochoose, groceries, movielens")
    sp.add_argument("--path", type=Path, help="file or folder of the dataset (not for shop)")
    sp.add_argument("--rate", type=float, default=None, help="events per second (default: as fast as possible)")
    sp.add_argument("--limit", type=int, default=None, help="publish at most this many events")
    sp.add_argument("--on-error", choices=["skip", "stop"], default="skip", help="malformed rows: report and skip, or stop")
    sp.set_defaults(run=_replay)

    sp = sub.add_parser("demo", help="the end-to-end demo on the embedded shop dataset")
    sp.add_argument("--users", type=int, default=400, help="shoppers in the generated shop")
    sp.add_argument("--products", type=int, default=1500, help="products in the generated shop")
    sp.add_argument("--seed", type=int, default=7)
    sp.add_argument("--ab-shoppers", type=int, default=200, help="shoppers in the A/B test (count)")
    sp.add_argument("--ab-visits", type=int, default=2, help="homepage visits per shopper in the A/B test (count)")
    sp.set_defaults(run=_demo)

    sp = sub.add_parser("worker", help="run a worker process until SIGTERM")
    sp.add_argument("kind", choices=["features", "archive", "retrieval", "ranking", "attribution"],
                    help="features: session table + Redis features + item features; archive: clickstream -> Parquet; "
                         "retrieval: requests -> candidates (FAISS + rules); ranking: candidates -> XGBoost -> replies; "
                         "attribution: exposures + clickstream -> A/B metrics per variant in Redis")
    sp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sp.set_defaults(run=_worker)

    for name, helptext in (("train", "train once: Spark ALS, co-occurrence, content model, FAISS, ranker; "
                                     "register in MLflow; publish when it becomes champion"),
                           ("trainer", "retrain every --every-hours (default RECSTREAM_TRAINER_EVERY_HOURS) until SIGTERM")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--dataset", default=None, help="train on an imported dataset (shop, csv, taobao, ...) "
                                                         "instead of the Parquet archive")
        sp.add_argument("--path", type=Path, help="file or folder of the dataset")
        if name == "train":
            sp.add_argument("--no-publish", action="store_true", help="register only; do not publish to serving")
            for k, default in (("users", 400), ("products", 1500), ("seed", 7)):
                sp.add_argument(f"--shop-{k}", type=int, default=None,
                                help=f"with --dataset shop: the generated shop's {k} (default {default})")
            sp.set_defaults(run=_train)
        else:
            sp.add_argument("--every-hours", type=float, default=None)
            sp.set_defaults(run=_trainer)

    sp = sub.add_parser("evaluate", help="offline evaluation: a protocol's leak-free split, baselines and ours side by side")
    sp.add_argument("--protocol", required=True, help="homepage, session, fbt, movielens, new_items, or all")
    sp.add_argument("--dataset", type=Path, default=None, help="file or folder (default: the protocol's dataset "
                                                               "under --data)")
    sp.add_argument("--format", default=None, help="csv, taobao, yoochoose, groceries, movielens "
                                                   "(default: the protocol's)")
    sp.add_argument("--data", default="../shared/data", help="folder of the public datasets (default ../shared/data)")
    sp.add_argument("--validation", action="store_true", help="the validation split (tuning), not the test split")
    sp.add_argument("--seed", type=int, default=20261125, help="seed of every random choice (printed)")
    sp.add_argument("--max-queries", type=int, default=None, help="sample whole users/sessions down to about this many")
    sp.add_argument("--out", type=Path, default=Path(".local/evaluation"), help="folder for the JSON and PNG")
    sp.set_defaults(run=_evaluate)

    sp = sub.add_parser("serve", help="run the HTTP API (POST /api/v1/events, GET /healthz) under uvicorn")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sp.add_argument("--port", type=int, default=8000, help="TCP port")
    sp.set_defaults(run=_serve)

    sp = sub.add_parser("experiments", help="A/B experiments: validate the file, report one, promote a variant")
    esub = sp.add_subparsers(dest="action", required=True)
    ep = esub.add_parser("validate", help="check an experiments file (default RECSTREAM_EXPERIMENTS_FILE)")
    ep.add_argument("file", nargs="?", type=Path)
    for name, helptext in (("report", "per-variant metrics, tests, SRM; writes ID.json and ID.png"),
                           ("promote", "promote VARIANT: refused unless significant, 7 days old, no SRM (or --force)")):
        ep = esub.add_parser(name, help=helptext)
        ep.add_argument("id", help="experiment id")
        if name == "promote":
            ep.add_argument("variant", help="variant to promote")
            ep.add_argument("--force", action="store_true", help="promote despite the reasons to refuse (they are printed)")
        else:
            ep.add_argument("--out", type=Path, default=Path(".local/experiments"), help="folder for the JSON and PNG")
        ep.add_argument("--metric", default="ctr", help="the metric that decides: ctr, add_to_cart_rate, "
                                                        "conversion_rate, revenue_per_impression (default ctr)")
    sp.set_defaults(run=_experiments)

    sp = sub.add_parser("erase", help="erase shoppers on request (GDPR/CCPA): Redis, session table, A/B units, "
                                      "archive; later events dropped, later models without them (idempotent)")
    sp.add_argument("--user", action="append", required=True, metavar="ID",
                    help="a shopper's id as the shop knows it (hashed with RECSTREAM_USER_ID_KEY when set); repeat it")
    sp.add_argument("--hashed", action="store_true", help="the ids given are already the stored pseudonyms")
    sp.add_argument("--no-archive", action="store_true",
                    help="leave the archive's rewrite to the archive worker (it does it on reading the erasure)")
    sp.set_defaults(run=_erase)

    sp = sub.add_parser("lag", help="consumer lag per group and partition, and the workers' latest metrics")
    sp.set_defaults(run=_lag)

    sp = sub.add_parser("settings", help="list every RECSTREAM_* setting with its default and unit")
    sp.set_defaults(run=_settings)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        s = settings_mod.load()
        return args.run(args, s)
    except settings_mod.SettingsError as exc:
        print(f"recstream: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
