"""Search in Spark tasks: the captions are spread over tasks by image; each task builds the searcher's
index of its share and answers every query exactly (the queries are broadcast); the tasks' top k are
merged into each query's global top k. A text query with a picture (jobs.searcher.Index.ranked) is
re-ranked as in one process: each task gives its top pool by BLEU with the blended score, the merge
keeps the global top pool by BLEU and ranks it by the blend. For hybrid image queries, visual
similarity on the stored features re-ranks a wider pool."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from cbir.bleu import BleuParams
from cbir.lake import Lake
from jobs.captions import Captions
from jobs.queries import Query
from jobs.searcher import HIT_SCHEMA, OFF, Index, PrototypeRanking, blend, first_per_image, with_sources

CAPTIONS_PER_TASK = 500_000  # a task indexes its share once and answers every query: few, large shares
HIT_DDL = (
    "query_id string, image_id string, uri string, caption string, score double, matched_kind string, "
    "matched_text string"
)
# score is the blend when re-ranked; visual: the cosine with the query's picture
TASK_SCHEMA = HIT_SCHEMA.append(pa.field("bleu", pa.float64())).append(pa.field("visual", pa.float64()))


def search(
    spark: SparkSession,
    captions: Captions,
    queries: list[Query],
    params: BleuParams,
    kinds: tuple[str, ...],
    partitions: int = 0,
    pool: dict[str, int] | None = None,
    ranking: PrototypeRanking = OFF,
) -> DataFrame:
    """Each query's exact top k (or pool[query_id], when wider) over the images' references of these kinds,
    as (query_id, rank, image_id, uri, caption, score, matched_kind, matched_text); queries with a picture
    re-ranked by it (ranking)."""
    wanted = []
    for q in queries:
        k = max(q.k, (pool or {}).get(q.query_id, 0))
        picture = q.picture if ranking.on else None
        wanted.append((q.query_id, q.words, k, k if picture is None else max(k, ranking.pool), picture))
    tasks = partitions or max(spark.sparkContext.defaultParallelism, -(-captions.rows // CAPTIONS_PER_TASK))
    everyone = ranking.everyone(captions.rows)  # for the whole index: every task decides alike
    search_share = partial(
        _search_partition,
        spark.sparkContext.broadcast(wanted),
        params,
        tuple(kinds),
        captions.sources,
        ranking,
        everyone,
    )
    hits = captions.frame.repartition(tasks, "image_id").mapInArrow(
        search_share, HIT_DDL + ", bleu double, visual double"
    )
    limits = spark.createDataFrame(
        [(query_id, k, limit) for query_id, _, k, limit, _ in wanted], "query_id string, k int, pool int"
    )
    hits = hits.join(F.broadcast(limits), "query_id")
    if any(picture is not None for *_, picture in wanted):
        # The global pool by BLEU keeps its blend; any other image (a task's pool or its most alike) ranks by
        # likeness alone when every image is ranked, else not at all: as Index.ranked in one process.
        by_bleu = Window.partitionBy("query_id").orderBy(F.col("bleu").desc(), F.col("image_id").asc())
        in_pool = (F.row_number().over(by_bleu) <= F.col("pool")) & (F.col("bleu") > 0)
        alone = F.lit(ranking.weight) * F.col("visual") if everyone else F.lit(None).cast("double")
        hits = hits.withColumn("score", F.when(in_pool, F.col("score")).otherwise(alone)).where(
            F.col("score").isNotNull()
        )
    order = Window.partitionBy("query_id").orderBy(F.col("score").desc(), F.col("image_id").asc())
    ranked = hits.withColumn("rank", F.row_number().over(order))
    return ranked.where(F.col("rank") <= F.col("k")).select(*HIT_SCHEMA.names, "rank")


def _search_partition(
    wanted,
    params: BleuParams,
    kinds: tuple[str, ...],
    sources: Lake | None,
    ranking: PrototypeRanking,
    everyone: bool,
    batches: Iterator[pa.RecordBatch],
) -> Iterator[pa.RecordBatch]:
    batches = list(batches)
    table = pa.Table.from_batches(batches) if batches else None  # a share may be empty: the rows go by image_id
    if table is None or not table.num_rows:
        return
    table = first_per_image(table)  # all of an image's rows are in this task
    table = table if sources is None else with_sources(sources, table, kinds)
    index = Index.build(table, kinds, params.max_order).with_prototypes(None, ranking)
    out = []
    for query_id, query_words, _, limit, picture in wanted.value:
        ranked = index.ranked(query_words, limit, params, picture, everyone, cut=False)
        hits = index.hits(query_words, ranked, params)
        out += [dict(query_id=query_id, bleu=bleu, visual=cos, **hit) for hit, (*_, bleu, cos) in zip(hits, ranked)]
    yield pa.RecordBatch.from_pylist(out, schema=TASK_SCHEMA)


def blend_visual(
    spark: SparkSession, ranked: DataFrame, features: DataFrame, queries: list[Query], weight: float
) -> DataFrame:
    """Hybrid ranking for image queries: cosine of features, blended with BLEU, re-ranked."""
    vectors = {q.query_id: q.vector for q in queries if q.vector is not None}
    pool = ranked.where(F.col("query_id").isin(list(vectors)))
    scored = features.join(F.broadcast(pool), "image_id").mapInArrow(
        partial(_cosines, spark.sparkContext.broadcast(vectors), weight),
        HIT_DDL + ", visual_similarity double, blended_score double",
    )
    order = Window.partitionBy("query_id").orderBy(F.col("blended_score").desc(), F.col("image_id").asc())
    return scored.withColumn("rank", F.row_number().over(order))


def _cosines(vectors, weight: float, batches):
    for batch in batches:
        if not batch.num_rows:
            continue
        dim = len(batch.column("vector")[0])
        images = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float64)
        queries = np.array([vectors.value[q] for q in batch.column("query_id").to_pylist()], np.float64)
        cosine, blended = blend(batch.column("score").to_numpy(), images, queries, weight)
        yield pa.RecordBatch.from_pydict(
            {
                **{name: batch.column(name) for name in HIT_SCHEMA.names},
                "visual_similarity": cosine,
                "blended_score": blended,
            }
        )
