"""One shape for every pipeline job: plan (the driver finds what to do) -> work (Spark tasks stage the run's
parts) -> commit (publish them at once; idempotent, so it may be retried) -> tally (the run's summary).

`run` runs any job the same way, for the flows, the tests and the benchmarks alike. A flow passes `step`,
which makes plan, work and commit Prefect tasks (flows.common.run_job), and a `spark` factory that opens
its session, with the progress artifact, only when there is work; a test passes its session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Generic, Protocol, TypeVar

from pyspark.sql import SparkSession

from jobs.progress import Report

P = TypeVar("P")  # what plan found
W = TypeVar("W")  # what work staged
S = TypeVar("S", covariant=True)  # the summary


class Job(Protocol, Generic[P, W, S]):
    kind: str  # ingest, crawl, index, train, query, eval: the name of its artifacts
    steps: dict[str, str]  # plan, work, commit: the names its steps show in a flow run

    def describe(self) -> str: ...

    def plan(self) -> P: ...

    def has_work(self, plan: P) -> bool: ...

    def work(self, spark: SparkSession, plan: P, progress: Report | None) -> W: ...

    def commit(self, work: W) -> None: ...

    def abort(self, work: W) -> None: ...

    def tally(self, plan: P, work: W | None) -> S: ...


class StagedCommit:
    """commit and abort for a job whose work stages a jobs.lakeio.StagedRun."""

    def commit(self, staged) -> None:
        staged.commit()

    def abort(self, staged) -> None:
        staged.abort()


Step = Callable[..., Any]  # step(name, function, *args, retries=N) -> function(*args)
Sessions = Callable[[], AbstractContextManager[tuple[SparkSession, Report | None]]]


def direct(name: str, function: Callable, *args, retries: int = 0):
    """A step run as it is."""
    return function(*args)


def run(job: Job[P, W, S], spark: SparkSession | Sessions | None, step: Step = direct) -> S:
    """Plan; when there is work, do it in Spark and commit it (a commit that fails for good drops the
    run's parts); then tally. `spark`: a session, or a factory of (session, progress) opened only for work."""
    planned = step(job.steps["plan"], job.plan)
    done = None
    if job.has_work(planned):
        with _sessions(spark) as (session, progress):
            done = step(job.steps["work"], job.work, session, planned, progress)
        try:
            step(job.steps["commit"], job.commit, done, retries=2)
        except BaseException:
            job.abort(done)
            raise
    return job.tally(planned, done)


def _sessions(spark: SparkSession | Sessions | None) -> AbstractContextManager:
    if spark is None or isinstance(spark, SparkSession):
        return _given(spark)
    return spark()


@contextmanager
def _given(spark: SparkSession | None) -> Iterator[tuple[SparkSession | None, None]]:
    yield spark, None
