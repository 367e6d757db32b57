"""Search in Spark tasks: the captions are spread over tasks by image; each task holds a searcher
(search.searcher) over its share and gives every query's candidates (the plans are broadcast); the
candidates of each query are ranked again, together, by the same function that ranks in one process
(search.ranking.rank), so the query job, cbir eval, cbir search and cbir web rank alike."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession

from cbir.lake import Lake
from jobs.captions import Captions
from search.index import HIT_SCHEMA, Index, first_per_image, with_sources
from search.ranking import Candidate, rank
from search.searcher import Plan, Rules, Searcher

CAPTIONS_PER_TASK = 500_000  # a task indexes its share once and answers every query: few, large shares
# a task's candidates: what each hit shows, its BLEU and its cosine with the query's picture (null: none)
CANDIDATES = HIT_SCHEMA.remove(HIT_SCHEMA.get_field_index("score")).append(pa.field("bleu", pa.float64()))
CANDIDATES = CANDIDATES.append(pa.field("cosine", pa.float64()))
RANKED = HIT_SCHEMA.append(pa.field("cosine", pa.float64())).append(pa.field("rank", pa.int32()))
HIT_DDL = (
    "query_id string, image_id string, uri string, caption string, score double, matched_kind string, "
    "matched_text string, cosine double, rank int"
)


def search(spark: SparkSession, captions: Captions, plans: list[Plan], rules: Rules, partitions: int = 0) -> DataFrame:
    """Each plan's top k over the images' references, as (query_id, image_id, uri, caption, score, matched_kind,
    matched_text, cosine, rank)."""
    if not plans:
        return spark.createDataFrame([], HIT_DDL)
    tasks = partitions or max(spark.sparkContext.defaultParallelism, -(-captions.rows // CAPTIONS_PER_TASK))
    share = partial(_candidates, spark.sparkContext.broadcast(plans), rules, captions.sources)
    candidates = captions.frame.repartition(tasks, "image_id").mapInArrow(share, _ddl(CANDIDATES))
    ranking = spark.sparkContext.broadcast({plan.query_id: (plan.k, plan.likeness) for plan in plans})

    def rank_query(table: pa.Table) -> pa.Table:  # a plain function: pyspark 4.0 fails to inspect a partial
        return _rank(ranking, table)

    return candidates.groupBy("query_id").applyInArrow(rank_query, HIT_DDL)


def _candidates(plans, rules: Rules, sources: Lake | None, batches: Iterator[pa.RecordBatch]):
    batches = list(batches)
    table = pa.Table.from_batches(batches) if batches else None  # a share may be empty: the rows go by image_id
    if table is None or not table.num_rows:
        return
    table = first_per_image(table)  # all of an image's rows are in this task
    table = table if sources is None else with_sources(sources, table, rules.kinds)
    searcher = Searcher(Index.build(table, rules.kinds, rules.params.max_order), rules)
    out = []
    for plan in plans.value:
        out += [dict(query_id=plan.query_id, bleu=c.bleu, cosine=c.cosine, **c.hit) for c in searcher.candidates(plan)]
    yield pa.RecordBatch.from_pylist(out, schema=CANDIDATES)


def _rank(ranking, table: pa.Table) -> pa.Table:
    """One query's candidates from every task, ranked."""
    rows = table.to_pylist()
    k, likeness = ranking.value[rows[0]["query_id"]]
    found = [Candidate(row["image_id"], row["bleu"], row["cosine"], row) for row in rows]
    ranked = [dict(c.hit, score=score, rank=n) for n, (score, c) in enumerate(rank(found, k, likeness), start=1)]
    return pa.Table.from_pylist(ranked, schema=RANKED)


def _ddl(schema: pa.Schema) -> str:
    names = {pa.string(): "string", pa.float64(): "double", pa.int32(): "int"}
    return ", ".join(f"{field.name} {names[field.type]}" for field in schema)
