"""Lake tables in and out of Spark: executors read and write Parquet themselves, the driver commits.

Spark here cannot write s3a:// (no hadoop-aws jar), so, as img2dataset does, each task opens the
lake through pyarrow.fs. Tasks read the files of one Delta table version (listed by the driver);
only file names, row counts, sizes and Delta statistics travel back to the driver, which commits them.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from functools import partial
from typing import Callable, Iterator

import pyarrow as pa
from pyspark import TaskContext
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.pandas.types import from_arrow_schema

from cbir.lake import Part, Table

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


Produce = Callable[[Iterator[pa.RecordBatch]], Iterator["tuple[str, pa.RecordBatch] | Counter"]]


def write_tables(df: DataFrame, tables: dict[str, Table], run_id: str,
                 produce: Produce) -> tuple[dict[str, list[Part]], Counter]:
    """Each partition writes at most one part per table into the run's folder of each table.

    `produce` runs in the task: it turns the partition's rows into (table name, batch) pairs
    to write, and Counters (rows by status, seconds by stage) that are summed for the summary.
    Returns the parts of each table, to commit, and the summed counts.
    """
    rows = df.mapInArrow(partial(_write_partition, tables, run_id, produce), PARTS_DDL).collect()
    parts: dict[str, list[Part]] = {name: [] for name in tables}
    counts: Counter = Counter()
    for row in rows:
        if row.rows:
            parts[row.table].append(Part(row.file, row.rows, row.size, row.stats))
        counts.update(json.loads(row.counts))
    return parts, counts


def write_run(df: DataFrame, table: Table, run_id: str,
              count: Callable[[pa.RecordBatch], Counter] | None = None) -> tuple[list[Part], Counter]:
    """The rows of df as one run of one table; `count` tallies each batch for the summary."""
    def produce(batches: Iterator[pa.RecordBatch]):
        for batch in batches:
            yield table.name, batch
            if count:
                yield count(batch)

    parts, counts = write_tables(df, {table.name: table}, run_id, produce)
    return parts[table.name], counts


def _write_partition(tables, run_id, produce, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    context = TaskContext.get()
    tag = f"{context.partitionId():05d}-" if context else ""
    writers = {name: table.part_writer(run_id, tag) for name, table in tables.items()}
    counts: Counter = Counter()
    for item in produce(batches):
        if isinstance(item, Counter):
            counts.update(item)
        else:
            clock = time.perf_counter()
            writers[item[0]].write(item[1])
            counts["seconds:write"] += time.perf_counter() - clock
    stats = []
    for name, writer in writers.items():
        clock = time.perf_counter()
        part = writer.close()
        counts["seconds:write"] += time.perf_counter() - clock
        stats.append({"table": name, "file": part.name, "rows": part.rows, "size": part.size, "stats": part.stats,
                      "counts": "{}"})
    stats[0]["counts"] = json.dumps(counts)  # one copy of the counts per task
    yield pa.RecordBatch.from_pylist(stats)
