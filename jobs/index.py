"""Index: the manifest's ok images -> features (cached per encoder) and a caption per model version.

In each task: read (from the lake's image store) -> decode and resize -> encode (batched) ->
caption (batched greedy or beam) -> write its own Parquet parts. Images whose features are
already cached (from training, or an earlier model version) are only captioned. The driver
commits features and captions once every task has succeeded, so an interrupted run leaves
nothing, and a rerun starts from what is committed: it never captions an image twice.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from cbir.errors import CbirError
from cbir.images import Failure, ImageRejected
from cbir.lake import Lake, Table, checked_run_id, new_run_id
from cbir.schemas import CAPTIONS
from cbir.settings import Settings
from cbir.stats import ImagesSummary, TaskStats
from jobs.embed import IMAGES_PER_TASK
from jobs.job import StagedCommit
from jobs.lakeio import StagedRun, read_table, stage
from jobs.progress import Report, tracked
from jobs.spark import default_partitions
from models import store
from models.captioner import Decoding
from models.encoders import encoder_key, labeler
from models.encoding import EncoderConfig, encode_chunks, encoder_config, load_captioner, load_memory
from models.labels import Labeler
from models.neighbours import Memory

CAPTIONS_PER_TASK = 4096  # captioning cached features is quick
STAGES = ("load", "read", "decode", "encode", "caption", "write")  # load: the models, once per worker


@dataclass(frozen=True)
class IndexContext:
    """What a task needs: the lake (the model is loaded from it, once per worker), how to decode, how many labels."""

    lake: Lake
    version: str
    encoder: EncoderConfig
    decoding: Decoding
    labels: int
    label_threshold: float
    neighbours: int
    run_id: str
    indexed_at: datetime

    @classmethod
    def from_settings(
        cls, lake: Lake, version: str, encoder: EncoderConfig, settings: Settings, run_id: str
    ) -> IndexContext:
        c = settings.captioner
        return cls(
            lake,
            version,
            encoder,
            Decoding.from_settings(c),
            c.labels_per_image,
            c.label_threshold,
            c.neighbours,
            run_id,
            datetime.now(UTC),
        )

    def captioner(self):
        return load_captioner(self.lake, self.version, self.encoder)

    def memory(self) -> Memory | None:
        """The captioner's memory; None when the version has none."""
        return load_memory(self.lake, self.version, self.encoder)

    def labeler(self) -> Labeler:
        """The encoder's classifier, once per worker (the encoder itself is cached by load_encoder)."""
        if self.encoder.key not in _LABELERS:
            _LABELERS[self.encoder.key] = labeler(self.encoder.load())
        return _LABELERS[self.encoder.key]

    def describe(self, vectors: np.ndarray) -> list[list[dict]]:
        """Each image's references: its n best distinct captions, its ImageNet labels, then the texts of
        its nearest training images."""
        captions = self.captioner().decode(vectors, self.decoding) if len(vectors) else []
        labels = (
            self.labeler().labels(vectors, self.labels, self.label_threshold) if self.labels else [[]] * len(vectors)
        )
        memory = self.memory()
        near = memory.nearest(vectors, self.neighbours) if memory is not None else [[]] * len(vectors)
        return [
            _references("caption", best) + _references("label", names) + _references("neighbour", texts)
            for best, names, texts in zip(captions, labels, near)
        ]

    def visual(self, vectors: np.ndarray) -> list[bytes | None]:
        """Each image's features in the memory's space (float16 little-endian bytes): what a text query's
        picture is compared with (models.neighbours.Prototypes); None without a memory."""
        memory = self.memory()
        if memory is None or not len(vectors):
            return [None] * len(vectors)
        return [row.tobytes() for row in memory.project(vectors).astype("<f2")]

    def captions_batch(
        self, rows: list[dict], vectors: np.ndarray, failed: list[tuple[dict, Failure]]
    ) -> pa.RecordBatch:
        out = [
            dict(
                image_id=row["image_id"],
                uri=row["uri"],
                caption=refs[0]["text"],
                logprob=refs[0]["score"],
                references=refs,
                status="ok",
                error=None,
                reason=None,
            )
            for row, refs in zip(rows, self.describe(vectors))
        ]
        for row, visual in zip(out, self.visual(vectors)):
            row["visual"] = visual
        out += [
            dict(
                image_id=row["image_id"],
                uri=row["uri"],
                caption=None,
                logprob=None,
                status="failed",
                error=str(error),
                reason=error.reason,
            )
            for row, error in failed
        ]
        for row in out:
            row.update(model_version=self.version, indexed_at=self.indexed_at, run_id=self.run_id)
        return pa.RecordBatch.from_pylist(out, schema=CAPTIONS)


