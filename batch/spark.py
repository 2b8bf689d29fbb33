"""The SparkSession of the batch layer, built from Settings (master, driver memory, small local shuffles, no UI)."""
from __future__ import annotations

import os
import re

from pyspark.sql import SparkSession

from recstream.settings import Settings

APP_NAME = "recstream-batch"


def local_cores(master: str) -> int | None:
    """Worker threads of a local master (local, local[4], local[*], local[2,3]); None for a cluster."""
    m = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", master.strip())
    if m is None:
        return None
    n = m.group(1)
    return (os.cpu_count() or 1) if n == "*" else int(n or 1)


def under_spark_submit() -> bool:
    """True when spark-submit started this driver: it then owns the master and the driver's JVM size.

    spark-submit hands the running JVM gateway to Python through this variable (pyspark/java_gateway.py)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def session(s: Settings, app_name: str = APP_NAME) -> SparkSession:
    """Get or create the session. Locally: s.spark_master, s.spark_driver_memory, shuffle partitions = cores
    (the default, 200, makes every small stage launch 200 tasks), bound to loopback. Under spark-submit,
    its --master and --driver-memory win (a builder setting would silently override the command line),
    and shuffle partitions stay with the cluster's configuration (adaptive execution coalesces them)."""
    builder = (SparkSession.builder.appName(app_name)
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.session.timeZone", "UTC"))
    # native BLAS (OpenBLAS, scripts/install.sh) one thread per task: Spark runs a task per core already
    builder = builder.config("spark.executorEnv.OPENBLAS_NUM_THREADS", "1")
    if not under_spark_submit():
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # the local JVM (driver and executor) inherits it
        builder = builder.master(s.spark_master).config("spark.driver.memory", s.spark_driver_memory)
        cores = local_cores(s.spark_master)
        if cores is not None:
            builder = (builder.config("spark.sql.shuffle.partitions", str(cores))
                       .config("spark.driver.bindAddress", "127.0.0.1")
                       .config("spark.driver.host", "127.0.0.1"))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")  # ALS warns of large task binaries every iteration
    return spark
