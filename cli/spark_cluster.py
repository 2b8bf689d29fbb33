"""A standalone Spark cluster on loopback (one master, one worker): start, stop, status; and spark-submit to it.

The pyspark wheel ships bin/spark-class and bin/spark-submit but not sbin/start-master.sh, so the
master and the worker run in the foreground under spark-class, as the other local services do:
pid files and logs under RECSTREAM_HOME_DIR (cli/services.py's Service). The training job
needs no change to run there: `cli/submit.py` is the `recstream` command as a spark-submit entry
point, and under spark-submit `batch.spark.session` takes the master from spark-submit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from cli.services import REPO_ROOT, Service, port_open, wait_for
from recstream.settings import PREFIX, Settings

HOST = "127.0.0.1"
ENTRY_POINT = REPO_ROOT / "cli" / "submit.py"
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
DAEMON_MEMORY = "512m"   # heap of the master and worker daemons themselves (Spark's default: 1g each)
READY_TIMEOUT_S = 90


def spark_home() -> Path:
    """The Spark that pyspark ships (its jars and bin/), found as pyspark's own scripts find it."""
    from pyspark.find_spark_home import _find_spark_home

    return Path(_find_spark_home())


def master_url(s: Settings) -> str:
    return f"spark://{HOST}:{s.spark_master_port}"


def webui_url(s: Settings) -> str:
    return f"http://{HOST}:{s.spark_master_webui_port}"


def services(s: Settings) -> tuple[Service, Service]:
    """(master, worker): the worker is checked on its web UI port (its RPC port is ephemeral)."""
    return (Service("spark-master", s.spark_master_port, s.home_dir),
            Service("spark-worker", s.spark_worker_webui_port, s.home_dir))


# -- the master's state ---------------------------------------------------------------------------

def master_state(s: Settings, timeout_s: float = 2.0) -> dict | None:
    """The master's JSON (workers, applications), None when no master answers on the web UI port."""
    try:
        with urllib.request.urlopen(f"{webui_url(s)}/json/", timeout=timeout_s) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def alive_workers(state: dict | None) -> int:
    """Workers registered and alive. Spark's JSON counts them in `aliveworkers`; older masters
    only list `workers` with a `state`."""
    if not state:
        return 0
    if "aliveworkers" in state:
        return int(state["aliveworkers"])
    return sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE")


def applications(state: dict | None) -> list[dict]:
    """Every application the master knows, running and completed, oldest first."""
    if not state:
        return []
    apps = list(state.get("activeapps", [])) + list(state.get("completedapps", []))
    return sorted(apps, key=lambda a: a.get("starttime", 0))


# -- start, stop, status --------------------------------------------------------------------------

def daemon_env(s: Settings) -> dict[str, str]:
    """The environment of spark-class: loopback only, small daemon heaps, old application folders cleaned."""
    return {"SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": HOST, "SPARK_DAEMON_MEMORY": DAEMON_MEMORY,
            "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false",   # no REST submission server (port 6066)
            "SPARK_WORKER_OPTS": "-Dspark.worker.cleanup.enabled=true -Dspark.worker.cleanup.appDataTtl=86400"}


