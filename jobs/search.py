"""Search in Spark tasks: the captions are spread over tasks by image; each task holds a searcher
(search.searcher) over its share and gives every query's candidates (the plans are broadcast); the
candidates of each query are ranked again, together, by the same function that ranks in one process
(search.ranking.rank), so the query job, cbir eval, cbir search and cbir web rank alike.

Saved shares: with a state folder, a share's index is built once and saved (search.cache.save_share,
the format and checks of cbir search's cache) under `<state_dir>/search-index/shares/` of the machine
whose task built it. A share is the images whose image_id hashes to it, as `repartition(n, "image_id")`
spreads them (Spark's Murmur3 `pmod(hash(image_id), n)`): the same captions and the same number of
shares give every share the same images, run after run. A run first asks one task per share to open
it and give its candidates without reading any caption (a miss, or a damaged entry, is reported:
one warning per damaged share); only the shares missed are then built from the captions, and saved.
Local executors share the driver's state folder, so every run after the first opens them all. On a
cluster each executor keeps the shares it built in its own state folder, and a share asked of an
executor that has not built it is built again (and kept there too): a state folder on a filesystem
all executors mount finds every share every time. Shares are kept on local disk, not in the lake: an
index is opened memory-mapped, which an object store cannot do.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from functools import partial

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cbir.lake import Lake
from cbir.references import SOURCE
from jobs.captions import Captions
from search import cache
from search.index import HIT_SCHEMA, Index, first_per_image, with_sources
from search.ranking import Candidate, rank
from search.searcher import Plan, Rules, Searcher

log = logging.getLogger("cbir.search")

CAPTIONS_PER_TASK = 500_000  # a task indexes its share once and answers every query: few, large shares
# a task's candidates: what each hit shows, its BLEU and its cosine with the query's picture (null: none)
CANDIDATES = HIT_SCHEMA.remove(HIT_SCHEMA.get_field_index("score")).append(pa.field("bleu", pa.float64()))
CANDIDATES = CANDIDATES.append(pa.field("cosine", pa.float64()))
# a saved share's candidates, or one row without a query_id when the share is not there (damage: why)
OPENED = CANDIDATES.append(pa.field("share", pa.int32())).append(pa.field("damage", pa.string()))
RANKED = HIT_SCHEMA.append(pa.field("cosine", pa.float64())).append(pa.field("rank", pa.int32()))
HIT_DDL = (
    "query_id string, image_id string, uri string, caption string, score double, matched_kind string, "
    "matched_text string, cosine double, rank int"
)


def search(
    spark: SparkSession,
    captions: Captions,
    plans: list[Plan],
    rules: Rules,
    partitions: int = 0,
    state_dir: str | None = None,
) -> DataFrame:
    """Each plan's top k over the images' references, as (query_id, image_id, uri, caption, score, matched_kind,
    matched_text, cosine, rank). With a state folder, the shares' indexes are saved and opened again."""
    if not plans:
        return spark.createDataFrame([], HIT_DDL)
    tasks = partitions or max(spark.sparkContext.defaultParallelism, -(-captions.rows // CAPTIONS_PER_TASK))
    broadcast = spark.sparkContext.broadcast(plans)
    opened = None
    if state_dir is None or captions.identity is None:
        candidates = _built(captions, tasks, partial(_candidates, broadcast, rules, captions.sources, None, None))
    else:
        opened, candidates = _saved_or_built(spark, captions, broadcast, rules, tasks, state_dir)
    ranking = spark.sparkContext.broadcast({plan.query_id: (plan.k, plan.likeness) for plan in plans})

    def ranked_query(table: pa.Table) -> pa.Table:  # a function, not a partial: pyspark 4.3 reads its type hints
        return _rank(ranking, table)

    ranked = candidates.groupBy("query_id").applyInArrow(ranked_query, HIT_DDL)
    if opened is not None:  # the opened shares' candidates are held until the results are no longer asked for
        weakref.finalize(ranked, opened.unpersist)
    return ranked


def _built(captions: Captions, tasks: int, share, saved: bool = False) -> DataFrame:
    """The shares' candidates, each task's share built from its rows (saved: with its number, in `_share`)."""
    rows = captions.frame.repartition(tasks, "image_id")
    if saved:  # the shuffle's partition: a task's own partition id is another in a union's stage
        rows = rows.withColumn("_share", F.spark_partition_id())
    return rows.mapInArrow(share, _ddl(CANDIDATES))


def _saved_or_built(
    spark: SparkSession, captions: Captions, plans, rules: Rules, tasks: int, state_dir: str
) -> tuple[DataFrame, DataFrame]:
    """(the saved shares' candidates, persisted; those and the missed shares' candidates, built and saved)."""
    kinds = rules.kinds
    identity = captions.identity
    if captions.sources is not None and any(kind in SOURCE for kind in kinds):  # the source texts are read too
        identity = {**identity, "tables": {**identity["tables"], **cache.lake_state(captions.sources, ["manifest"])}}
    key = cache.share_key(identity, kinds, rules.params.max_order, tasks)
    shares = spark.range(0, tasks, 1, tasks)  # one task per share: it reads no caption
    opened = shares.mapInArrow(partial(_open_shares, plans, rules, state_dir, key), _ddl(OPENED)).persist()
    missed = opened.where(F.col("query_id").isNull()).select("share", "damage").collect()
    for row in sorted(missed, key=lambda row: row.share):
        if row.damage is not None:
            log.warning("search share %d of %d does not load (%s): building it again", row.share, tasks, row.damage)
    cache.STATS["shares opened"] += tasks - len(missed)
    cache.STATS["shares built"] += len(missed)
    cache.STATS["shares discarded"] += sum(row.damage is not None for row in missed)
    found = opened.where(F.col("query_id").isNotNull()).select(*CANDIDATES.names)
    if not missed:
        return opened, found
    rows = captions.frame
    if len(missed) < tasks:  # the rows of the missed shares only: the partitioner's own hash
        rows = rows.where(F.pmod(F.hash("image_id"), F.lit(tasks)).isin([row.share for row in missed]))
    build = partial(_candidates, plans, rules, captions.sources, state_dir, key)
    built = _built(Captions(rows, captions.rows), tasks, build, saved=True)
    return opened, found.unionByName(built)


def _open_shares(plans, rules: Rules, state_dir: str, key: dict, batches: Iterator[pa.RecordBatch]):
    for batch in batches:
        for share in batch.column(0).to_pylist():
            index, damage = cache.open_share(state_dir, cache.share_of(key, share))
            if index is None:
                yield pa.RecordBatch.from_pylist([dict(share=share, damage=damage)], schema=OPENED)
            else:
                yield _batch(Searcher(index, rules), plans, OPENED, share=share)


def _candidates(plans, rules: Rules, sources: Lake | None, state_dir: str | None, key: dict | None, batches):
    """A share's candidates; with a key, its index is saved too. A share without images is not: it has no rows
    to tell its number (only a lake with fewer images than shares has one, and reading it again is cheap)."""
    batches = list(batches)
    table = pa.Table.from_batches(batches) if batches else None  # a share may be empty: the rows go by image_id
    if table is None or not table.num_rows:
        return
    share = None
    if key is not None:
        share = table.column("_share")[0].as_py()
        table = table.drop_columns(["_share"])
    table = first_per_image(table)  # all of an image's rows are in this task
    table = table if sources is None else with_sources(sources, table, rules.kinds)
    index = Index.build(table, rules.kinds, rules.params.max_order)
    if key is not None:
        cache.save_share(state_dir, cache.share_of(key, share), index)
    yield _batch(Searcher(index, rules), plans, CANDIDATES)


def _batch(searcher: Searcher, plans, schema: pa.Schema, **extra) -> pa.RecordBatch:
    out = []
    for plan in plans.value:
        out += [
            dict(query_id=plan.query_id, bleu=c.bleu, cosine=c.cosine, **c.hit, **extra)
            for c in searcher.candidates(plan)
        ]
    return pa.RecordBatch.from_pylist(out, schema=schema)


def _rank(ranking, table: pa.Table) -> pa.Table:
    """One query's candidates from every task, ranked (an image given twice, by a share opened and built
    again when Spark recomputes a lost partition, counts once)."""
    first: dict[str, dict] = {}
    for row in table.to_pylist():
        first.setdefault(row["image_id"], row)
    rows = list(first.values())
    k, likeness = ranking.value[rows[0]["query_id"]]
    found = [Candidate(row["image_id"], row["bleu"], row["cosine"], row) for row in rows]
    ranked = [dict(c.hit, score=score, rank=n) for n, (score, c) in enumerate(rank(found, k, likeness), start=1)]
    return pa.Table.from_pylist(ranked, schema=RANKED)


def _ddl(schema: pa.Schema) -> str:
    names = {pa.string(): "string", pa.float64(): "double", pa.int32(): "int"}
    return ", ".join(f"{field.name} {names[field.type]}" for field in schema)
