"""Progress of a running Spark job, polled from the driver's status tracker (finished / all tasks)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyspark.sql import SparkSession

Report = Callable[[int, int], None]


@dataclass
class Tracked:
    """What the status tracker saw of a block's jobs, once it has ended."""

    group: str
    retried_tasks: int = 0


@contextmanager
def tracked(spark: SparkSession, description: str, report: Report | None, interval_s: float = 1.0) -> Iterator[Tracked]:
    """Run the block's Spark jobs in their own job group and report (done, total) tasks while they run."""
    sc = spark.sparkContext
    group = f"cbir-{uuid.uuid4().hex[:8]}"
    record = Tracked(group)
    sc.setJobGroup(group, description)
    stop = threading.Event()

    def poll() -> None:
        last = None
        while not stop.wait(interval_s):
            counts = task_counts(sc, group)
            if counts[1] and counts != last:
                report(*counts)
                last = counts

    poller = threading.Thread(target=poll, name="spark-progress", daemon=True)
    if report:
        poller.start()
    try:
        yield record
    finally:
        record.retried_tasks = retried_tasks(sc, group)
        stop.set()
        if report:
            poller.join()
        sc.setLocalProperty("spark.jobGroup.id", None)


def task_counts(sc, group: str) -> tuple[int, int]:
    tracker = sc.statusTracker()
    done = total = 0
    for job_id in tracker.getJobIdsForGroup(group):
        job = tracker.getJobInfo(job_id)
        for stage_id in job.stageIds if job else []:
            stage = tracker.getStageInfo(stage_id)
            if stage:
                done += stage.numCompletedTasks
                total += stage.numTasks
    return done, total


def retried_tasks(sc, group: str) -> int:
    """Tasks run again: failed attempts (a lost executor's running tasks, a crashed Python worker) and the
    tasks of resubmitted stage attempts (a lost executor's shuffle output is computed again). The tracker
    keeps each stage's last attempt, whose failures and, if it is a resubmission, completed tasks count."""
    tracker = sc.statusTracker()
    retried = 0
    for job_id in tracker.getJobIdsForGroup(group):
        job = tracker.getJobInfo(job_id)
        for stage_id in job.stageIds if job else []:
            stage = tracker.getStageInfo(stage_id)
            if stage:
                retried += stage.numFailedTasks + (stage.numCompletedTasks if stage.currentAttemptId else 0)
    return retried
