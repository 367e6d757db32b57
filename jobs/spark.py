"""Spark session from settings: reuse an active session, and own (stop) only one we create."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from importlib import resources
from pathlib import Path

from pyspark import SparkContext
from pyspark.sql import SparkSession

from cbir.cluster import SECRET, Cluster
from cbir.settings import Settings
from cbir.stderr import lines_dropped

# Spark 4 starts every JVM with the incubating Vector API module, and the JVM announces it on stderr as it
# starts; no option stops that. Log4j (conf/log4j2.properties) keeps the rest of Spark's log to errors.
JVM_NOTICE = b"WARNING: Using incubator modules: jdk.incubator.vector\n"


@contextmanager
def spark_session(settings: Settings) -> Iterator[SparkSession]:
    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    spark = build_session(settings)
    try:
        yield spark
    finally:
        spark.stop()


def build_session(settings: Settings, cluster: Cluster | None = None) -> SparkSession:
    """A new session (or the active one) for settings.spark; on the cluster that `cbir cluster start` runs in
    <state_dir>/cluster (or `cluster`, when spark.master is its URL), with that cluster's secret."""
    # Workers must run this interpreter, so they import the same cbir, TensorFlow and Pillow.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    if settings.spark.master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    log_config = f"-Dlog4j.configurationFile=file:{resources.files('conf') / 'log4j2.properties'}"
    builder = (
        SparkSession.builder.master(settings.spark.master)
        .appName("cbir")
        .config("spark.driver.memory", settings.spark.driver_memory)
        .config("spark.driver.extraJavaOptions", log_config)
        .config("spark.ui.enabled", str(settings.spark.ui).lower())
        .config("spark.ui.showConsoleProgress", "false")  # flows report progress themselves
        .config("spark.pyspark.python", sys.executable)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
    )
    builder = executors_configured(builder, settings)
    cluster = cbir_cluster(settings, cluster)
    launching = SparkContext._gateway is None  # this session starts the driver's JVM
    if cluster and not launching:  # the JVM runs: the secret reaches it over py4j, on no command line
        builder = builder.config("spark.authenticate", "true").config(SECRET, cluster.secret())
    for key, value in settings.spark.conf.items():
        builder = builder.config(key, value)
    # A JVM started here (and the Python workers it starts) writes to stderr through the filter for its life.
    with lines_dropped(lambda line: line == JVM_NOTICE, wait=False):
        with submitted_with(cluster.properties) if cluster and launching else nullcontext():
            return builder.getOrCreate()


def cbir_cluster(settings: Settings, cluster: Cluster | None = None) -> Cluster | None:
    """The cluster cbir started (`cluster`, else the one in <state_dir>/cluster) if spark.master names it."""
    cluster = cluster or Cluster.load(Path(settings.state_dir, "cluster"))
    if cluster is None or cluster.url != settings.spark.master or not cluster.properties.exists():
        return None
    return cluster


@contextmanager
def submitted_with(properties: Path) -> Iterator[None]:
    """pyspark starts the driver's JVM with spark-submit: give it the cluster's properties file, since a --conf
    (all of the builder's settings become one) would show the secret on its command line to every local user."""
    before = os.environ.get("PYSPARK_SUBMIT_ARGS")
    submit = f"--properties-file {shlex.quote(str(properties))} --load-spark-defaults"
    os.environ["PYSPARK_SUBMIT_ARGS"] = f"{submit} {before or 'pyspark-shell'}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYSPARK_SUBMIT_ARGS", None)
        else:
            os.environ["PYSPARK_SUBMIT_ARGS"] = before


def executors_configured(builder: SparkSession.Builder, settings: Settings) -> SparkSession.Builder:
    """Executor size from settings; spark.conf.* (applied after) may override any of it."""
    spark = settings.spark
    builder = (
        builder.config("spark.executor.memory", spark.executor_memory)
        .config("spark.task.cpus", str(spark.task_cpus))
        .config("spark.python.worker.reuse", str(spark.python_worker_reuse).lower())
    )
    if spark.executor_cores:
        builder = builder.config("spark.executor.cores", str(spark.executor_cores))
    if os.environ.get("PYTHONPATH") and not spark.master.startswith("local"):
        # Executors import the driver's cbir, not whatever the worker's environment would find first.
        builder = builder.config("spark.executorEnv.PYTHONPATH", os.environ["PYTHONPATH"])
    return builder


def default_partitions(spark: SparkSession, items: int, configured: int = 0, per_partition: int = 1000) -> int:
    """The configured count, or enough for every core to take several tasks and no task to be huge."""
    if configured:
        return configured
    cores = spark.sparkContext.defaultParallelism
    return max(1, min(items, max(4 * cores, -(-items // per_partition))))
