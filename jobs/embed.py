"""Embed: images -> encoder features, computed in Spark tasks and cached per encoder in the lake.

identify() reads and checks each uri and names its bytes (sha256); embed() encodes the images
the encoder's table lacks and commits them as one run; read_features() brings the vectors of
chosen images to the driver. Vectors are written by the tasks themselves, never via Spark rows.
encode_chunks() is the task-side loop that the index job shares.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from pyspark.sql import SparkSession
from pyspark.sql.pandas.types import from_arrow_schema

from cbir.images import ImageRejected, Limits
from cbir.lake import Lake, Table, new_run_id
from cbir.settings import S3, Settings
from jobs.ingest import PROBED, probe_partition, read_bytes
from jobs.lakeio import write_tables
from jobs.progress import Report, tracked
from jobs.reader import ENTRY_DDL, Entry
from jobs.spark import default_partitions
from models.encoders import (configure_tensorflow, encoder_key, feature_dim, image_size, load_encoder, pixels,
                             resolve_precision)

IMAGES_PER_TASK = 256  # encoding is slow: small tasks spread the work and show progress


@dataclass(frozen=True)
class EncoderConfig:
    """What a task needs to rebuild the encoder and store its output."""

    name: str
    weights: str
    precision: str
    key: str
    dim: int
    dtype: str
    batch_size: int
    threads: int
    max_bytes: int
    s3: S3

    def table(self, lake: Lake) -> Table:
        return lake.features_table(self.key, self.dim, self.dtype)

    def load(self):
        configure_tensorflow(self.threads)
        return load_encoder(self.name, self.weights, self.precision)


def encoder_config(settings: Settings, parallel_tasks: int) -> EncoderConfig:
    """The encoder settings for tasks; on a local master, TensorFlow threads x parallel tasks = cores."""
    encoder = settings.encoder
    threads = encoder.threads
    if not threads:
        local = settings.spark.master.startswith("local")
        threads = max(1, (os.cpu_count() or 1) // parallel_tasks) if local else 1
    return EncoderConfig(encoder.name, encoder.weights, resolve_precision(encoder.precision),
                         encoder_key(encoder.name, encoder.weights), feature_dim(encoder.name), encoder.dtype,
                         encoder.batch_size, threads, settings.ingest.max_bytes, settings.s3)


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
            parts, _ = write_tables(items, {"features": table}, run_id, partial(_embed_partition, config, run_id))
        record = table.commit(run_id, parts["features"], job="embed")
    except BaseException:
        table.abort(run_id)
        raise
    return record["rows"] if record else 0  # a concurrent run may have committed some of them first


def cached_ids(table: Table) -> set[str]:
    return set(table.read(["image_id"]).column("image_id").to_pylist())


def read_features(lake: Lake, config: EncoderConfig, image_ids: list[str]) -> dict[str, np.ndarray]:
    """The cached vectors of these images, as float32 (images without features are left out)."""
    wanted = pa.array(sorted(set(image_ids)), pa.string())
    table = config.table(lake)
    wanted_rows = ds.field("image_id").isin(wanted)
    data = table.decode(table.dataset().to_table(columns=["image_id", "vector"], filter=wanted_rows))
    vectors = data.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    matrix = vectors.reshape(-1, config.dim).astype(np.float32)
    found: dict[str, np.ndarray] = {}
    for image_id, row in zip(data.column("image_id").to_pylist(), matrix):
        found.setdefault(image_id, row)
    return found


# Executor side.
@dataclass
class Chunk:
    """Up to batch_size rows after encoding: vectors as stored (rounded to the storage type), failures, timings."""

    rows: list[dict]
    vectors: np.ndarray
    failed: list[tuple[dict, str]] = field(default_factory=list)
    seconds: Counter = field(default_factory=Counter)

    def features_batch(self, config: EncoderConfig, run_id: str) -> pa.RecordBatch:
        stored = pa.array(self.vectors.astype(config.dtype).ravel())
        return pa.RecordBatch.from_pydict({
            "image_id": [row["image_id"] for row in self.rows],
            "vector": pa.FixedSizeListArray.from_arrays(stored, config.dim),
            "run_id": [run_id] * len(self.rows),
        })


def encode_chunks(config: EncoderConfig, rows: Iterable[dict], read: Callable[[dict], bytes]) -> Iterator[Chunk]:
    """Rows -> chunks of config.batch_size encoded together. A row that cannot be read or decoded is
    a failure with its reason; the others go on. Seconds are kept for read, decode and encode."""
    encoder = config.load()
    rows = iter(rows)
    while batch := [row for _, row in zip(range(config.batch_size), rows)]:
        chunk, images, clock = Chunk([], np.zeros((0, config.dim), np.float32)), [], time.perf_counter()
        for row in batch:
            try:
                data = read(row)
                chunk.seconds["read"] += time.perf_counter() - clock
                clock = time.perf_counter()
                images.append(pixels(data, image_size(config.name)))
                chunk.rows.append(row)
            except ImageRejected as exc:
                chunk.failed.append((row, str(exc)))
            except Exception as exc:  # Pillow raises many kinds for a damaged file
                chunk.failed.append((row, f"decode-failed: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}"))
            chunk.seconds["decode"] += time.perf_counter() - clock
            clock = time.perf_counter()
        if images:
            # Rounded to the storage type, so captions from fresh and from cached features agree.
            chunk.vectors = encoder.encode(np.stack(images)).astype(config.dtype).astype(np.float32)
        chunk.seconds["encode"] += time.perf_counter() - clock
        yield chunk


def _embed_partition(config: EncoderConfig, run_id: str, batches: Iterator[pa.RecordBatch]):
    filesystems: dict = {}
    rows = (row for batch in batches for row in batch.to_pylist())
    for chunk in encode_chunks(config, rows, lambda row: read_bytes(row["uri"], config.s3, filesystems, config.max_bytes)):
        if chunk.rows:
            yield "features", chunk.features_batch(config, run_id)