def up(s: Settings, say: Callable[[str], None] = print) -> list[str]:
    """Start the master and one worker unless they run; return once a worker has registered.
    Returns the names of the processes it started (empty when the cluster was already up)."""
    master, worker = services(s)
    spark_class = str(spark_home() / "bin" / "spark-class")
    started: list[str] = []
    if port_open(s.spark_master_port):
        say(f"spark-master: already listening on {s.spark_master_port}")
    else:
        pid = master.spawn([spark_class, MASTER_CLASS, "--host", HOST, "--port", str(s.spark_master_port),
                            "--webui-port", str(s.spark_master_webui_port)], env=daemon_env(s))
        started.append(master.name)
        say(f"spark-master: started pid {pid}, waiting for {webui_url(s)}/json/ ...")
    wait_for("spark-master", lambda: master_state(s) is not None, READY_TIMEOUT_S, master.log_file)
    if alive_workers(master_state(s)) == 0:
        if worker.own_pid() is None:
            work = (s.home_dir / "spark" / "work").resolve()
            work.mkdir(parents=True, exist_ok=True)
            pid = worker.spawn([spark_class, WORKER_CLASS, master_url(s), "--host", HOST,
                                "--cores", str(s.spark_worker_cores), "--memory", s.spark_worker_memory,
                                "--webui-port", str(s.spark_worker_webui_port), "--work-dir", str(work)],
                               env=daemon_env(s))
            started.append(worker.name)
            say(f"spark-worker: started pid {pid} ({s.spark_worker_cores} cores, {s.spark_worker_memory}), "
                f"waiting for it to register ...")
        wait_for("spark-worker registered with the master", lambda: alive_workers(master_state(s)) >= 1,
                 READY_TIMEOUT_S, worker.log_file)
    state = master_state(s) or {}
    say(f"spark: {master_url(s)} ready, {alive_workers(state)} alive worker(s), {state.get('cores', '?')} cores "
        f"(web UI {webui_url(s)})")
    return started


def down(s: Settings, say: Callable[[str], None] = print, only: Sequence[str] | None = None) -> None:
    """Stop the worker, then the master; only the ones `up` started (pid files), and of those only
    the names in `only` when given (what one `up` call returned)."""
    for svc in reversed(services(s)):
        if only is None or svc.name in only:
            say(f"{svc.name}: {'stopped' if svc.stop() else 'not started by us, left alone'}")


def status(s: Settings) -> dict[str, str]:
    master, worker = services(s)
    state = master_state(s)
    info = {master.name: master.status(), worker.name: worker.status()}
    if state is not None:
        info["cluster"] = (f"{master_url(s)}: {alive_workers(state)} alive worker(s), "
                           f"{len(state.get('activeapps', []))} running and "
                           f"{len(state.get('completedapps', []))} completed application(s)")
    return info


# -- spark-submit ---------------------------------------------------------------------------------

def settings_env(s: Settings) -> dict[str, str]:
    """Settings as RECSTREAM_* variables, so a process started by spark-submit loads the same ones."""
    def text(v: object) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)
    return {PREFIX + f.name.upper(): text(getattr(s, f.name)) for f in dataclasses.fields(s)}


def _shuffle_partitions(s: Settings, master: str) -> int:
    """One shuffle partition per core, as `batch.spark.session` sets locally (Spark's default, 200,
    launches 200 tasks for every small stage)."""
    from batch.spark import local_cores

    cores = local_cores(master)
    return cores if cores is not None else s.spark_worker_cores


def submit_command(s: Settings, args: Sequence[str], master: str | None = None,
                   entry: Path = ENTRY_POINT) -> list[str]:
    """spark-submit of `entry` (by default the `recstream` command, e.g. args ["train", ...]) to
    `master` (by default the local standalone cluster). The driver and the executors' Python is
    this interpreter (the venv, where the project is installed); executors here share the machine."""
    master = master or master_url(s)
    cmd = [str(spark_home() / "bin" / "spark-submit"), "--master", master,
           "--driver-memory", s.spark_driver_memory,
           "--conf", f"spark.sql.shuffle.partitions={_shuffle_partitions(s, master)}",
           "--conf", f"spark.pyspark.python={sys.executable}",
           "--conf", f"spark.pyspark.driver.python={sys.executable}"]
    if master.startswith("spark://"):
        cmd += ["--executor-memory", s.spark_worker_memory]
    return cmd + [str(entry), *args]


def submit_env(s: Settings) -> dict[str, str]:
    """The environment of spark-submit: this one, the settings of `s`, loopback, this Python."""
    return {**os.environ, **settings_env(s), "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": HOST,
            "PYSPARK_PYTHON": sys.executable}

