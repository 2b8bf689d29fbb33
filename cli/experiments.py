"""`recstream experiments ...`: the I/O around the pure analysis (report) and the promotion.

report ID   reads the attribution's per-variant totals from Redis (streams/attribution.py), prints the
            table (recstream.experiments.analysis), writes ID.json and ID.png (metrics over time).
promote ID VARIANT
            refused with the reasons unless the analysis allows it (or --force). Then, in this order:
            a variant that names a ranker makes that MLflow version the champion and publishes it
            to serving (the agents swap to it); the variant's other changes become the file's
            [defaults]; the experiment ends now. The registry step comes first and is undone if
            publishing fails, and the file is written in one atomic update, so nothing is half-applied.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from recstream.experiments import analysis
from recstream.experiments.definition import Changes, ExperimentError, ExperimentSet
from recstream.experiments.store import ExperimentStore
from recstream.settings import Settings


async def _read(s: Settings, experiment_id: str) -> tuple[dict, dict]:
    from streams.attribution_store import read_daily, read_totals

    client = aioredis.from_url(s.redis_url, socket_connect_timeout=2.0)
    try:
        return (await read_totals(client, s.redis_namespace, experiment_id),
                await read_daily(client, s.redis_namespace, experiment_id))
    finally:
        await client.aclose()


def analyse(s: Settings, experiment_id: str, metric: str, now_s: float | None = None
            ) -> tuple[analysis.Analysis, dict]:
    store = ExperimentStore(s.experiments_file)
    store.refresh()
    e = store.current.get(experiment_id)
    totals, daily = asyncio.run(_read(s, experiment_id))
    return analysis.analyse(e, totals, time.time() if now_s is None else now_s, metric), daily


def report(s: Settings, experiment_id: str, metric: str, out: Path) -> tuple[str, Path, Path]:
    """The table's text and the paths of the JSON record and the plot."""
    an, daily = analyse(s, experiment_id, metric)
    out.mkdir(parents=True, exist_ok=True)
    png, js = out / f"{experiment_id}.png", out / f"{experiment_id}.json"
    analysis.plot(an, daily, png)
    record = {"experiment": experiment_id, "control": an.control, "metric": an.metric, "days_run": an.days_run,
              "srm_p": an.srm_p, "srm_flagged": an.srm_flagged, "units": an.units, "impressions": an.impressions,
              "rates": an.rates,
              "tests": [{"metric": t.metric, "variant": t.variant, "test": t.test, "interval": t.interval,
                         **dataclasses.asdict(t.comparison)} for t in an.tests],
              "decisions": {v: dataclasses.asdict(analysis.decide(an, v)) for v in an.units}}
    js.write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return analysis.table(an), js, png


@dataclass(frozen=True)
class Promotion:
    decision: analysis.Decision
    champion_before: str | None = None
    champion_after: str | None = None
    defaults: Changes | None = None


class PromotionRefused(Exception):
    pass


def promote(s: Settings, experiment_id: str, variant: str, metric: str = "ctr", force: bool = False,
            now_s: float | None = None, progress: Callable[[str], None] = print) -> Promotion:
    """See the module docstring; ExperimentError for an unknown or ended experiment or an unknown
    variant, PromotionRefused with the reasons when the analysis does not allow it."""
    now = time.time() if now_s is None else now_s
    store = ExperimentStore(s.experiments_file)
    store.refresh()
    e = store.current.get(experiment_id)
    v = e.variant(variant)
    if now >= e.end_s:
        raise ExperimentError(f"experiment {experiment_id!r} has ended; a winner is promoted while its experiment "
                              "runs (extend its end through the admin API to keep measuring)")
    if now < e.start_s:
        raise ExperimentError(f"experiment {experiment_id!r} has not started yet")
    an, _ = analyse(s, experiment_id, metric, now)
    decision = analysis.decide(an, variant, force)
    if not decision.allowed:
        raise PromotionRefused(f"promotion of {experiment_id}/{variant} refused: {decision.reason}")
    progress(f"promoting {experiment_id}/{variant}: {decision.reason}")
    before = after = None
    if v.changes.ranker:
        before, after = _make_champion(s, v.changes.ranker, f"A/B {experiment_id}/{variant}: {decision.reason}",
                                       progress)
    config = dataclasses.replace(v.changes, ranker=None)

    def apply(es: ExperimentSet) -> ExperimentSet:
        merged = Changes(**{f.name: getattr(config, f.name) if getattr(config, f.name) is not None
                            else getattr(es.defaults, f.name) for f in dataclasses.fields(Changes)})
        ended = tuple(dataclasses.replace(x, end_s=now) if x.id == experiment_id else x for x in es.experiments)
        return dataclasses.replace(es, experiments=ended, defaults=merged)

    es = store.update(apply)
    progress(f"experiment {experiment_id} ended; defaults now {es.defaults}")
    return Promotion(decision, before, after, es.defaults)


def _make_champion(s: Settings, ref: str, reason: str, progress: Callable[[str], None]) -> tuple[str | None, str]:
    from batch.publish import publish_registered
    from models.registry import Registry

    registry = Registry(s.mlflow_tracking_uri, s.model_name)
    version = registry.alias_version(ref)
    before = registry.make_champion(version, reason)
    try:
        publish_registered(s, version, progress)
    except Exception:
        if before is not None:   # undo: serving and the registry keep agreeing on the champion
            registry.make_champion(before, f"restored: publishing version {version} failed")
        raise
    progress(f"version {version} is champion (was {before}) and published to serving")
    return before, version
