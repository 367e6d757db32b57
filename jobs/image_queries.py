"""Image queries: each image of a query file is named by its bytes (Spark tasks); an image the captioner
in use indexed keeps its stored caption and features, the others are captioned in Spark tasks, in
batches, by the searcher's ImageCaptioner (as the index job would caption them). Example images (search.examples)
are resolved the same way: an image id by its stored caption and likeness vector, a file as an image query."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import partial

import pyarrow as pa
from pyspark.sql import SparkSession
from pyspark.sql.pandas.types import from_arrow_schema

from cbir.images import Failure
from cbir.lake import Lake
from cbir.settings import Settings
from jobs.embed import identify
from models import store
from search.captioning import ImageCaptioner, indexed, read_image
from search.examples import SIDES, Examples, example_of, is_image_id
from search.index import version_captions, visual_vectors
from search.pictures import Pictures
from search.queries import Query

CAPTIONED = pa.schema(
    [
        ("query_id", pa.string()),
        ("caption", pa.string()),
        ("vector", pa.list_(pa.float32())),
        ("error", pa.string()),
        ("reason", pa.string()),
    ]
)
NO_CAPTIONER = Failure.of("no-captioner", "image queries need a captioner in the lake: train one with `cbir train`")
NO_LIKENESS = Failure.of(
    "no-likeness",
    "example images need the captioner's memory (likeness vectors): train with train.memory_images above 0",
)


def caption_image_queries(
    spark: SparkSession, lake: Lake, settings: Settings, queries: list[Query], card: dict | None
) -> tuple[list[Query], list[tuple[str, Failure]]]:
    """The queries that can be searched (text, or images with their caption and features filled in), and
    (query_id, reason) for the image queries that failed."""
    images = [q for q in queries if q.image]
    if not images:
        return queries, []
    if card is None:
        return [q for q in queries if not q.image], [(q.query_id, NO_CAPTIONER) for q in images]
    captioner = ImageCaptioner.from_settings(lake, card["version"], settings, spark.sparkContext.defaultParallelism)
    store.check_encoder(card, captioner.encoder.key)
    ids = identify(spark, settings, sorted({q.image for q in images}))
    known = indexed(lake, captioner.encoder, card["version"], [image_id for image_id, _ in ids.values() if image_id])
    found, errors, todo = {}, [], []
    for q in images:
        image_id, error = ids[q.image]
        if error:
            errors.append((q.query_id, error))
        elif image_id in known:
            found[q.query_id] = known[image_id]
        else:
            todo.append(q)
    if todo:  # else no model to load
        captioned, failed = _caption(spark, captioner, settings, todo)
        found.update(captioned)
        errors += failed
    dropped = {query_id for query_id, _ in errors}
    return [
        dataclasses.replace(q, caption=found[q.query_id][0], vector=found[q.query_id][1], image_id=ids[q.image][0])
        if q.image
        else q
        for q in queries
        if q.query_id not in dropped
    ], errors


def resolve_examples(
    spark: SparkSession,
    lake: Lake,
    settings: Settings,
    queries: list[Query],
    card: dict | None,
    pictures: Pictures | None,
) -> tuple[list[Query], list[tuple[str, Failure]]]:
    """The queries with their examples resolved (search.examples.Example), and an error row for each example
    that cannot be used (not in the lake, not an image, too large): the rest of its query is answered."""
    asked = [q for q in queries if q.positive or q.negative]
    if not asked:
        return queries, []
    if card is None or pictures is None:
        failure = NO_CAPTIONER if card is None else NO_LIKENESS
        return [q for q in queries if not (q.positive or q.negative)], [(q.query_id, failure) for q in asked]
    names = sorted({name for q in asked for name in (*q.positive, *q.negative)})
    found, failed = _stored_examples(lake, card["version"], [n for n in names if is_image_id(n)])
    files = [Query(name, 1, image=name) for name in names if not is_image_id(name)]
    captioned, errors = caption_image_queries(spark, lake, settings, files, card)
    for q in captioned:
        found[q.image] = example_of(q.image, q.caption, pictures.of_features(q.vector), q.image_id)
    failed.update(errors)
    resolved, rows = [], []
    for q in queries:
        if q.positive or q.negative:
            sides = {side: tuple(found[n] for n in getattr(q, side) if n in found) for side in SIDES}
            rows += [
                (q.query_id, _of_example(failed[n], side, n)) for side in SIDES for n in getattr(q, side) if n in failed
            ]
            q = dataclasses.replace(q, examples=Examples(sides["positive"], sides["negative"]))
            if q.text is None and not q.examples.positive:
                continue  # its positives all failed: nothing left to ask
        resolved.append(q)
    return resolved, rows


def _of_example(failure: Failure, side: str, name: str) -> Failure:
    """An example's failure as its query's error row: which example, and why."""
    return Failure.of(failure.reason, f"{side} example {name}: {failure.removeprefix(failure.reason + ': ')}")


def _stored_examples(lake: Lake, version: str, image_ids: list[str]) -> tuple[dict, dict]:
    """Examples named by image id: their stored caption and likeness vector; not-found for the others."""
    table = version_captions(lake, version, (), image_ids)
    vectors = visual_vectors(table)
    found = {
        image_id: example_of(image_id, caption, None if vectors is None else vectors[i], image_id)
        for i, (image_id, caption) in enumerate(
            zip(table.column("image_id").to_pylist(), table.column("caption").to_pylist())
        )
    }
    missing = {
        image_id: Failure.of("not-found", "no image of the lake has this id (with a caption of the captioner in use)")
        for image_id in image_ids
        if image_id not in found
    }
    return found, missing


def _caption(
    spark: SparkSession, captioner: ImageCaptioner, settings: Settings, todo: list[Query]
) -> tuple[dict[str, tuple[str, list[float]]], list[tuple[str, Failure]]]:
    """Caption these image queries in Spark tasks: query_id -> (caption, features), and the failures."""
    rows = spark.createDataFrame([(q.query_id, q.image) for q in todo], "query_id string, uri string")
    rows = rows.repartition(min(len(todo), spark.sparkContext.defaultParallelism))
    found, errors = {}, []
    captioned = rows.mapInArrow(partial(_caption_partition, captioner, settings), from_arrow_schema(CAPTIONED))
    for row in captioned.collect():
        if row.error:
            errors.append((row.query_id, Failure(row.error, row.reason)))
        else:
            found[row.query_id] = (row.caption, list(row.vector))
    return found, errors


def _caption_partition(captioner: ImageCaptioner, settings: Settings, batches: Iterator[pa.RecordBatch]):
    filesystems: dict = {}

    def read(row: dict) -> bytes:  # the same checks as ingest: size, format, pixels, full decode
        return read_image(row["uri"], settings, filesystems)[1]

    rows = (row for batch in batches for row in batch.to_pylist())
    out = [
        {
            "query_id": row["query_id"],
            "caption": caption,
            "vector": None if vector is None else vector.tolist(),
            "error": error,
            "reason": error and error.reason,
        }
        for row, caption, vector, error in captioner.caption(rows, read)
    ]
    yield pa.RecordBatch.from_pylist(out, schema=CAPTIONED)
