"""Captions: what the query job searches, as a Spark DataFrame read by the executors: the lake's ok
captions of a captioner version, or any Parquet table of image_id and caption (`cbir query --captions`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from cbir import uris
from cbir.errors import UsageError
from cbir.lake import Lake
from cbir.schemas import CAPTIONS, subschema
from cbir.settings import Settings
from cbir.storage import delta_storage_options, open_filesystem
from jobs.lakeio import read_table
from search.index import CAPTION_COLUMNS

CAPTIONS_PER_READ = 250_000


@dataclass(frozen=True)
class Captions:
    """Rows of image_id, uri, caption, references (several rows of an image: the first counts), how many, and
    the lake whose manifest has the images' source texts (None: the rows are all there is)."""

    frame: DataFrame
    rows: int
    sources: Lake | None = None
    identity: dict | None = None  # what the rows are, for the saved index shares (search.cache.share_key)


def lake_captions(spark: SparkSession, lake: Lake, version: str) -> Captions:
    """The version's ok captions, as search.index.version_captions reads them, spread over the executors."""
    table = lake.table("captions")  # one handle: the rows read and the rows counted are of one version
    captions = read_table(spark, table, [*CAPTION_COLUMNS, "model_version", "status"])
    captions = captions.where(
        (F.col("model_version") == version)
        & (F.col("status") == "ok")
        & F.col("caption").isNotNull()
        & F.col("image_id").isNotNull()
    )
    count = table.dataset().count_rows(filter=ds.field("model_version") == version)
    identity = {"lake": lake.uri, "version": version, "tables": {"captions": table.pinned_state()}}
    return Captions(captions.select(*CAPTION_COLUMNS), count, lake, identity)


def table_captions(spark: SparkSession, uri: str, settings: Settings) -> Captions:
    """Any Parquet dataset with image_id and caption (and uri, and references as the captions table has
    them) columns, read by the executors."""
    fs, path = open_filesystem(uri, settings.s3)
    try:
        dataset = ds.dataset(_delta_files(fs, path, uri, settings) or path, filesystem=fs, format="parquet")
    except (OSError, pa.ArrowInvalid) as exc:
        raise UsageError(f"captions table {uri} cannot be read: {str(exc).splitlines()[0]}") from None
    missing = {"image_id", "caption"} - set(dataset.schema.names)
    if missing:
        raise UsageError(f"captions table {uri} has no {', '.join(sorted(missing))} column")
    present = [c for c in CAPTION_COLUMNS if c in dataset.schema.names]
    pieces = []
    for fragment in dataset.get_fragments():
        fragment.ensure_complete_metadata()
        pieces += [(fragment.path, group.id, group.num_rows) for group in fragment.row_groups]
    tasks = _reads(pieces)
    reads = spark.createDataFrame(tasks, "path string, row_groups array<int>").repartition(max(1, min(len(tasks), 64)))
    schema = subschema(CAPTIONS, CAPTION_COLUMNS)
    frame = reads.mapInArrow(partial(_read_row_groups, fs, present, schema), from_arrow_schema(schema))
    return Captions(frame, sum(rows for *_, rows in pieces), identity=_files_identity(fs, uri, dataset.files))


def _files_identity(fs: pafs.FileSystem, uri: str, files: list[str]) -> dict:
    """A foreign table's identity: its files' paths, sizes and modification times (a rewrite is another table)."""
    return {"captions": uri, "files": [[i.path, i.size, i.mtime_ns] for i in fs.get_file_info(sorted(files))]}


def _reads(pieces: list[tuple[str, int, int]]) -> list[tuple[str, list[int]]]:
    """Reading tasks of about CAPTIONS_PER_READ rows, made of whole row groups: a big file is read in parallel."""
    tasks: list[tuple[str, list[int]]] = []
    rows_in_task = 0
    for path, group, rows in pieces:
        if not tasks or tasks[-1][0] != path or rows_in_task + rows > CAPTIONS_PER_READ:
            tasks.append((path, []))
            rows_in_task = 0
        tasks[-1][1].append(group)
        rows_in_task += rows
    return tasks


def _read_row_groups(fs, columns: list[str], schema: pa.Schema, batches):
    for batch in batches:
        for path, groups in zip(batch.column("path").to_pylist(), batch.column("row_groups").to_pylist()):
            for part in pq.ParquetFile(path, filesystem=fs).iter_batches(row_groups=groups, columns=columns):
                data = {name: part.column(name) for name in columns}
                yield pa.RecordBatch.from_pydict(
                    {
                        field.name: data[field.name].cast(field.type)
                        if field.name in data
                        else pa.nulls(part.num_rows, field.type)
                        for field in schema
                    }
                )


def _delta_files(fs: pafs.FileSystem, path: str, uri: str, settings: Settings) -> list[str] | None:
    """The files of a Delta table's latest version (None when uri is a plain Parquet folder or file)."""
    from deltalake import DeltaTable

    if fs.get_file_info(f"{path}/_delta_log").type != pafs.FileType.Directory:
        return None
    options = delta_storage_options(settings.s3) if uris.is_s3(uri) else None
    return [f.split("://", 1)[1] if "://" in f else f for f in DeltaTable(uri, storage_options=options).file_uris()]
