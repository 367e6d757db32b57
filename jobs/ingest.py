"""Ingest: read, validate and store each image of a source in Spark tasks, then commit its manifest rows.

Stages: reader (driver lists the source) -> skip what the manifest has (driver, so a rerun with
nothing new starts no Spark job) -> probe (tasks read,
fully decode and store each image content-addressed) -> mark duplicates by hash -> write
parts -> commit. Every item gets a row: ok, duplicate or failed with its reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from cbir.images import ImageRejected, Limits, inspect_image, shrink
from cbir.lake import Lake, Table, new_run_id
from cbir.reader import ENTRY_DDL, Entry, Listing, Source, read_bytes, read_entries
from cbir.schemas import MANIFEST
from cbir.settings import S3, Crawl, Settings
from cbir.stats import ImagesSummary, TaskStats
from jobs.crawl.download import Downloader
from jobs.job import StagedCommit
from jobs.lakeio import StagedRun, read_table, stage
from jobs.progress import Report, tracked
from jobs.spark import default_partitions

PROBED = pa.schema(
    [
        MANIFEST.field(name)
        for name in (
            "uri",
            "caption",
            "title",
            "description",
            "tags",
            "source_id",
            "owner",
            "license",
            "taken_at",
            "page_url",
            "image_id",
            "format",
            "width",
            "height",
            "bytes",
            "status",
            "error",
            "reason",
        )
    ]
)


@dataclass
class IngestSummary(ImagesSummary):
    run_id: str
    source: str
    found: int = 0
    skipped: int = 0
    ingested: int = 0
    duplicates: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0
    stored_as: str = "ingested"
    retried_tasks: int = 0

    @property
    def probed(self) -> int:
        return self.ingested + self.duplicates + sum(self.failed.values())

    @property
    def images_per_s(self) -> float:
        return self.probed / self.seconds if self.seconds else 0.0

    def rows(self) -> list[dict]:
        """The summary as (what, count) rows: the printed table and the Prefect artifact."""
        rows = [
            {"what": "found in source", "count": self.found},
            {"what": "skipped (already in manifest)", "count": self.skipped},
            {"what": self.stored_as, "count": self.ingested},
            {"what": "duplicates (same bytes)", "count": self.duplicates},
        ]
        rows += [{"what": f"failed: {reason}", "count": n} for reason, n in sorted(self.failed.items())]
        rows.append({"what": "bytes stored", "count": self.bytes})
        rows.append({"what": "images/s", "count": round(self.images_per_s, 1)})
        rows.append({"what": "tasks retried", "count": self.retried_tasks})
        return rows


@dataclass
class IngestJob(StagedCommit):
    """Store what is new in a source; a Listing (a crawl's finds) is downloaded from the web (jobs.job's shape)."""

    lake: Lake
    settings: Settings
    source: Source | Listing
    retry_failed: bool = False
    kind: str = "ingest"
    steps = {"plan": "list new items", "work": "store images", "commit": "commit"}

    def describe(self) -> str:
        return f"{self.kind} {self.source.uri}"

    def plan(self) -> tuple[IngestSummary, list[Entry], Table]:
        return plan(self.lake, self.source, self.retry_failed)

    def has_work(self, planned) -> bool:
        return bool(planned[1])

    def work(self, spark: SparkSession, planned, progress: Report | None) -> StagedRun:
        summary, entries, manifest = planned
        return store(spark, self.lake, self.settings, self.source, entries, manifest, summary.run_id, progress)

    def tally(self, planned, staged: StagedRun | None) -> IngestSummary:
        return tally(planned[0], staged)


def plan(lake: Lake, source: Source | Listing, retry_failed: bool = False) -> tuple[IngestSummary, list[Entry], Table]:
    """The run's summary, begun, the entries to store (each uri once, none that the manifest has), and the
    manifest's handle that read it: the run commits through it, so uris another run committed since are dropped."""
    web = isinstance(source, Listing)
    summary = IngestSummary(new_run_id(), source.uri, stored_as="downloaded" if web else "ingested")
    entries = list(source.entries if web else read_entries(source))
    summary.found = len(entries)
    unique: dict[str, Entry] = {}
    for entry in entries:  # a uri listed twice counts once, with its first row
        unique.setdefault(entry.uri, entry)
    manifest = lake.table("manifest")
    return summary, _not_in_manifest(list(unique.values()), manifest, retry_failed), manifest


def store(
    spark: SparkSession,
    lake: Lake,
    settings: Settings,
    source: Source | Listing,
    entries: list[Entry],
    table: Table,
    run_id: str,
    progress: Report | None = None,
) -> StagedRun:
    """Probe and store the entries in Spark tasks; their manifest rows are staged, to commit through `table`."""
    web = isinstance(source, Listing)
    known = read_table(spark, table, ["image_id", "status"])
    rows = _probed_rows(spark, entries, known, lake, settings, settings.crawl if web else None)
    rows = rows.select(
        *PROBED.names,
        F.lit(source.uri).alias("source"),
        F.lit(datetime.now(UTC)).alias("ingested_at"),
        F.lit(run_id).alias("run_id"),
    )
    with tracked(spark, f"ingest {source.uri}", progress) as jobs:
        staged = stage(
            rows, {table.name: table}, run_id, _tally_batches, manifest={"job": "ingest", "source": source.uri}
        )
    staged.stats.counts["retried_tasks"] += jobs.retried_tasks
    return staged


