"""Embed: images -> encoder features, computed in Spark tasks and cached per encoder in the lake.

identify() reads and checks each uri and names its bytes (sha256); embed() encodes the images
the encoder's table lacks and commits them as one run. Vectors are written by the tasks
themselves, never via Spark rows. The encoding itself, without Spark, is models/encoding.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pyarrow as pa
from pyspark.sql import SparkSession
from pyspark.sql.pandas.types import from_arrow_schema

from cbir.images import Failure, Limits
from cbir.lake import Lake, Table, new_run_id
from cbir.reader import ENTRY_DDL, Entry, read_bytes
from cbir.settings import Settings
from jobs.ingest import PROBED, probe_partition
from jobs.lakeio import commit_or_abort, stage
from jobs.progress import Report, tracked
from jobs.spark import default_partitions
from models.encoding import EncoderConfig, encode_chunks

IMAGES_PER_TASK = 256  # encoding is slow: small tasks spread the work and show progress


def identify(spark: SparkSession, settings: Settings, uris: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """uri -> (image_id, None) for a good image, (None, its Failure) for a bad one."""
    if not uris:
        return {}
    entries = spark.createDataFrame([Entry(uri) for uri in uris], ENTRY_DDL)
    check = partial(probe_partition, None, Limits.from_settings(settings.ingest), settings.s3, settings.ingest.threads)
    probed = entries.repartition(default_partitions(spark, len(uris), settings.spark.partitions))
    rows = probed.mapInArrow(check, from_arrow_schema(PROBED)).select("uri", "image_id", "error", "reason").collect()
    return {row.uri: (row.image_id, row.error and Failure(row.error, row.reason)) for row in rows}


def embed(
    spark: SparkSession, lake: Lake, config: EncoderConfig, images: dict[str, str], progress: Report | None = None
) -> int:
    """Encode {image_id: uri} for ids the features table lacks; returns how many were computed."""
    table = config.table(lake)
    todo = sorted(set(images) - cached_ids(table))
    if not todo:
        return 0
    run_id = new_run_id()
    items = spark.createDataFrame([(image_id, images[image_id]) for image_id in todo], "image_id string, uri string")
    items = items.repartition(default_partitions(spark, len(todo), 0, per_partition=IMAGES_PER_TASK))
    with tracked(spark, f"embed {len(todo)} images with {config.key}", progress):
        staged = stage(
            items, {"features": table}, run_id, partial(_embed_partition, config, run_id), features={"job": "embed"}
        )
    commit_or_abort(staged)
    return sum(part.rows for part in staged.parts["features"])


def cached_ids(table: Table) -> set[str]:
    return set(table.read(["image_id"]).column("image_id").to_pylist())


# Executor side.
def _embed_partition(config: EncoderConfig, run_id: str, batches: Iterator[pa.RecordBatch]):
    filesystems: dict = {}
    rows = (row for batch in batches for row in batch.to_pylist())
    for chunk in encode_chunks(
        config, rows, lambda row: read_bytes(row["uri"], config.s3, filesystems, config.max_bytes)
    ):
        if chunk.rows:
            yield "features", chunk.features_batch(config, run_id)