def _references(kind: str, scored: list[tuple[str, float]]) -> list[dict]:
    return [dict(kind=kind, rank=rank, text=text, score=score) for rank, (text, score) in enumerate(scored, start=1)]


_LABELERS: dict = {}


@dataclass
class IndexSummary(ImagesSummary):
    run_id: str
    version: str
    pending: int = 0
    skipped: int = 0
    indexed: int = 0
    encoded: int = 0
    reused: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    retried_tasks: int = 0

    @property
    def images_per_s(self) -> float:
        return (self.indexed + sum(self.failed.values())) / self.seconds if self.seconds else 0.0

    def rows(self) -> list[dict]:
        rows = [
            {"what": "already captioned (skipped)", "count": self.skipped},
            {"what": "images to index", "count": self.pending},
            {"what": "indexed", "count": self.indexed},
            {"what": "  features computed", "count": self.encoded},
            {"what": "  features reused", "count": self.reused},
        ]
        rows += [{"what": f"failed: {reason}", "count": n} for reason, n in sorted(self.failed.items())]
        rows.append({"what": "images/s", "count": round(self.images_per_s, 1)})
        rows.append({"what": "tasks retried", "count": self.retried_tasks})
        rows += [{"what": f"task seconds: {stage}", "count": round(self.stages.get(stage, 0.0), 1)} for stage in STAGES]
        return rows


@dataclass
class IndexJob(StagedCommit):
    """Caption every image of the manifest that the current captioner has not captioned (jobs.job's shape)."""

    lake: Lake
    settings: Settings
    kind: str = "index"
    steps = {"plan": "find pending images", "work": "caption and write", "commit": "commit"}

    def describe(self) -> str:
        return "index"

    def plan(self) -> tuple[IndexSummary, pa.Table, Table]:
        return plan(self.lake, self.settings)

    def has_work(self, planned) -> bool:
        return bool(planned[1].num_rows)

    def work(self, spark: SparkSession, planned, progress: Report | None) -> StagedRun:
        summary, todo, captions = planned
        return caption(spark, self.lake, self.settings, summary, todo, captions, progress)

    def tally(self, planned, staged: StagedRun | None) -> IndexSummary:
        return tally(planned[0], staged)


def plan(lake: Lake, settings: Settings) -> tuple[IndexSummary, pa.Table, Table]:
    """The run's summary, begun, the images its captioner version has not captioned yet, and the captions
    table's handle that found them: the run commits through it, so rows another run committed since are dropped."""
    card = store.card(lake, settings.captioner.version)
    store.check_encoder(card, encoder_key(settings.encoder.name, settings.encoder.weights))
    version = card.version
    summary = IndexSummary(new_run_id(), version)
    captions = lake.table("captions")
    todo = pending(lake, version, captions)
    summary.skipped = done_count(captions, version)
    summary.pending = todo.num_rows
    return summary, todo, captions


def caption(
    spark: SparkSession,
    lake: Lake,
    settings: Settings,
    summary: IndexSummary,
    todo: pa.Table,
    captions: Table,
    progress: Report | None = None,
) -> StagedRun:
    """Encode and caption the pending images in Spark tasks; features and captions are staged, to commit."""
    config = encoder_config(settings, spark.sparkContext.defaultParallelism)
    context = IndexContext.from_settings(lake, summary.version, config, settings, summary.run_id)
    partitions = settings.spark.partitions
    return _index(spark, context, spark.createDataFrame(todo), summary.pending, partitions, captions, progress)


def tally(summary: IndexSummary, staged: StagedRun | None) -> IndexSummary:
    """The summary, completed from the run's stats (None: nothing was pending)."""
    if staged:
        stats = staged.stats
        summary.indexed, summary.encoded, summary.reused = (
            stats.status["ok"],
            stats.counts["encoded"],
            stats.counts["reused"],
        )
        summary.failed = dict(stats.failed)
        summary.stages = {name: stats.seconds[name] for name in STAGES}
        summary.retried_tasks = stats.counts["retried_tasks"]
    summary.stop()
    return summary


def pending(lake: Lake, version: str, captions: Table) -> pa.Table:
    """(image_id, uri, format) of the stored images this version has not captioned, found in the driver:
    a rerun with nothing new starts no Spark job."""
    manifest = lake.table("manifest").read(["image_id", "uri", "format", "status"])
    images = (
        manifest.filter(pc.field("status") == "ok")
        .group_by("image_id")
        .aggregate([("uri", "min"), ("format", "min")])
        .rename_columns(["image_id", "uri", "format"])
    )
    done = captions.dataset().to_table(columns=["image_id"], filter=ds.field("model_version") == version)
    todo = images.filter(pc.invert(pc.is_in(images["image_id"], value_set=done["image_id"])))
    return todo.sort_by("image_id")


