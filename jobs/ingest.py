"""Ingest: read, validate and store each image of a source in Spark tasks, then commit its manifest rows.

Stages: reader (driver lists the source) -> skip what the manifest has (driver, so a rerun with
nothing new starts no Spark job) -> probe (tasks read,
fully decode and store each image content-addressed) -> mark duplicates by hash -> write
parts -> commit. Every item gets a row: ok, duplicate or failed with its reason.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from cbir.images import ImageRejected, Limits, inspect_image, shrink
from cbir.lake import Lake, Table, new_run_id, open_filesystem
from cbir.schemas import MANIFEST
from cbir.settings import S3, Crawl, Settings
from jobs.download import Downloader
from jobs.lakeio import read_table, write_run
from jobs.progress import Report, tracked
from jobs.reader import ENTRY_DDL, Entry, Listing, Source, read_entries
from jobs.spark import default_partitions

PROBED = pa.schema([MANIFEST.field(name) for name in (
    "uri", "caption", "title", "description", "tags", "source_id", "owner", "license", "taken_at", "page_url",
    "image_id", "format", "width", "height", "bytes", "status", "error")])


@dataclass
class IngestSummary:
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
        return rows

    def as_dict(self) -> dict:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 2)}


def run(
    spark: SparkSession,
    lake: Lake,
    settings: Settings,
    source: Source | Listing,
    *,
    retry_failed: bool = False,
    progress: Report | None = None,
) -> IngestSummary:
    """Store what is new in SOURCE; a Listing (a crawl's finds) is downloaded from the web."""
    started, run_id = time.monotonic(), new_run_id()
    web = isinstance(source, Listing)
    summary = IngestSummary(run_id, source.uri, stored_as="downloaded" if web else "ingested")
    entries = list(source.entries if web else read_entries(source))
    summary.found = len(entries)
    unique: dict[str, Entry] = {}
    for entry in entries:  # a uri listed twice counts once, with its first row
        unique.setdefault(entry.uri, entry)
    entries = list(unique.values())
    table = lake.table("manifest")
    entries = _not_in_manifest(entries, table, retry_failed)
    if entries:
        known = read_table(spark, table, ["image_id", "status"])
        rows = _probed_rows(spark, entries, known, lake, settings, settings.crawl if web else None)
        rows = rows.select(
            *PROBED.names,
            F.lit(source.uri).alias("source"),
            F.lit(datetime.now(timezone.utc)).alias("ingested_at"),
            F.lit(run_id).alias("run_id"),
        )
        try:
            with tracked(spark, f"ingest {source.uri}", progress):
                parts, counts = write_run(rows, table, run_id, count=_count_statuses)
            table.commit(run_id, parts, job="ingest", source=source.uri)
        except BaseException:
            table.abort(run_id)
            raise
        summary.bytes = counts.pop("bytes", 0)
        summary.ingested, summary.duplicates = counts.pop("ok", 0), counts.pop("duplicate", 0)
        summary.failed = {k.removeprefix("failed:"): n for k, n in counts.items() if k.startswith("failed:")}
    summary.skipped = summary.found - summary.probed
    summary.seconds = time.monotonic() - started
    return summary


def _not_in_manifest(entries: list[Entry], table: Table, retry_failed: bool) -> list[Entry]:
    """Entries whose uri and source id the manifest has not seen (with retry_failed, failed rows are not seen)."""
    known = table.read(["uri", "source_id", "status"])
    if retry_failed:
        known = known.filter(pc.field("status") != "failed")
    seen = pc.or_(
        pc.is_in(pa.array([e.uri for e in entries], pa.string()), value_set=known["uri"], skip_nulls=True),
        pc.is_in(pa.array([e.source_id for e in entries], pa.string()), value_set=known["source_id"], skip_nulls=True))
    return [entry for entry, old in zip(entries, seen.to_pylist()) if not old]


def _probed_rows(spark, entries: list[Entry], known: DataFrame, lake: Lake, settings: Settings,
                 crawl: Crawl | None) -> DataFrame:
    """The entries probed (read, checked, stored) in tasks, with duplicates of stored images marked."""
    new = spark.createDataFrame(entries, ENTRY_DDL)
    partitions = default_partitions(spark, len(entries), settings.spark.partitions)
    limits = Limits.from_settings(settings.ingest)
    if crawl:
        probe = partial(probe_partition, lake, limits, settings.s3, crawl.concurrency, crawl=crawl,
                        parallel_tasks=spark.sparkContext.defaultParallelism)
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


def _count_statuses(batch: pa.RecordBatch) -> Counter:
    statuses = batch.column("status").to_pylist()
    errors = batch.column("error").to_pylist()
    counts = Counter(s if s != "failed" else f"failed:{(e or '').split(':')[0]}" for s, e in zip(statuses, errors))
    counts["bytes"] = sum(b for s, b in zip(statuses, batch.column("bytes").to_pylist()) if s == "ok")
    return counts


# Executor side.
def probe_partition(lake: Lake | None, limits: Limits, s3: S3, threads: int, batches: Iterator[pa.RecordBatch],
                    crawl: Crawl | None = None, parallel_tasks: int = 1):
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
        return {**row, "status": "failed", "error": str(exc)}
    if lake is not None:
        lake.put_image(info.image_id, info.format, data)
    return {**row, "image_id": info.image_id, "format": info.format, "width": info.width,
            "height": info.height, "status": "ok", "error": None}


def read_bytes(uri: str, s3: S3, filesystems: dict, max_bytes: int) -> bytes:
    """At most max_bytes + 1 bytes of the item (enough to know it is too large)."""
    if uri.startswith(("http://", "https://")):
        if "web" not in filesystems:
            raise ImageRejected("unsupported-uri", "web addresses are fetched with `cbir crawl urls`")
        return filesystems["web"].fetch(uri)
    scheme = "s3" if uri.startswith("s3://") else "local"
    if scheme not in filesystems:  # one filesystem per task, shared by its threads
        filesystems[scheme] = open_filesystem(uri, s3)[0]
    fs = filesystems[scheme]
    path = uri.removeprefix("s3://")
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageRejected("not-found", "no such file") from None
    except OSError as exc:
        raise ImageRejected("unreadable", str(exc).splitlines()[0][:300]) from None
    return data
