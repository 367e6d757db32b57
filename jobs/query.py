"""Query: a file of text and image queries -> the exact BLEU top k of every query over the captions.

Stages: read the query file (driver) -> identify the query images (Spark tasks); those the current
captioner has indexed keep their stored caption and features, the others are captioned (Spark
tasks, batched) -> search: the captions are spread over tasks, each task builds a BLEU
index of its share and answers every query exactly (the queries are broadcast) -> the tasks'
top k are merged into each query's global top k -> for hybrid image queries, visual similarity
on the stored features re-ranks a wider pool -> results and errors are committed in the run's
folder, queries/<run_id>/.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from cbir.bleu import BleuParams
from cbir.errors import UsageError
from cbir.images import Limits, inspect_image
from cbir.lake import Lake, delta_storage_options, new_run_id, open_filesystem
from cbir.references import (
    SOURCE,
    SOURCE_COLUMNS,
    build_index,
    reference_texts,
)
from cbir.schemas import CAPTIONS, ERRORS, RESULTS, subschema
from cbir.settings import Settings
from cbir.text import too_many_words, words
from jobs.embed import (
    EncoderConfig,
    encode_chunks,
    encoder_config,
    identify,
    read_features,
)
from jobs.index import IndexContext
from jobs.ingest import read_bytes
from jobs.lakeio import read_table, write_run
from jobs.progress import Report, tracked
from jobs.reader import read_rows, resolve_source, resolve_uri, text_value
from models import store

CAPTIONS_PER_TASK = 500_000  # a task indexes its share once and answers every query: few, large shares
CAPTIONS_PER_READ = 250_000
HIT_DDL = ("query_id string, image_id string, uri string, caption string, score double, matched_kind string, "
           "matched_text string")
HIT_SCHEMA = pa.schema([("query_id", pa.string()), ("image_id", pa.string()), ("uri", pa.string()),
                        ("caption", pa.string()), ("score", pa.float64()), ("matched_kind", pa.string()),
                        ("matched_text", pa.string())])


@dataclass
class Query:
    query_id: str
    k: int
    text: str | None = None
    image: str | None = None
    caption: str | None = None  # generated for an image query
    vector: list[float] | None = None  # the image query's features, for hybrid ranking

    @property
    def words(self) -> list[str]:
        return words(self.text if self.text is not None else self.caption)


@dataclass
class QuerySummary:
    run_id: str
    run_uri: str
    queries: int = 0
    answered: int = 0
    results: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    answered_queries: list[Query] = field(default_factory=list, repr=False)
    error_rows: list[tuple[str, str]] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key not in ("answered_queries", "error_rows")}

    def rows(self) -> list[dict]:
        rows = [{"what": "queries", "count": self.queries}, {"what": "answered", "count": self.answered},
                {"what": "results", "count": self.results}]
        rows += [{"what": f"error: {reason}", "count": n} for reason, n in sorted(self.errors.items())]
        rows += [{"what": f"seconds: {stage}", "count": round(s, 2)} for stage, s in self.stages.items()]
        return rows


def bleu_params(settings: Settings) -> BleuParams:
    return BleuParams(tuple(settings.bleu.weights), settings.bleu.smoothing, settings.bleu.auto_reweigh)


# The query file.
def read_queries(uri: str, settings: Settings) -> tuple[list[Query], list[tuple[str, str]]]:
    """Queries and (query_id, reason) errors; a file that cannot be read at all is a UsageError."""
    source = resolve_source(uri, settings, columns=("query_id",), what="query file")
    if source.kind not in ("csv", "jsonl", "parquet"):
        raise UsageError(f"query file {uri}: expected CSV, JSONL or Parquet with query_id and text or image")
    queries, errors, seen = [], [], set()
    try:
        rows = list(read_rows(source))
    except Exception as exc:  # noqa: BLE001 - any parser's failure is the file's
        raise UsageError(f"query file {uri} cannot be read: {str(exc).splitlines()[0]}") from None
    for number, row in enumerate(rows, start=1):
        if row is None:
            continue
        if not isinstance(row, dict):
            errors.append((f"#row={number}", f"bad-row: {row}" if isinstance(row, Exception) else "bad-row: not an object"))
            continue
        query_id = text_value(row.get("query_id"))
        if query_id is None:
            errors.append((f"#row={number}", "bad-row: no query_id"))
            continue
        if query_id in seen:
            errors.append((query_id, f"duplicate-id: query_id {query_id} is used by an earlier row"))
            continue
        seen.add(query_id)
        query, error = _query(source, query_id, row, settings.query.k)
        if query and (long := too_many_words(query.text, settings.query.max_words)):
            query, error = None, f"too-long: {long}"
        if error:
            errors.append((query_id, error))
        else:
            queries.append(query)
    return queries, errors


def _query(source, query_id: str, row: dict, default_k: int) -> tuple[Query | None, str | None]:
    text, image = text_value(row.get("text")), text_value(row.get("image"))
    k = row.get("k")
    if k is None or (isinstance(k, float) and k != k) or k == "":
        k = default_k
    try:
        k = int(str(k).strip())
        if not 1 <= k <= 1000:
            raise ValueError
    except (TypeError, ValueError):
        return None, f"bad-k: k must be a whole number from 1 to 1000, got {row.get('k')!r}"
    if text and image:
        return None, "bad-row: give text or image, not both"
    if image:
        try:
            return Query(query_id, k, image=resolve_uri(source, image)), None
        except ValueError as exc:
            return None, f"unsupported-uri: {exc}"
    if text is None:
        return None, "bad-row: no text and no image"
    if not words(text):
        return None, "empty-text: the text has no words"
    return Query(query_id, k, text=text), None


# Image queries: an image the captioner already indexed keeps its caption and features; the others are
# captioned in Spark tasks with the current captioner.
def caption_image_queries(spark: SparkSession, lake: Lake, settings: Settings, queries: list[Query],
                          card: dict) -> list[tuple[str, str]]:
    """Fill in caption (and vector) of each image query; returns (query_id, reason) for the failed."""
    images = [q for q in queries if q.image]
    if not images:
        return []
    if card is None:
        return [(q.query_id, "no-captioner: image queries need a captioner in the lake: train one with `cbir train`")
                for q in images]
    config = encoder_config(settings, spark.sparkContext.defaultParallelism)
    store.check_encoder(card, config.key)
    ids = identify(spark, settings, sorted({q.image for q in images}))
    known = indexed(lake, config, card["version"], [image_id for image_id, _ in ids.values() if image_id])
    errors, todo = [], []
    for q in images:
        image_id, error = ids[q.image]
        if error:
            errors.append((q.query_id, error))
        elif image_id in known:
            q.caption, q.vector = known[image_id]
        else:
            todo.append(q)
    if not todo:  # no model to load
        return errors
    context = IndexContext.from_settings(lake, card["version"], config, settings, "query")
    rows = spark.createDataFrame([(q.query_id, q.image) for q in todo], "query_id string, uri string")
    rows = rows.repartition(min(len(todo), spark.sparkContext.defaultParallelism))
    out = rows.mapInArrow(partial(_caption_partition, context, Limits.from_settings(settings.ingest)),
                          "query_id string, caption string, vector array<float>, error string").collect()
    by_id = {q.query_id: q for q in todo}
    for row in out:
        if row.error:
            errors.append((row.query_id, row.error))
        else:
            by_id[row.query_id].caption, by_id[row.query_id].vector = row.caption, list(row.vector)
    return errors


def indexed(lake: Lake, config: EncoderConfig, version: str, image_ids: list[str]) -> dict[str, tuple[str, list[float]]]:
    """image_id -> (caption, features) of the images this captioner version captioned."""
    captions, vectors = indexed_captions(lake, version, image_ids), read_features(lake, config, image_ids)
    return {image_id: (caption, vectors[image_id].tolist()) for image_id, caption in captions.items()
            if image_id in vectors}


def indexed_captions(lake: Lake, version: str, image_ids) -> dict[str, str]:
    """image_id -> the caption this captioner version gave it (images it did not caption are left out)."""
    wanted = pa.array(sorted(set(image_ids)), pa.string())
    rows = lake.table("captions").dataset().to_table(columns=["image_id", "caption"], filter=(
        ds.field("image_id").isin(wanted) & (ds.field("model_version") == version) & (ds.field("status") == "ok")))
    return dict(zip(rows.column("image_id").to_pylist(), rows.column("caption").to_pylist()))


def _caption_partition(context: IndexContext, limits: Limits, batches: Iterator[pa.RecordBatch]):
    captioner, config, filesystems = context.captioner(), context.encoder, {}

    def read(row: dict) -> bytes:
        data = read_bytes(row["uri"], config.s3, filesystems, limits.max_bytes)
        inspect_image(data, limits)  # the same checks as ingest: size, format, pixels, full decode
        return data

    rows = ({**row, "image_id": row["query_id"]} for batch in batches for row in batch.to_pylist())
    for chunk in encode_chunks(config, rows, read):
        decoded = captioner.decode(chunk.vectors, context.decoding) if chunk.rows else []
        out = [{"query_id": row["query_id"], "caption": best[0][0], "vector": vector.tolist(), "error": None}
               for row, best, vector in zip(chunk.rows, decoded, chunk.vectors)]
        out += [{"query_id": row["query_id"], "caption": None, "vector": None, "error": error}
                for row, error in chunk.failed]
        yield pa.RecordBatch.from_pylist(out, schema=pa.schema([
            ("query_id", pa.string()), ("caption", pa.string()), ("vector", pa.list_(pa.float32())),
            ("error", pa.string())]))


# The captions searched.
def lake_captions(spark: SparkSession, lake: Lake, settings: Settings, version: str,
                  kinds: tuple[str, ...] | None = None) -> tuple[DataFrame, int]:
    """(image_id, uri, caption, references[, title, description, tags, given]) of the version's ok captions,
    with the source texts of the chosen reference kinds (default bleu.references), and how many there are."""
    kinds = tuple(settings.bleu.references) if kinds is None else kinds
    captions = read_table(spark, lake.table("captions"),
                          ["image_id", "uri", "caption", "references", "model_version", "status"])
    captions = captions.where((F.col("model_version") == version) & (F.col("status") == "ok"))
    captions = captions.select("image_id", "uri", "caption", "references")
    sources = [kind for kind in SOURCE if kind in kinds]
    if sources:
        manifest = read_table(spark, lake.table("manifest"),
                              ["image_id", "status", *dict.fromkeys(SOURCE_COLUMNS[kind] for kind in sources)])
        firsts = manifest.where(F.col("status") != "failed").groupBy("image_id").agg(
            *(F.first(SOURCE_COLUMNS[kind], ignorenulls=True).alias(kind) for kind in sources))
        captions = captions.join(firsts, "image_id", "left")
    count = sum(r["rows"] for r in lake.table("captions").commits() if r.get("model_version") == version)
    return captions, count


def table_captions(spark: SparkSession, uri: str, settings: Settings) -> tuple[DataFrame, int]:
    """Any Parquet dataset with image_id and caption (and uri, and references as the captions table has
    them) columns, read by the executors."""
    fs, path = open_filesystem(uri, settings.s3)
    try:
        if fs.get_file_info(f"{path}/_delta_log").type == pafs.FileType.Directory:  # a Delta table: its latest version
            from deltalake import DeltaTable

            options = delta_storage_options(settings.s3) if uri.startswith("s3://") else None
            files = [f.split("://", 1)[1] if "://" in f else f
                     for f in DeltaTable(uri, storage_options=options).file_uris()]
            dataset = ds.dataset(files, filesystem=fs, format="parquet")
        else:
            dataset = ds.dataset(path, filesystem=fs, format="parquet")
    except (OSError, pa.ArrowInvalid) as exc:
        raise UsageError(f"captions table {uri} cannot be read: {str(exc).splitlines()[0]}") from None
    missing = {"image_id", "caption"} - set(dataset.schema.names)
    if missing:
        raise UsageError(f"captions table {uri} has no {', '.join(sorted(missing))} column")
    present = [c for c in ("image_id", "uri", "caption", "references") if c in dataset.schema.names]
    # Reading tasks of about CAPTIONS_PER_READ rows, made of whole row groups: a big file is read in parallel.
    pieces = []
    for fragment in dataset.get_fragments():
        fragment.ensure_complete_metadata()
        pieces += [(fragment.path, group.id, group.num_rows) for group in fragment.row_groups]
    tasks: list[tuple[str, list[int]]] = []
    rows_in_task = 0
    for path, group, rows in pieces:
        if not tasks or tasks[-1][0] != path or rows_in_task + rows > CAPTIONS_PER_READ:
            tasks.append((path, []))
            rows_in_task = 0
        tasks[-1][1].append(group)
        rows_in_task += rows
    reads = spark.createDataFrame(tasks, "path string, row_groups array<int>").repartition(max(1, min(len(tasks), 64)))
    schema = subschema(CAPTIONS, ["image_id", "uri", "caption", "references"])
    frame = reads.mapInArrow(partial(_read_row_groups, fs, present, schema), from_arrow_schema(schema))
    return frame, sum(rows for *_, rows in pieces)


def _read_row_groups(fs, columns: list[str], schema: pa.Schema, batches):
    for batch in batches:
        for path, groups in zip(batch.column("path").to_pylist(), batch.column("row_groups").to_pylist()):
            for part in pq.ParquetFile(path, filesystem=fs).iter_batches(row_groups=groups, columns=columns):
                data = {name: part.column(name) for name in columns}
                yield pa.RecordBatch.from_pydict({field.name: data[field.name].cast(field.type) if field.name in data
                                                  else pa.nulls(part.num_rows, field.type) for field in schema})


# The search.
def search(spark: SparkSession, captions: DataFrame, n_captions: int, queries: list[Query], params: BleuParams,
           kinds: tuple[str, ...], partitions: int = 0, pool: dict[str, int] | None = None) -> DataFrame:
    """Each query's exact top k (or pool[query_id], when wider) over the images' references of these kinds,
    as (query_id, rank, image_id, uri, caption, score, matched_kind, matched_text)."""
    wanted = [(q.query_id, q.words, max(q.k, (pool or {}).get(q.query_id, 0))) for q in queries]
    tasks = partitions or max(spark.sparkContext.defaultParallelism, -(-n_captions // CAPTIONS_PER_TASK))
    hits = captions.repartition(tasks).mapInArrow(
        partial(_search_partition, spark.sparkContext.broadcast(wanted), params, tuple(kinds)), HIT_DDL)
    limits = spark.createDataFrame([(query_id, k) for query_id, _, k in wanted], "query_id string, k int")
    order = Window.partitionBy("query_id").orderBy(F.col("score").desc(), F.col("image_id").asc())
    ranked = hits.withColumn("rank", F.row_number().over(order)).join(F.broadcast(limits), "query_id")
    return ranked.where(F.col("rank") <= F.col("k")).drop("k")


def _search_partition(wanted, params: BleuParams, kinds: tuple[str, ...],
                      batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    table = pa.Table.from_batches(list(batches))
    if not table.num_rows:
        return
    ids = table.column("image_id").to_pylist()
    references = reference_texts(table, kinds)
    index = build_index(ids, references, params.max_order)
    where = {image_id: i for i, image_id in enumerate(ids)}
    uris, captions = table.column("uri").to_pylist(), table.column("caption").to_pylist()
    out: list[dict] = []
    for query_id, query_words, k in wanted.value:
        hits = index.search(query_words, k, params)
        rows = [where[hit.image_id] for hit in hits]
        for hit, row, matched in zip(hits, rows, references.matched(query_words, rows, params)):
            kind, text = matched or (None, None)
            out.append(dict(query_id=query_id, image_id=hit.image_id, uri=uris[row], caption=captions[row],
                            score=hit.score, matched_kind=kind, matched_text=text))
    yield pa.RecordBatch.from_pylist(out, schema=HIT_SCHEMA)


def blend(spark: SparkSession, ranked: DataFrame, features: DataFrame, queries: list[Query], weight: float) -> DataFrame:
    """Hybrid ranking for image queries: cosine of features, blended with BLEU, re-ranked."""
    vectors = {q.query_id: q.vector for q in queries if q.vector is not None}
    pool = ranked.where(F.col("query_id").isin(list(vectors)))
    scored = features.join(F.broadcast(pool), "image_id").mapInArrow(
        partial(_cosines, spark.sparkContext.broadcast(vectors), weight),
        HIT_DDL + ", visual_similarity double, blended_score double")
    order = Window.partitionBy("query_id").orderBy(F.col("blended_score").desc(), F.col("image_id").asc())
    return scored.withColumn("rank", F.row_number().over(order))


def _cosines(vectors, weight: float, batches):
    for batch in batches:
        if not batch.num_rows:
            continue
        dim = len(batch.column("vector")[0])
        images = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float64)
        queries = np.array([vectors.value[q] for q in batch.column("query_id").to_pylist()], np.float64)
        norms = np.linalg.norm(images, axis=1) * np.linalg.norm(queries, axis=1)
        cosine = np.where(norms > 0, (images * queries).sum(axis=1) / np.where(norms > 0, norms, 1), 0.0)
        bleu = batch.column("score").to_numpy()
        yield pa.RecordBatch.from_pydict({
            **{name: batch.column(name) for name in HIT_SCHEMA.names},
            "visual_similarity": cosine, "blended_score": (1 - weight) * bleu + weight * cosine})


# The whole run.
def run(spark: SparkSession, lake: Lake, settings: Settings, query_file: str, *, captions_table: str | None = None,
        progress: Report | None = None) -> QuerySummary:
    """Answer a query file; the results and errors are committed in queries/<run_id>/."""
    clock = time.monotonic()
    run_id = new_run_id()
    summary = QuerySummary(run_id, lake.uri_of(lake.path("queries", run_id)))
    queries, errors = read_queries(query_file, settings)
    summary.queries = len(queries) + len(errors)
    stages = Counter(read=time.monotonic() - clock)

    with tracked(spark, f"query {query_file}", progress):
        clock = time.monotonic()
        card = _card(lake, settings) if captions_table else store.card(lake, settings.captioner.version)
        errors += caption_image_queries(spark, lake, settings, queries, card)
        queries = [q for q in queries if q.text is not None or q.caption is not None]
        stages["caption images"] = time.monotonic() - clock

        clock = time.monotonic()
        if captions_table:
            captions, n_captions = table_captions(spark, captions_table, settings)
        else:
            captions, n_captions = lake_captions(spark, lake, settings, card["version"])
        hybrid = settings.query.hybrid and captions_table is None
        pool = {q.query_id: q.k * settings.query.hybrid_pool for q in queries if hybrid and q.vector is not None}
        ranked = search(spark, captions, n_captions, queries, bleu_params(settings), tuple(settings.bleu.references),
                        settings.spark.partitions, pool) if queries else spark.createDataFrame([], HIT_DDL + ", rank int")
        rows = _with_query_columns(spark, ranked, queries, run_id)
        if pool:
            config = encoder_config(settings, spark.sparkContext.defaultParallelism)
            features = read_table(spark, config.table(lake), ["image_id", "vector"])
            blended = _with_query_columns(spark, blend(spark, ranked, features, queries, settings.query.visual_weight),
                                          queries, run_id)
            rows = rows.where(~F.col("query_id").isin(list(pool))).unionByName(blended.where(
                F.col("rank") <= F.col("k_wanted")), allowMissingColumns=True)
        results, errors_table = lake.query_tables(run_id)
        parts, counts = write_run(rows.select(*RESULTS.names), results, run_id,
                                  count=lambda batch: Counter(batch.column("query_id").to_pylist()))
        results.commit(run_id, parts, job="query")
        stages["search"] = time.monotonic() - clock

    answered = set(counts) - {"seconds:write"}
    errors += [(q.query_id, "no-match: no word of the query is in any indexed text")
               for q in queries if q.query_id not in answered]
    _write_errors(errors_table, errors, run_id)
    summary.answered = len(answered)
    summary.answered_queries = [q for q in queries if q.query_id in answered]
    summary.error_rows = errors
    summary.results = sum(n for key, n in counts.items() if key in answered)
    summary.errors = dict(Counter(reason.split(":")[0] for _, reason in errors))
    summary.stages = dict(stages)
    return summary


def _card(lake: Lake, settings: Settings) -> dict | None:
    """The captioner's card, or None when the lake has none (text queries can still search a captions table)."""
    try:
        return store.card(lake, settings.captioner.version)
    except UsageError:
        return None


