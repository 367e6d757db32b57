"""Query: a file of text and image queries -> the exact BLEU top k of every query over the captions.

The job's shape (jobs.job): plan reads the query file (search.queries, driver); work captions the image
queries (jobs.image_queries, Spark tasks), searches (jobs.search over jobs.captions, Spark tasks) and
writes the results' and errors' parts; commit publishes both in the run's folder, queries/<run_id>/.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cbir.errors import UsageError
from cbir.images import Failure
from cbir.lake import Lake, Table, new_run_id
from cbir.schemas import ERRORS, RESULTS
from cbir.settings import Settings
from jobs.captions import lake_captions, table_captions
from jobs.image_queries import caption_image_queries, resolve_examples
from jobs.lakeio import write_run
from jobs.progress import Report, tracked
from jobs.search import search
from models import store
from search.pictures import Pictures
from search.queries import Query, read_queries
from search.searcher import Plan, Rules


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


@dataclass
class QueryPlan:
    summary: QuerySummary
    queries: list[Query]
    errors: list[tuple[str, Failure]]  # the query file's bad rows
    card: dict | None


@dataclass
class Answered:
    """What the work staged: the results' and the errors' parts, and what they hold."""

    run_id: str
    results: list
    errors: list
    queries: list[Query]  # searched: text, and images with their caption
    counts: Counter  # results per query_id
    error_rows: list[tuple[str, Failure]]
    stages: dict[str, float]


@dataclass
class QueryJob:
    """Answer a query file; its results and errors are committed in queries/<run_id>/ (jobs.job's shape)."""

    lake: Lake
    settings: Settings
    query_file: str
    captions_table: str | None = None
    kind: str = "query"
    steps = {"plan": "read the query file", "work": "caption and search", "commit": "commit"}

    def describe(self) -> str:
        return f"query {self.query_file}"

    def plan(self) -> QueryPlan:
        run_id = new_run_id()
        summary = QuerySummary(run_id, self.lake.uri_of(self.lake.path("queries", run_id)))
        clock = time.monotonic()
        queries, errors = read_queries(self.query_file, self.settings)
        summary.queries, summary.stages = len(queries) + len(errors), {"read": time.monotonic() - clock}
        settings = self.settings
        card = _card(self.lake, settings) if self.captions_table else store.card(self.lake, settings.captioner.version)
        return QueryPlan(summary, queries, errors, card)

    def has_work(self, planned: QueryPlan) -> bool:
        return True  # even a file of bad rows commits its errors

    def work(self, spark: SparkSession, planned: QueryPlan, progress: Report | None) -> Answered:
        lake, settings, run_id = self.lake, self.settings, planned.summary.run_id
        with tracked(spark, self.describe(), progress):
            clock = time.monotonic()
            queries, failed = caption_image_queries(spark, lake, settings, planned.queries, planned.card)
            pictures = self._pictures(planned.card, queries)
            queries, unusable = resolve_examples(spark, lake, settings, queries, planned.card, pictures)
            captioned = time.monotonic()
            parts, counts = search_and_write(
                spark, lake, settings, queries, planned.card, pictures, self.captions_table, run_id
            )
        stages = {"caption images": captioned - clock, "search": time.monotonic() - captioned}
        errors = planned.errors + failed + unusable
        errors += [
            (q.query_id, Failure.of("no-match", "no word of the query is in any indexed text"))
            for q in queries
            if q.query_id not in counts
        ]
        error_part = write_errors(lake.query_tables(run_id)[1], errors, run_id)
        return Answered(run_id, parts, [error_part], queries, counts, errors, stages)

    def _pictures(self, card: dict | None, queries: list[Query]) -> Pictures | None:
        """The memory's pictures for these queries; none for a captions table (its images have no vectors)."""
        if card is None or self.captions_table:
            return None
        examples = any(q.positive or q.negative for q in queries)
        return Rules.from_settings(self.settings).pictures(self.lake, card["version"], examples=examples)

    def commit(self, answered: Answered) -> None:
        results, errors = self.lake.query_tables(answered.run_id)
        results.commit(answered.run_id, answered.results, job="query")
        errors.commit(answered.run_id, answered.errors, job="query")

    def abort(self, answered: Answered) -> None:
        for table in self.lake.query_tables(answered.run_id):
            table.abort(answered.run_id)

    def tally(self, planned: QueryPlan, answered: Answered | None) -> QuerySummary:
        summary = planned.summary
        summary.answered = len(answered.counts)
        summary.answered_queries = [q for q in answered.queries if q.query_id in answered.counts]
        summary.error_rows = answered.error_rows
        summary.results = sum(answered.counts.values())
        summary.errors = dict(Counter(error.reason for _, error in answered.error_rows))
        summary.stages = {**summary.stages, **answered.stages}
        return summary


def search_and_write(
    spark: SparkSession,
    lake: Lake,
    settings: Settings,
    queries: list[Query],
    card: dict | None,
    pictures: Pictures | None,
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
    plans = [rules.plan(q.query_id, q.words, q.k, captions.rows, pictures, q.vector, q.examples) for q in queries]
    ranked = search(spark, captions, plans, rules, settings.spark.partitions, settings.state_dir)
    return write_run(
        _with_query_columns(spark, ranked, plans, queries, run_id).select(*RESULTS.names),
        lake.query_tables(run_id)[0],
        run_id,
        count=lambda batch: Counter(batch.column("query_id").to_pylist()),
    )


def write_errors(table: Table, errors: list[tuple[str, Failure]], run_id: str):
    """Write the error rows' part, to commit with the results."""
    writer = table.part_writer(run_id)
    rows = [{"query_id": q, "error": error, "reason": error.reason, "run_id": run_id} for q, error in errors]
    writer.write(pa.RecordBatch.from_pylist(rows, schema=ERRORS))
    return writer.close()


def _card(lake: Lake, settings: Settings) -> dict | None:
    """The captioner's card, or None when the lake has none (text queries can still search a captions table)."""
    try:
        return store.card(lake, settings.captioner.version)
    except UsageError:
        return None


def _with_query_columns(spark, ranked: DataFrame, plans: list[Plan], queries: list[Query], run_id: str) -> DataFrame:
    """Add the query's generated caption, the run id, the likeness where a picture ranked, and the positive
    example each image resembles."""
    info = spark.createDataFrame(
        [(q.query_id, q.caption, p.likeness is not None, list(p.names)) for q, p in zip(queries, plans)],
        "query_id string, query_caption string, pictured boolean, names array<string>",
    )
    out = ranked.join(F.broadcast(info), "query_id").withColumn("run_id", F.lit(run_id))
    pictured = F.col("pictured") & F.col("cosine").isNotNull()
    example = F.when(F.col("resembles") >= 0, F.get(F.col("names"), F.col("resembles")))
    return (
        out.withColumn("likeness", F.when(pictured, F.col("cosine")))
        .withColumn("example", example)
        .withColumn("rank", F.col("rank").cast("int"))
    )
