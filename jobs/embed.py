"""Embed: image uris -> encoder features, computed in Spark tasks and cached per encoder in the lake.

identify() reads and checks each uri and names its bytes (sha256); embed() encodes the images
the encoder's table lacks and commits them as one run; read_features() brings the vectors of
chosen images to the driver. Vectors are written by the tasks themselves, never via Spark rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from pyspark.sql import SparkSession
from pyspark.sql.pandas.types import from_arrow_schema

from cbir.images import Limits
from cbir.lake import Lake, Table, new_run_id
from cbir.settings import S3, Settings
from jobs.ingest import PROBED, probe_partition, read_bytes
from jobs.lakeio import write_run
from jobs.progress import Report, tracked
from jobs.reader import ENTRY_DDL, Entry
from jobs.spark import default_partitions
from models.encoders import configure_tensorflow, encoder_key, feature_dim, image_size, load_encoder, pixels

IMAGES_PER_TASK = 256  # encoding is slow: small tasks spread work and show progress


@dataclass(frozen=True)
class EncoderConfig:
    """What a task needs to rebuild the encoder: its name, weights and batching."""

    name: str
    weights: str
    key: str
    dim: int
    dtype: str
    batch_size: int
    threads: int
    max_bytes: int
    s3: S3

    def table(self, lake: Lake) -> Table:
        return lake.features_table(self.key, self.dim, self.dtype)


def encoder_config(settings: Settings, parallel_tasks: int) -> EncoderConfig:
    """The encoder settings for tasks; on a local master, TensorFlow threads x parallel tasks = cores."""
    encoder = settings.encoder
    threads = encoder.threads
    if not threads:
        local = settings.spark.master.startswith("local")
        threads = max(1, (os.cpu_count() or 1) // parallel_tasks) if local else 1
    return EncoderConfig(encoder.name, encoder.weights, encoder_key(encoder.name, encoder.weights),
                         feature_dim(encoder.name), encoder.dtype, encoder.batch_size, threads,
                         settings.ingest.max_bytes, settings.s3)


def identify(spark: SparkSession, settings: Settings, uris: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """uri -> (image_id, None) for a good image, (None, '<reason>: <detail>') for a bad one."""
    if not uris:
        return {}
    entries = spark.createDataFrame([Entry(uri) for uri in uris], ENTRY_DDL)
    check = partial(probe_partition, None, Limits.from_settings(settings.ingest), settings.s3, settings.ingest.threads)
    probed = entries.repartition(default_partitions(spark, len(uris), settings.spark.partitions))
    rows = probed.mapInArrow(check, from_arrow_schema(PROBED)).select("uri", "image_id", "error").collect()
    return {row.uri: (row.image_id, row.error) for row in rows}


def embed(spark: SparkSession, lake: Lake, config: EncoderConfig, images: dict[str, str],
          progress: Report | None = None) -> int:
    """Encode {image_id: uri} for ids the features table lacks; returns how many were computed."""
    table = config.table(lake)
    todo = sorted(set(images) - cached_ids(table))
    if not todo:
        return 0
    run_id = new_run_id()
    items = spark.createDataFrame([(image_id, images[image_id]) for image_id in todo], "image_id string, uri string")
    items = items.repartition(default_partitions(spark, len(todo), 0, per_partition=IMAGES_PER_TASK))
    try:
        with tracked(spark, f"embed {len(todo)} images with {config.key}", progress):
            parts, _ = write_run(items, table, run_id, transform=partial(encode_batches, config, run_id))
        table.commit(run_id, parts)
    except BaseException:
        table.abort(run_id)
        raise
    return sum(rows for _, rows in parts)


def cached_ids(table: Table) -> set[str]:
    return set(table.read(["image_id"]).column("image_id").to_pylist())


def read_features(lake: Lake, config: EncoderConfig, image_ids: list[str]) -> dict[str, np.ndarray]:
    """The cached vectors of these images, as float32 (images without features are left out)."""
    wanted = pa.array(sorted(set(image_ids)), pa.string())
    data = config.table(lake).dataset().to_table(columns=["image_id", "vector"], filter=ds.field("image_id").isin(wanted))
    vectors = data.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    matrix = vectors.reshape(-1, config.dim).astype(np.float32)
    found: dict[str, np.ndarray] = {}
    for image_id, row in zip(data.column("image_id").to_pylist(), matrix):
        found.setdefault(image_id, row)
    return found


# Executor side.
def encode_batches(config: EncoderConfig, run_id: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """(image_id, uri) rows -> (image_id, vector, run_id) rows, config.batch_size images per model call."""
    configure_tensorflow(config.threads)
    encoder = load_encoder(config.name, config.weights)
    filesystems: dict = {}
    for batch in batches:
        rows = batch.to_pylist()
        for start in range(0, len(rows), config.batch_size):
            ids, images = [], []
            for row in rows[start:start + config.batch_size]:
                try:
                    data = read_bytes(row["uri"], config.s3, filesystems, config.max_bytes)
                    images.append(pixels(data, image_size(config.name)))
                    ids.append(row["image_id"])
                except Exception:  # changed or gone since it was checked: it simply gets no features
                    continue
            if ids:
                vectors = encoder.encode(np.stack(images)).astype(config.dtype)
                yield pa.RecordBatch.from_pydict({
                    "image_id": ids,
                    "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), config.dim),
                    "run_id": [run_id] * len(ids),
                })