def _with_query_columns(spark, ranked: DataFrame, queries: list[Query], run_id: str) -> DataFrame:
    """Add the query's generated caption, its k, the run id, and empty hybrid columns where none."""
    info = spark.createDataFrame([(q.query_id, q.caption, q.k) for q in queries],
                                 "query_id string, query_caption string, k_wanted int")
    out = ranked.join(F.broadcast(info), "query_id").withColumn("run_id", F.lit(run_id))
    for name in ("visual_similarity", "blended_score"):
        if name not in out.columns:
            out = out.withColumn(name, F.lit(None).cast("double"))
    return out.withColumn("rank", F.col("rank").cast("int"))


def _write_errors(table, errors: list[tuple[str, str]], run_id: str) -> None:
    writer = table.part_writer(run_id)
    writer.write(pa.RecordBatch.from_pylist([{"query_id": q, "reason": r, "run_id": run_id} for q, r in errors],
                                            schema=ERRORS))
    table.commit(run_id, [writer.close()], job="query")



def search_one(spark: SparkSession, lake: Lake, settings: Settings, query: Query) -> tuple[Query, list[dict]]:
    """One query, answered without writing a run: (the query, with its caption if an image; its top k)."""
    card = store.card(lake, settings.captioner.version)
    failed = caption_image_queries(spark, lake, settings, [query], card)
    if failed:
        raise UsageError(f"{query.image}: {failed[0][1]}")
    if not query.words:
        raise UsageError("the query has no words")
    if long := too_many_words(query.text, settings.query.max_words):
        raise UsageError(f"the query is too long: {long}")
    captions, n_captions = lake_captions(spark, lake, settings, card["version"])
    ranked = search(spark, captions, n_captions, [query], bleu_params(settings), tuple(settings.bleu.references),
                    settings.spark.partitions)
    return query, [row.asDict() for row in ranked.orderBy("rank").collect()]