def done_count(captions: Table, version: str) -> int:
    """The rows this version has in the captions table's pinned version."""
    return captions.dataset().count_rows(filter=ds.field("model_version") == version)


def _index(
    spark, context: IndexContext, todo, pending: int, partitions: int, captions: Table, progress: Report | None
) -> StagedRun:
    """One Spark job: encode and caption the images without features, caption those with; stage both.
    Features commit first, then captions, each one Delta transaction: a run stopped between the two leaves
    features that the rerun reuses, and never a caption without its features."""
    lake, config, run_id = context.lake, context.encoder, context.run_id
    features = config.table(lake)
    columns = ["image_id", "uri", "format", "vector"]
    to_encode = (
        todo.join(read_table(spark, features, ["image_id"]), "image_id", "left_anti")
        .withColumn("vector", F.lit(None).cast("array<float>"))
        .repartition(default_partitions(spark, pending, partitions, IMAGES_PER_TASK))
    )
    # The pending images are broadcast to the tasks reading cached vectors; the repartition keeps
    # captioning out of the reading stage, so each task runs one Python worker, which loads the models.
    to_caption = (
        read_table(spark, features, ["image_id", "vector"])
        .join(F.broadcast(todo.select("image_id", "uri", "format")), "image_id")
        .repartition(default_partitions(spark, pending, partitions, CAPTIONS_PER_TASK))
    )
    work = to_encode.select(columns).unionByName(to_caption.select(columns))
    with tracked(spark, f"index with captioner {context.version}", progress) as jobs:
        staged = stage(
            work,
            {"features": features, "captions": captions},
            run_id,
            partial(index_partition, context),
            features={"job": "index", "model_version": context.version},
            captions={"job": "index", "model_version": context.version},
        )
    staged.stats.counts["retried_tasks"] += jobs.retried_tasks
    return staged


def drop_version(lake: Lake, version: str) -> tuple[int, int]:
    """Remove a model version's captions, as one Delta delete (features stay: they belong to the encoder).
    Returns (runs, rows)."""
    version = checked_run_id(version, "captioner version")  # it goes into the delete's predicate
    captions = lake.table("captions")
    runs = [record["run_id"] for record in captions.commits() if record.get("model_version") == version]
    rows = captions.delete(f"model_version = '{version}'", job="drop-version", model_version=version, dropped_runs=runs)
    return len(runs), rows


# Executor side.
def index_partition(context: IndexContext, batches: Iterator[pa.RecordBatch]):
    """A partition holds either images to encode (no vector) or cached vectors: caption them all."""
    clock = time.perf_counter()
    context.captioner()
    context.memory()
    if context.labels:
        context.labeler()
    yield TaskStats(seconds=Counter(load=time.perf_counter() - clock))
    for batch in batches:
        if batch.column("vector").null_count < batch.num_rows:
            yield from caption_cached(context, batch)
        else:
            yield from encode_and_caption(context, batch.to_pylist())


def encode_and_caption(context: IndexContext, rows: list[dict]):
    """(image_id, uri, format) rows -> features and captions, encoder.batch_size images at a time."""
    lake = context.lake

    def read(row: dict) -> bytes:
        try:  # the row's image_id and format, read back from the manifest, are checked before they make a path
            path = lake.image_path(row["image_id"], row["format"])
        except CbirError as exc:
            raise ImageRejected("bad-manifest-row", str(exc)) from None
        try:
            with lake.fs.open_input_stream(path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise ImageRejected("not-found", "the image is not in the lake's image store") from None

    for chunk in encode_chunks(context.encoder, rows, read):
        clock = time.perf_counter()
        captions = context.captions_batch(chunk.rows, chunk.vectors, chunk.failed)
        seconds = chunk.seconds + Counter(caption=time.perf_counter() - clock)
        if chunk.rows:
            yield "features", chunk.features_batch(context.encoder, context.run_id)
        yield "captions", captions
        yield _tally(chunk.rows, chunk.failed, seconds, encoded=len(chunk.rows))


def caption_cached(context: IndexContext, batch: pa.RecordBatch):
    """(image_id, uri, vector) rows from the features table -> captions."""
    clock = time.perf_counter()
    vectors = batch.column("vector").flatten().to_numpy(zero_copy_only=False)
    vectors = vectors.reshape(-1, context.encoder.dim).astype(np.float32)
    rows = batch.select(["image_id", "uri"]).to_pylist()
    yield "captions", context.captions_batch(rows, vectors, [])
    yield _tally(rows, [], Counter(caption=time.perf_counter() - clock), reused=len(rows))


def _tally(rows: list, failed: list[tuple[dict, Failure]], seconds: Counter, **counts: int) -> TaskStats:
    return TaskStats(
        status=Counter(ok=len(rows)),
        failed=Counter(error.reason for _, error in failed),
        seconds=seconds,
        counts=Counter(counts),
    )
