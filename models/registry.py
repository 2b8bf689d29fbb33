"""The model registry (MLflow): one versioned bundle per training run, champion/challenger aliases.

A bundle is a folder of plain files (ALS factors, FAISS index, ranker, content model, feature
list, metrics, data window) logged as the artifacts of one run and registered as one version of
one model. Aliases, not the deprecated stages: `champion` is what serving loads, `challenger` a
newer version that did not pass the promotion rule and is kept for comparison.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

CHAMPION, CHALLENGER = "champion", "challenger"
EXPERIMENT = "recstream-training"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(new: dict[str, float], champion: dict[str, float] | None, metric: str, margin: float,
           same_features: bool = True) -> Decision:
    """Pure promotion rule: the new version becomes champion unless its offline metric is worse
    than the champion's by more than `margin` (a fraction of the champion's value). A champion
    trained on other ranker features than the new version (older code) cannot be served by the
    code that trained the new one, so it is no measure: the new version takes its place."""
    if metric not in new:
        return Decision(False, f"the new version has no {metric} metric")
    if champion is None or metric not in champion:
        return Decision(True, "no champion yet")
    if not same_features:
        return Decision(True, "the champion was trained on other ranker features than this code builds: "
                              "it cannot be served by it")
    floor = champion[metric] * (1 - margin)
    if new[metric] >= floor:
        return Decision(True, f"{metric} {new[metric]:.4f} >= {floor:.4f} (champion {champion[metric]:.4f} - {margin:.0%})")
    return Decision(False, f"{metric} {new[metric]:.4f} < {floor:.4f} (champion {champion[metric]:.4f} - {margin:.0%})")


def features_of(bundle: Path) -> str | None:
    """A fingerprint of the bundle's ranker feature list (features.json; None without one)."""
    path = bundle / "features.json"
    return hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest() if path.exists() else None


def _metrics(tags: dict[str, str]) -> dict[str, float]:
    return {k[len("metric."):]: float(v) for k, v in tags.items() if k.startswith("metric.")}


@dataclass(frozen=True)
class Registered:
    version: str
    run_id: str
    alias: str
    decision: Decision


class Registry:
    def __init__(self, tracking_uri: str, model_name: str):
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        self.name = model_name

    def champion_metrics(self) -> dict[str, float] | None:
        tags = self._champion_tags()
        return None if tags is None else _metrics(tags)

    def _champion_tags(self) -> dict[str, str] | None:
        try:
            return dict(self.client.get_model_version_by_alias(self.name, CHAMPION).tags)
        except MlflowException:
            return None

    def champion_version(self) -> str | None:
        try:
            return self.alias_version(CHAMPION)
        except LookupError:
            return None

    def alias_version(self, alias_or_version: str) -> str:
        """The version number an alias points at (a number is checked to exist); LookupError if none."""
        try:
            if alias_or_version.isdigit():
                return self.client.get_model_version(self.name, alias_or_version).version
            return self.client.get_model_version_by_alias(self.name, alias_or_version).version
        except MlflowException as exc:
            raise LookupError(f"model {self.name!r} has no version or alias {alias_or_version!r}") from exc

    def restore_champion(self, previous: str | None, failed: str) -> None:
        """After `failed` was made champion but could not be published: the champion alias goes back
        to `previous` (removed if there was none) and `failed` becomes the challenger."""
        if previous is None:
            self.client.delete_registered_model_alias(self.name, CHAMPION)
        else:
            self.client.set_registered_model_alias(self.name, CHAMPION, previous)
        self.client.set_registered_model_alias(self.name, CHALLENGER, failed)
        self.client.set_model_version_tag(self.name, failed, "promotion", "publishing failed; not served")

    def make_champion(self, version: str, reason: str) -> str | None:
        """Point the champion alias at `version` (A/B promotion); returns the version it pointed at before."""
        before = self.champion_version()
        self.client.set_registered_model_alias(self.name, CHAMPION, version)
        self.client.set_model_version_tag(self.name, version, "promotion", reason[:500])
        return before

    def register(self, bundle: Path, metrics: dict[str, float], params: dict[str, object], metric: str,
                 margin: float) -> Registered:
        """Log the bundle as one run, register it as a new version (tagged with its metrics and its feature
        list's fingerprint), and set its alias by `decide`."""
        mlflow.set_experiment(EXPERIMENT)
        tags = self._champion_tags()
        features = features_of(bundle)
        decision = decide(metrics, None if tags is None else _metrics(tags), metric, margin,
                          same_features=tags is None or tags.get("features") == features)
        with mlflow.start_run() as run:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_metrics(metrics)
            mlflow.log_artifacts(str(bundle), artifact_path="bundle")
            mlflow.set_tag("promotion", decision.reason)
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name, description="recstream bundle: ALS, FAISS, ranker, content model")
        mv = self.client.create_model_version(self.name, source=f"{run.info.artifact_uri}/bundle", run_id=run.info.run_id,
                                              tags={**{f"metric.{k}": str(v) for k, v in metrics.items()},
                                                    "promotion": decision.reason,
                                                    **({"features": features} if features else {})})
        alias = CHAMPION if decision.promote else CHALLENGER
        self.client.set_registered_model_alias(self.name, alias, mv.version)
        return Registered(mv.version, run.info.run_id, alias, decision)

    def download(self, alias_or_version: str, dest: Path) -> Path:
        """The bundle of `models:/name@alias` (or a version number) as a local folder."""
        uri = (f"models:/{self.name}/{alias_or_version}" if alias_or_version.isdigit()
               else f"models:/{self.name}@{alias_or_version}")
        dest.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # not in agents' logs
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def write_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
