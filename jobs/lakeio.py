"""Lake tables in and out of Spark: executors read and write Parquet themselves, the driver commits.

Spark here cannot write s3a:// (no hadoop-aws jar), so, as img2dataset does, each task opens the
lake through pyarrow.fs. Only file names and row counts travel back to the driver.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from typing import Callable, Iterator

import pyarrow as pa
from pyspark import TaskContext
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.pandas.types import from_arrow_schema

from cbir.lake import Table

PARTS_DDL = "file string, rows long, counts string"


def read_table(spark: SparkSession, table: Table, columns: list[str]) -> DataFrame:
    """The committed rows of a lake table as a DataFrame, read by the executors."""
    schema = pa.schema([table.schema.field(name) for name in columns])
    files = table.files()
    if not files:
        return spark.createDataFrame([], from_arrow_schema(schema))
    paths = spark.createDataFrame([(f,) for f in files], "path string")
    paths = paths.repartition(min(len(files), spark.sparkContext.defaultParallelism * 4))
    return paths.mapInArrow(partial(_read_files, table, columns), from_arrow_schema(schema))


def _read_files(table: Table, columns: list[str], batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        dataset = table.dataset(batch.column(0).to_pylist())
        yield from dataset.to_batches(columns=columns)


Transform = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]


def write_run(
    df: DataFrame,
    table: Table,
    run_id: str,
    count: Callable[[pa.RecordBatch], Counter] | None = None,
    transform: Transform | None = None,
) -> tuple[list[tuple[str, int]], Counter]:
    """Each partition writes one part into the run's staging folder; returns the parts and merged counts.

    `transform` turns a partition's rows into the table's rows inside the task (so large values,
    such as feature vectors, never pass through Spark); `count` tallies each written batch, so
    summaries need no second pass.
    """
    rows = df.mapInArrow(partial(_write_partition, table, run_id, count, transform), PARTS_DDL).collect()
    parts = [(row.file, row.rows) for row in rows if row.rows]
    counts: Counter = Counter()
    for row in rows:
        counts.update(json.loads(row.counts))
    return parts, counts


def _write_partition(table, run_id, count, transform, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    counts: Counter = Counter()

    def tallied() -> Iterator[pa.RecordBatch]:
        for batch in transform(batches) if transform else batches:
            if count:
                counts.update(count(batch))
            yield batch

    context = TaskContext.get()
    tag = f"{context.partitionId():05d}-" if context else ""
    name, rows = table.write_part(run_id, tallied(), tag=tag)
    yield pa.RecordBatch.from_pylist([{"file": name, "rows": rows, "counts": json.dumps(counts)}])