def tally(summary: IngestSummary, staged: StagedRun | None) -> IngestSummary:
    """The summary, completed from the run's stats (None: nothing was new)."""
    if staged:
        stats = staged.stats
        summary.bytes = stats.counts["bytes"]
        summary.ingested, summary.duplicates = stats.status["ok"], stats.status["duplicate"]
        summary.failed = dict(stats.failed)
        summary.retried_tasks = stats.counts["retried_tasks"]
    summary.skipped = summary.found - summary.probed
    summary.stop()
    return summary


def _not_in_manifest(entries: list[Entry], table: Table, retry_failed: bool) -> list[Entry]:
    """Entries whose uri and source id the manifest has not seen (with retry_failed, failed rows are not seen)."""
    known = table.read(["uri", "source_id", "status"])
    if retry_failed:
        known = known.filter(pc.field("status") != "failed")
    seen = pc.or_(
        pc.is_in(pa.array([e.uri for e in entries], pa.string()), value_set=known["uri"], skip_nulls=True),
        pc.is_in(pa.array([e.source_id for e in entries], pa.string()), value_set=known["source_id"], skip_nulls=True),
    )
    return [entry for entry, old in zip(entries, seen.to_pylist()) if not old]


def _probed_rows(
    spark, entries: list[Entry], known: DataFrame, lake: Lake, settings: Settings, crawl: Crawl | None
) -> DataFrame:
    """The entries probed (read, checked, stored) in tasks, with duplicates of stored images marked."""
    new = spark.createDataFrame(entries, ENTRY_DDL)
    partitions = default_partitions(spark, len(entries), settings.spark.partitions)
    limits = Limits.from_settings(settings.ingest)
    if crawl:
        probe = partial(
            probe_partition,
            lake,
            limits,
            settings.s3,
            crawl.concurrency,
            crawl=crawl,
            parallel_tasks=spark.sparkContext.defaultParallelism,
        )
    else:
        probe = partial(probe_partition, lake, limits, settings.s3, settings.ingest.threads)
    probed = new.repartition(partitions).mapInArrow(probe, from_arrow_schema(PROBED))
    return mark_duplicates(probed, known)


def mark_duplicates(probed: DataFrame, known: DataFrame) -> DataFrame:
    """An ok image whose bytes are already stored, or stored by an earlier uri of this run, is a duplicate."""
    stored = known.where(F.col("status") == "ok").select("image_id").distinct().withColumn("_stored", F.lit(True))
    first = F.row_number().over(Window.partitionBy("image_id").orderBy("uri"))
    duplicate = (F.col("status") == "ok") & (F.col("_stored").isNotNull() | (first > 1))
    return (
        probed.join(stored, "image_id", "left")
        .withColumn("status", F.when(duplicate, F.lit("duplicate")).otherwise(F.col("status")))
        .drop("_stored")
    )


def _tally_batches(batches: Iterator[pa.RecordBatch]):
    for batch in batches:
        yield "manifest", batch
        yield _count_statuses(batch)


def _count_statuses(batch: pa.RecordBatch) -> TaskStats:
    statuses = batch.column("status").to_pylist()
    stats = TaskStats()
    stats.status.update(s for s in statuses if s != "failed")
    stats.failed.update(r for s, r in zip(statuses, batch.column("reason").to_pylist()) if s == "failed")
    stats.counts["bytes"] = sum(b for s, b in zip(statuses, batch.column("bytes").to_pylist()) if s == "ok")
    return stats


# Executor side.
def probe_partition(
    lake: Lake | None,
    limits: Limits,
    s3: S3,
    threads: int,
    batches: Iterator[pa.RecordBatch],
    crawl: Crawl | None = None,
    parallel_tasks: int = 1,
):
    """Check (and, given a lake, store) each entry of the partition; threads overlap the reads.

    With crawl settings, http(s) entries are downloaded (one Downloader per task) and stored
    copies are shrunk to crawl.resize when that is set.
    """
    filesystems: dict[str, pafs.FileSystem | Downloader] = {}
    if crawl:
        filesystems["web"] = Downloader(crawl, limits.max_bytes, parallel_tasks)
    resize = crawl.resize if crawl else 0
    with ThreadPoolExecutor(threads) as pool:
        for batch in batches:
            rows = pool.map(partial(probe, lake, limits, s3, filesystems, resize=resize), batch.to_pylist())
            yield pa.RecordBatch.from_pylist(list(rows), schema=PROBED)


def probe(lake: Lake | None, limits: Limits, s3: S3, filesystems: dict, entry: dict, resize: int = 0) -> dict:
    """One item -> its manifest fields. Item problems become a failed row; lake problems fail the task."""
    row = {name: entry.get(name) for name in PROBED.names}
    if entry["error"]:
        return {**row, "status": "failed"}
    try:
        data = read_bytes(entry["uri"], s3, filesystems, limits.max_bytes)
        row["bytes"] = len(data) if len(data) <= limits.max_bytes else None  # only max + 1 were read
        info = inspect_image(data, limits)
        if resize and max(info.width, info.height) > resize:
            data = shrink(data, resize)
            row["bytes"], info = len(data), inspect_image(data, limits)
    except ImageRejected as exc:
        return {**row, "status": "failed", "error": str(exc), "reason": exc.reason}
    if lake is not None:
        lake.put_image(info.image_id, info.format, data)
    return {
        **row,
        "image_id": info.image_id,
        "format": info.format,
        "width": info.width,
        "height": info.height,
        "status": "ok",
        "error": None,
        "reason": None,
    }
