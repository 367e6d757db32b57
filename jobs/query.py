"""Query: a file of text and image queries -> the exact BLEU top k of every query over the captions.

Stages, each a function of its own module: read the query file (search.queries, driver) -> caption
the image queries (jobs.image_queries, Spark tasks) -> search, and blend with visual similarity for
hybrid image queries (jobs.search over jobs.captions, Spark tasks), writing the results' parts ->
commit the results -> commit the errors, in the run's folder, queries/<run_id>/. `run` calls the
stages in order through `stage`, so a flow can run each as a task of its own.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cbir.errors import UsageError
from cbir.images import Failure
from cbir.lake import Lake, Table, new_run_id
from cbir.schemas import ERRORS, RESULTS
from cbir.settings import Settings
from jobs.captions import lake_captions, table_captions
from jobs.image_queries import caption_image_queries
from jobs.lakeio import write_run
from jobs.progress import Report, tracked
from jobs.search import search
from models import store
from search.pictures import load_pictures
from search.queries import Query, read_queries
from search.searcher import Plan, Rules

Stage = Callable[..., object]  # stage(name, function, *args) -> function(*args), run as the caller sees fit


def run_stage(name: str, function, *args):
    """A stage run as it is (a flow runs each as a task: flows/query.py)."""
    return function(*args)


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
        rows = [
            {"what": "queries", "count": self.queries},
            {"what": "answered", "count": self.answered},
            {"what": "results", "count": self.results},
        ]
        rows += [{"what": f"error: {reason}", "count": n} for reason, n in sorted(self.errors.items())]
        rows += [{"what": f"seconds: {stage}", "count": round(s, 2)} for stage, s in self.stages.items()]
        return rows


def run(
    spark: SparkSession,
    lake: Lake,
    settings: Settings,
    query_file: str,
    *,
    captions_table: str | None = None,
    progress: Report | None = None,
    stage: Stage = run_stage,
) -> QuerySummary:
    """Answer a query file; the results and errors are committed in queries/<run_id>/."""
    clock = time.monotonic()
    run_id = new_run_id()
    summary = QuerySummary(run_id, lake.uri_of(lake.path("queries", run_id)))
    queries, errors = stage("read the query file", read_queries, query_file, settings)
    summary.queries = len(queries) + len(errors)
    stages = Counter(read=time.monotonic() - clock)
    results, errors_table = lake.query_tables(run_id)

    with tracked(spark, f"query {query_file}", progress):
        clock = time.monotonic()
        card = _card(lake, settings) if captions_table else store.card(lake, settings.captioner.version)
        queries, failed = stage("caption image queries", caption_image_queries, spark, lake, settings, queries, card)
        errors += failed
        stages["caption images"] = time.monotonic() - clock

        clock = time.monotonic()
        parts, counts = stage("search", search_and_write, spark, lake, settings, queries, card, captions_table, run_id)
        stage(
            "commit the results", partial(results.commit, job="query"), run_id, parts
        )  # a retry is safe: commits are idempotent
        stages["search"] = time.monotonic() - clock

    answered = set(counts)
    errors += [
        (q.query_id, Failure.of("no-match", "no word of the query is in any indexed text"))
        for q in queries
        if q.query_id not in answered
    ]
    stage("commit the errors", write_errors, errors_table, errors, run_id)
    summary.answered = len(answered)
    summary.answered_queries = [q for q in queries if q.query_id in answered]
    summary.error_rows = errors
    summary.results = sum(n for key, n in counts.items() if key in answered)
    summary.errors = dict(Counter(error.reason for _, error in errors))
    summary.stages = dict(stages)
    return summary


def search_and_write(
    spark: SparkSession,
    lake: Lake,
    settings: Settings,
    queries: list[Query],
    card: dict | None,
    captions_table: str | None,
    run_id: str,
) -> tuple[list[tuple[str, int]], Counter]:
    """Search the captions (a table's, or the lake's of the card's version) and write the results' parts:
    (the parts to commit, results per query_id)."""
    if captions_table:
        captions = table_captions(spark, captions_table, settings)
    else:
        captions = lake_captions(spark, lake, card["version"])
    rules = Rules.from_settings(settings)
    pictures = None
    if card is not None and captions_table is None and (rules.text_pictures or rules.image_pictures):
        # (a captions table's images have no likeness vectors)
        pictures = load_pictures(lake, card["version"], rules.prototype_images, rules.params.max_order)
    plans = [rules.plan(q.query_id, q.words, q.k, captions.rows, pictures, q.vector) for q in queries]
    ranked = search(spark, captions, plans, rules, settings.spark.partitions, settings.state_dir)
    return write_run(
        _with_query_columns(spark, ranked, plans, queries, run_id).select(*RESULTS.names),
        lake.query_tables(run_id)[0],
        run_id,
        count=lambda batch: Counter(batch.column("query_id").to_pylist()),
    )


def write_errors(table: Table, errors: list[tuple[str, Failure]], run_id: str) -> None:
    """Write and commit the error rows. Safe to retry: an unfinished try's part is left out of the commit."""
    writer = table.part_writer(run_id)
    rows = [{"query_id": q, "error": error, "reason": error.reason, "run_id": run_id} for q, error in errors]
    writer.write(pa.RecordBatch.from_pylist(rows, schema=ERRORS))
    table.commit(run_id, [writer.close()], job="query")


def _card(lake: Lake, settings: Settings) -> dict | None:
    """The captioner's card, or None when the lake has none (text queries can still search a captions table)."""
    try:
        return store.card(lake, settings.captioner.version)
    except UsageError:
        return None


def _with_query_columns(spark, ranked: DataFrame, plans: list[Plan], queries: list[Query], run_id: str) -> DataFrame:
    """Add the query's generated caption and the run id; the cosine and the blended score where a picture ranked."""
    info = spark.createDataFrame(
        [(q.query_id, q.caption, p.likeness is not None) for q, p in zip(queries, plans)],
        "query_id string, query_caption string, pictured boolean",
    )
    out = ranked.join(F.broadcast(info), "query_id").withColumn("run_id", F.lit(run_id))
    pictured = F.col("pictured") & F.col("cosine").isNotNull()
    return (
        out.withColumn("visual_similarity", F.when(pictured, F.col("cosine")))
        .withColumn("blended_score", F.when(pictured, F.col("score")))
        .withColumn("rank", F.col("rank").cast("int"))
    )
