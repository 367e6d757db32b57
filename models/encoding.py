"""Encoding, without Spark: the encoder's settings for a worker, rows encoded in batches, the cached
features of chosen images, and the captioner a worker loads once. The embed, index and query
jobs run these in their Spark tasks; cbir web and cbir search run them in their own process.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from cbir.images import Failure, ImageRejected
from cbir.lake import Lake, Table
from cbir.settings import S3, Settings
from models import store
from models.encoders import (
    configure_tensorflow,
    encoder_key,
    feature_dim,
    image_size,
    load_encoder,
    pixels,
    resolve_precision,
)
from models.neighbours import Memory

_CAPTIONERS: dict = {}  # (lake uri, version) -> (captioner, card), once per process (a Spark worker, cbir web)
_MEMORIES: dict = {}  # (lake uri, version) -> its memory


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
    """The encoder settings for tasks; TensorFlow threads x parallel tasks = cores (on a cluster, a task's
    spark.task_cpus)."""
    encoder = settings.encoder
    threads = encoder.threads
    if not threads:
        local = settings.spark.master.startswith("local")
        threads = max(1, (os.cpu_count() or 1) // parallel_tasks) if local else settings.spark.task_cpus
    return EncoderConfig(
        encoder.name,
        encoder.weights,
        resolve_precision(encoder.precision),
        encoder_key(encoder.name, encoder.weights),
        feature_dim(encoder.name),
        encoder.dtype,
        encoder.batch_size,
        threads,
        settings.ingest.max_bytes,
        settings.s3,
    )


def read_features(lake: Lake, config: EncoderConfig, image_ids: list[str]) -> dict[str, np.ndarray]:
    """The cached vectors of these images, as float32 (images without features are left out)."""
    wanted = pa.array(sorted(set(image_ids)), pa.string())
    table = config.table(lake)
    data = table.decode(
        table.dataset().to_table(columns=["image_id", "vector"], filter=ds.field("image_id").isin(wanted))
    )
    vectors = data.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    matrix = vectors.reshape(-1, config.dim).astype(np.float32)
    found: dict[str, np.ndarray] = {}
    for image_id, row in zip(data.column("image_id").to_pylist(), matrix):
        found.setdefault(image_id, row)
    return found


@dataclass
class Chunk:
    """Up to batch_size rows after encoding: vectors as stored (rounded to the storage type), failures, timings."""

    rows: list[dict]
    vectors: np.ndarray
    failed: list[tuple[dict, Failure]] = field(default_factory=list)
    seconds: Counter = field(default_factory=Counter)

    def features_batch(self, config: EncoderConfig, run_id: str) -> pa.RecordBatch:
        stored = pa.array(self.vectors.astype(config.dtype).ravel())
        return pa.RecordBatch.from_pydict(
            {
                "image_id": [row["image_id"] for row in self.rows],
                "vector": pa.FixedSizeListArray.from_arrays(stored, config.dim),
                "run_id": [run_id] * len(self.rows),
            }
        )


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
                chunk.failed.append((row, exc.failure))
            except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a damaged file
                chunk.failed.append(
                    (row, Failure.of("decode-failed", (str(exc).splitlines() or [type(exc).__name__])[0][:200]))
                )
            chunk.seconds["decode"] += time.perf_counter() - clock
            clock = time.perf_counter()
        if images:
            # Rounded to the storage type, so captions from fresh and from cached features agree.
            chunk.vectors = encoder.encode(np.stack(images)).astype(config.dtype).astype(np.float32)
        chunk.seconds["encode"] += time.perf_counter() - clock
        yield chunk


def load_captioner(lake: Lake, version: str, config: EncoderConfig):
    """The captioner of this version, loaded once per process."""
    key = (lake.uri, version)
    if key not in _CAPTIONERS:
        configure_tensorflow(config.threads)  # before TensorFlow's first use in this process
        _CAPTIONERS[key] = store.load(lake, version, encoder=config.key)
    return _CAPTIONERS[key][0]


def load_memory(lake: Lake, version: str, config: EncoderConfig) -> Memory | None:
    """The memory of this version (None for a version saved without one), loaded once per process."""
    key = (lake.uri, version)
    if key not in _MEMORIES:
        load_captioner(lake, version, config)
        _MEMORIES[key] = store.load_memory(lake, _CAPTIONERS[key][1])
    return _MEMORIES[key]
