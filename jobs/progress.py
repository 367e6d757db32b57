"""Progress of a running Spark job, polled from the driver's status tracker (finished / all tasks)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pyspark.sql import SparkSession

Report = Callable[[int, int], None]


@contextmanager
def tracked(spark: SparkSession, description: str, report: Report | None, interval_s: float = 1.0) -> Iterator[None]:
    """Run the block's Spark jobs in their own job group and report (done, total) tasks while they run."""
    sc = spark.sparkContext
    group = f"cbir-{uuid.uuid4().hex[:8]}"
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
        yield
    finally:
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
