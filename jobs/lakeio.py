"""Lake tables in and out of Spark: executors read and write Parquet themselves, the driver commits.

Spark here cannot write s3a:// (no hadoop-aws jar), so, as img2dataset does, each task opens the
lake through pyarrow.fs. Tasks read the files of one Delta table version (listed by the driver);
only file names, row counts, sizes and Delta statistics travel back to the driver, which commits them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import pyarrow as pa
from pyspark import TaskContext
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.pandas.types import from_arrow_schema

from cbir.lake import Table
from cbir.parts import Part
from cbir.stats import TaskStats

PARTS_DDL = "table string, file string, rows long, size long, stats string, counts string"


def read_table(spark: SparkSession, table: Table, columns: list[str]) -> DataFrame:
    """The rows of a lake table's version (pinned by the handle) as a DataFrame, read by the executors."""
    schema = pa.schema([_spark_field(table.schema.field(name)) for name in columns])
    files = table.files()
    if not files:
        return spark.createDataFrame([], from_arrow_schema(schema))
    paths = spark.createDataFrame([(f,) for f in files], "path string")
    paths = paths.repartition(min(len(files), spark.sparkContext.defaultParallelism * 4))
    return paths.mapInArrow(partial(_read_files, table, schema), from_arrow_schema(schema))


def _spark_field(field: pa.Field) -> pa.Field:
    """Spark has no float16 and no fixed-size lists: vectors travel as lists of float32."""
    if pa.types.is_fixed_size_list(field.type):
        return field.with_type(pa.list_(pa.float32()))
    return field


def _read_files(table: Table, schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        dataset = table.dataset(batch.column(0).to_pylist())
        for part in dataset.to_batches(columns=schema.names):
            if part.num_rows:
                yield table.decode(pa.Table.from_batches([part])).cast(schema).to_batches()[0]


Produce = Callable[[Iterator[pa.RecordBatch]], Iterator["tuple[str, pa.RecordBatch] | TaskStats"]]


@dataclass
class StagedRun:
    """A run's parts in the tables' run folders, in no version yet: commit() publishes them, abort() drops them."""

    run_id: str
    tables: dict[str, Table]
    parts: dict[str, list[Part]]
    stats: TaskStats = field(default_factory=TaskStats)
    meta: dict[str, dict] = field(default_factory=dict)  # per table: kept in its commit record

    def commit(self) -> None:
        """Idempotent (Table.commit is): a retry after a failure commits what the failure left."""
        for name, table in self.tables.items():
            table.commit(self.run_id, self.parts[name], **self.meta.get(name, {}))

    def abort(self) -> None:
        for table in self.tables.values():
            table.abort(self.run_id)


def stage(df: DataFrame, tables: dict[str, Table], run_id: str, produce: Produce, **meta: dict) -> StagedRun:
    """write_tables as a StagedRun; a failed write leaves no parts behind."""
    try:
        parts, stats = write_tables(df, tables, run_id, produce)
    except BaseException:
        StagedRun(run_id, tables, {}).abort()
        raise
    return StagedRun(run_id, tables, parts, stats, meta)


def commit_or_abort(staged: StagedRun, commit: Callable[[StagedRun], None] = StagedRun.commit) -> None:
    """Commit a staged run (`commit` may be a flow's retrying task); if that fails for good, drop its parts."""
    try:
        commit(staged)
    except BaseException:
        staged.abort()
        raise


def write_tables(
    df: DataFrame, tables: dict[str, Table], run_id: str, produce: Produce
) -> tuple[dict[str, list[Part]], TaskStats]:
    """Each partition writes at most one part per table into the run's folder of each table.

    `produce` runs in the task: it turns the partition's rows into (table name, batch) pairs
    to write, and TaskStats that are summed for the summary (the write's seconds are added).
    Returns the parts of each table, to commit, and the summed stats.
    """
    rows = df.mapInArrow(partial(_write_partition, tables, run_id, produce), PARTS_DDL).collect()
    parts: dict[str, list[Part]] = {name: [] for name in tables}
    stats = TaskStats()
    for row in rows:
        if row.rows:
            parts[row.table].append(Part(row.file, row.rows, row.size, row.stats))
        if row.counts:
            stats += TaskStats.from_json(row.counts)
    return parts, stats


def write_run(
    df: DataFrame, table: Table, run_id: str, count: Callable[[pa.RecordBatch], Counter] | None = None
) -> tuple[list[Part], Counter]:
    """The rows of df as one run of one table; `count` tallies each batch by key (e.g. rows per query id)."""

    def produce(batches: Iterator[pa.RecordBatch]):
        for batch in batches:
            yield table.name, batch
            if count:
                yield TaskStats(counts=count(batch))

    parts, stats = write_tables(df, {table.name: table}, run_id, produce)
    return parts[table.name], stats.counts


def _write_partition(tables, run_id, produce, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    context = TaskContext.get()
    tag = f"{context.partitionId():05d}-" if context else ""
    writers = {name: table.part_writer(run_id, tag) for name, table in tables.items()}
    stats = TaskStats()
    for item in produce(batches):
        if isinstance(item, TaskStats):
            stats += item
        else:
            clock = time.perf_counter()
            writers[item[0]].write(item[1])
            stats.seconds["write"] += time.perf_counter() - clock
    parts = []
    for name, writer in writers.items():
        clock = time.perf_counter()
        part = writer.close()
        stats.seconds["write"] += time.perf_counter() - clock
        parts.append(
            {"table": name, "file": part.name, "rows": part.rows, "size": part.size, "stats": part.stats, "counts": ""}
        )
    parts[0]["counts"] = stats.to_json()  # one copy of the stats per task
    yield pa.RecordBatch.from_pylist(parts)
