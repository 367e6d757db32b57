"""What every flow does around its job: settings, the checked lake, and the job run the one way (run_job).

A flow's stages are Prefect tasks (`stage`), so a run's timeline shows where the time went and
which stage failed. Stages pass Spark sessions, lakes and staged runs, which Prefect can neither
hash nor store: stage tasks have no cache policy, and their results stay in memory. Large inputs (a
source's entries, a data set's rows) are passed in `quote()`, so Prefect does not walk every item.

A flow is declared with this module's `flow`: its `settings` argument (the CLI's, the demo's to its
steps, a test's) is Python's alone, never a parameter Prefect records for the run, so no setting, and
no secret among them (S3 keys, spark.conf's), reaches Prefect's database or UI; without one, a flow
loads its settings from the environment of the process that runs it, as served runs do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from prefect import Flow, task
from prefect.cache_policies import NONE
from prefect.utilities.annotations import quote
from pyspark.sql import SparkSession

from cbir.lake import Lake
from cbir.settings import Settings, load_settings
from flows.reporting import Progress
from jobs.job import Job, S
from jobs.job import run as jobs_run
from jobs.spark import spark_session

# @stage(name=...) or stage(job_function, name=...): a task whose inputs are not hashed and whose result is not stored.
stage = partial(task, cache_policy=NONE, persist_result=False)
NOT_RECORDED = "settings"  # the one argument Prefect is never given to record


class CbirFlow(Flow):
    """A Prefect flow whose `settings` argument is left out of what Prefect records for a run (the run's
    parameters, in its database and UI); the flow itself still receives it."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return super().serialize_parameters({k: v for k, v in parameters.items() if k != NOT_RECORDED})

    def with_options(self, **options: Any) -> CbirFlow:
        copy = super().with_options(**options)
        copy.__class__ = CbirFlow  # Prefect builds a plain Flow
        return copy


def flow(**options: Any) -> Callable[[Callable], CbirFlow]:
    """@flow(name=..., ...), Prefect's options: a CbirFlow."""
    return lambda fn: CbirFlow(fn, **options)


def open_lake(settings: Settings | None) -> tuple[Settings, Lake]:
    """The settings (loaded from the environment when not given) and their lake, checked."""
    settings = settings or load_settings()
    lake = Lake.open(settings)
    lake.check()
    return settings, lake


@contextmanager
def spark_job(settings: Settings, kind: str, description: str) -> Iterator[tuple[SparkSession, Progress]]:
    """A Spark session and the `<kind>-progress` artifact, finished when the block ends well."""
    progress = Progress(f"{kind}-progress", description)
    with spark_session(settings) as spark:
        yield spark, progress
    progress.finish()


def run_job(job: Job[Any, Any, S], settings: Settings) -> S:
    """A job of jobs.job's shape, its plan, work and commit as tasks (the commit retried), with a Spark session
    and the `<kind>-progress` artifact only when there is work."""

    def as_task(name: str, function: Callable, *args, retries: int = 0):
        task_of = stage(function, name=name, retries=retries, retry_delay_seconds=5)
        return task_of(*(quote(arg) for arg in args))

    return jobs_run(job, partial(spark_job, settings, job.kind, job.describe()), as_task)
