"""The standalone cluster's pure helpers: reading the master's JSON, the spark-submit command line."""
import sys
from pathlib import Path

import pytest

from cli import spark_cluster
from recstream.settings import Settings, load


@pytest.mark.parametrize("state, alive", [
    (None, 0),
    ({}, 0),
    ({"aliveworkers": 2, "workers": [{"state": "ALIVE"}]}, 2),
    ({"workers": [{"state": "ALIVE"}, {"state": "DEAD"}]}, 1),
])
def test_alive_workers(state, alive):
    assert spark_cluster.alive_workers(state) == alive


def test_applications_running_and_completed_oldest_first():
    state = {"activeapps": [{"id": "b", "starttime": 2}], "completedapps": [{"id": "a", "starttime": 1}]}
    assert [a["id"] for a in spark_cluster.applications(state)] == ["a", "b"]
    assert spark_cluster.applications(None) == []


def test_settings_travel_to_the_submitted_driver_unchanged():
    s = Settings(home_dir=Path("/tmp/x"), als_rank=8, model_name="m1", ranker_target_share=0.25)
    env = spark_cluster.settings_env(s)
    assert load(env) == s


@pytest.mark.parametrize("master, partitions, executor_memory", [
    (None, "2", True),                  # the local standalone cluster: the worker's cores
    ("spark://10.0.0.5:7077", "2", True),
    ("local[3]", "3", False),
])
def test_submit_command(master, partitions, executor_memory):
    s = Settings(spark_worker_cores=2, spark_worker_memory="3g", spark_driver_memory="1g")
    cmd = spark_cluster.submit_command(s, ["train", "--dataset", "shop"], master=master)
    assert Path(cmd[0]).name == "spark-submit"
    assert cmd[cmd.index("--master") + 1] == (master or "spark://127.0.0.1:7077")
    assert cmd[cmd.index("--driver-memory") + 1] == "1g"
    assert f"spark.sql.shuffle.partitions={partitions}" in cmd
    assert f"spark.pyspark.python={sys.executable}" in cmd
    assert ("--executor-memory" in cmd) == executor_memory
    assert cmd[-4:] == [str(spark_cluster.ENTRY_POINT), "train", "--dataset", "shop"]
