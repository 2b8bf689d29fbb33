"""The training job submitted with spark-submit to a standalone master and worker (`recstream spark up`),
beside the same job run by `recstream train` on local[2]: same code, same kind of registered version."""
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cli import spark_cluster
from models.artifacts import BatchOutputs
from models.registry import CHAMPION, Registry
from tests.integration import namespaces

pytestmark = pytest.mark.integration

# The small generated shop of test_train.py (80 shoppers, 200 products, seed 4), through the command line.
TRAIN = ["train", "--dataset", "shop", "--shop-users", "80", "--shop-products", "200", "--shop-seed", "4",
         "--no-publish"]
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def cluster(stack):
    """The standalone master and worker; stopped afterwards if this fixture started them."""
    started = spark_cluster.up(stack, say=lambda _: None)
    yield stack
    spark_cluster.down(stack, say=lambda _: None, only=started)


def _small(fresh, home: Path, tag: str):
    return fresh(home_dir=home, model_name=f"test-{tag}-{uuid.uuid4().hex[:8]}", als_rank=8, als_iterations=3,
                 ranker_trees=20, ranker_depth=4, spark_master="local[2]", spark_driver_memory="1g")


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(cmd: list[str], proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """(local settings, local run, cluster settings, cluster run, the master's new applications)."""
    def fresh(**overrides):
        return namespaces.make(cluster, **overrides)   # removed at the session's end

    local = _small(fresh, tmp_path_factory.mktemp("local"), "local")
    remote = _small(fresh, tmp_path_factory.mktemp("cluster"), "cluster")
    recstream = str(Path(sys.executable).with_name("recstream"))
    before = {a["id"] for a in spark_cluster.applications(spark_cluster.master_state(cluster))}
    # side by side: each run is mostly a JVM warming up (the fixture took 80 s in a clean-clone run, 98 s in turn)
    local_cmd, cluster_cmd = [recstream, *TRAIN], spark_cluster.submit_command(remote, TRAIN)
    procs = [_start(local_cmd, spark_cluster.submit_env(local)), _start(cluster_cmd, spark_cluster.submit_env(remote))]
    try:
        local_run, cluster_run = _finish(local_cmd, procs[0]), _finish(cluster_cmd, procs[1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    apps = [a for a in spark_cluster.applications(spark_cluster.master_state(cluster)) if a["id"] not in before]
    return local, local_run, remote, cluster_run, apps


def test_spark_up_is_idempotent_and_has_a_worker(cluster):
    assert spark_cluster.up(cluster, say=lambda _: None) == []
    assert spark_cluster.alive_workers(spark_cluster.master_state(cluster)) >= 1
    assert "alive worker" in spark_cluster.status(cluster)["cluster"]


def test_the_submitted_job_ran_on_the_standalone_master(runs):
    _, local_run, _, cluster_run, apps = runs
    assert [(a["name"], a["state"]) for a in apps] == [("recstream-batch", "FINISHED")]
    assert apps[0]["cores"] >= 1
    assert f"Connected to Spark cluster with app ID {apps[0]['id']}" in cluster_run.stderr
    assert "Connected to Spark cluster" not in local_run.stderr


def test_both_runs_register_the_same_kind_of_version(runs, tmp_path):
    local, local_run, remote, cluster_run, _ = runs
    for run in (local_run, cluster_run):
        assert "version 1 registered as champion" in run.stdout, run.stdout[-2000:]
    tags = {}
    outputs = {}
    for s in (local, remote):
        registry = Registry(s.mlflow_tracking_uri, s.model_name)
        assert registry.champion_version() == "1"
        tags[s.model_name] = registry.champion_metrics()
        bundle = registry.download(CHAMPION, tmp_path / s.model_name)
        outputs[s.model_name] = (BatchOutputs.load(bundle / "batch"), {p.name for p in bundle.iterdir()})
    (m_local, m_cluster), (o_local, o_cluster) = tags.values(), outputs.values()
    assert set(m_local) == set(m_cluster) and {"ranker_ndcg_at_8", "faiss_recall_at_200"} <= set(m_cluster)
    for key in ("events", "users", "items", "batch_ratings"):   # the same data, the same window
        assert m_local[key] == m_cluster[key], key
    assert o_local[1] == o_cluster[1]   # the same files in the bundle
    (b_local, _), (b_cluster, _) = o_local, o_cluster
    assert b_local.item_embeddings.ids == b_cluster.item_embeddings.ids
    assert b_local.user_embeddings.ids == b_cluster.user_embeddings.ids
    assert b_cluster.item_embeddings.rank == remote.als_rank
    assert m_cluster["ranker_ndcg_at_8"] > m_cluster["baseline_ndcg_at_8"]
