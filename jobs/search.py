"""Search in Spark tasks: the captions are spread over tasks by image; each task holds a searcher
(search.searcher) over its share and gives every query's candidates (the plans are broadcast), each with
its texts; the candidates of each query are ranked again, together (with one share, by the task that
found them), by the same function that ranks in one process (search.ranking.rank), so the query job,
cbir eval, cbir search and cbir web rank alike. Only the final top k are then shown (the text of each
that matched: References.matched, as cbir search does).

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
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from cbir.lake import Lake
from cbir.references import SOURCE, References
from jobs.captions import Captions
from search import cache
from search.index import HIT_SCHEMA, Index, first_per_image, hit_rows, with_sources
from search.ranking import Candidate, rank
from search.searcher import Plan, Rules, Searcher

log = logging.getLogger("cbir.search")

# A share's search costs about as much over half its images as over all of them (the engine's pruning
# reads about as much either way): saved shares stay large, and several tasks search one, each for a
# slice of the queries. Without a state folder each task builds a share of its own.
CAPTIONS_PER_SHARE = 1_000_000
# a task's candidates: BLEU, the cosine with the query's picture (null: none), and what a hit needs to show
# itself (the image's texts, to find the one that matched: only for the final top k, once ranked)
CANDIDATES = pa.schema(
    [
        *[HIT_SCHEMA.field(name) for name in ("query_id", "image_id", "uri", "caption")],
        pa.field("bleu", pa.float64()),
        pa.field("cosine", pa.float64()),
        pa.field("resembles", pa.int32()),
        pa.field("texts", pa.list_(pa.string())),
        pa.field("kinds", pa.list_(pa.string())),
    ]
)
# a saved share's candidates for a slice of the queries, or one row without a query_id when the share is not
# there (damage: why)
OPENED = pa.schema(
    [*CANDIDATES, pa.field("share", pa.int32()), pa.field("slice", pa.int32()), pa.field("damage", pa.string())]
)
RANKED = pa.schema(
    [*HIT_SCHEMA, pa.field("cosine", pa.float64()), pa.field("resembles", pa.int32()), pa.field("rank", pa.int32())]
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
    matched_text, cosine, resembles, rank). With a state folder, the shares' indexes are saved and opened again."""
    if not plans:
        return spark.createDataFrame([], from_arrow_schema(RANKED))
    parallelism = spark.sparkContext.defaultParallelism
    needed = -(-captions.rows // CAPTIONS_PER_SHARE)
    broadcast = spark.sparkContext.broadcast(plans)
    opened = None
    if state_dir is None or captions.identity is None:
        shares = partitions or max(parallelism, needed)
        candidates = _built(
            captions, shares, partial(_candidates, broadcast, rules, captions.sources, None, None, None, 1)
        )
    else:
        shares = partitions or max(1, needed)
        slices = -(-parallelism // shares)
        opened, candidates = _saved_or_built(spark, captions, broadcast, rules, shares, slices, state_dir)
    # Every task's candidates of a query meet in one task, which ranks its queries one after another (a
    # grouped map would call Python once per query, with Arrow batches of a few rows each). With one share
    # they are met already: each task searched the whole share for its queries, and ranks where it is.
    if shares > 1:
        candidates = candidates.repartition(max(parallelism, shares), "query_id")  # a number: AQE keeps it
    ranked = candidates.mapInArrow(partial(_rank, broadcast, rules), from_arrow_schema(RANKED))
    if opened is not None:  # the opened shares' candidates are held until the results are no longer asked for
        weakref.finalize(ranked, opened.unpersist)
    return ranked


def _built(captions: Captions, tasks: int, share, saved: bool = False) -> DataFrame:
    """The shares' candidates, each task's share built from its rows (saved: with its number, in `_share`)."""
    # one share: its task reads the rows itself (no shuffle to write and read again)
    rows = captions.frame.coalesce(1) if tasks == 1 else captions.frame.repartition(tasks, "image_id")
    if saved:  # the shuffle's partition: a task's own partition id is another in a union's stage
        rows = rows.withColumn("_share", F.lit(0) if tasks == 1 else F.spark_partition_id())
    return rows.mapInArrow(share, from_arrow_schema(CANDIDATES))


def _saved_or_built(
    spark: SparkSession, captions: Captions, plans, rules: Rules, shares: int, slices: int, state_dir: str
) -> tuple[DataFrame, DataFrame]:
    """(the saved shares' candidates, persisted; those and the missed shares' candidates, built and saved).
    Each saved share is searched by `slices` tasks, task n for the queries n, n + slices, n + 2 * slices..."""
    kinds = rules.kinds
    identity = captions.identity
    if captions.sources is not None and any(kind in SOURCE for kind in kinds):  # the source texts are read too
        identity = {**identity, "tables": {**identity["tables"], **cache.lake_state(captions.sources, ["manifest"])}}
    key = cache.share_key(identity, kinds, rules.params.max_order, shares)
    tasks = spark.range(0, shares * slices, 1, shares * slices)  # a task per share and slice: it reads no caption
    opened = tasks.mapInArrow(
        partial(_open_shares, plans, rules, state_dir, key, slices), from_arrow_schema(OPENED)
    ).persist()
    missed: dict[int, set[int]] = {}  # share -> its slices not answered
    damage: dict[int, str] = {}
    for row in opened.where(F.col("query_id").isNull()).select("share", "slice", "damage").collect():
        missed.setdefault(row.share, set()).add(row.slice)
        if row.damage is not None:
            damage.setdefault(row.share, row.damage)
    for share, why in sorted(damage.items()):
        log.warning("search share %d of %d does not load (%s): building it again", share, shares, why)
    cache.STATS["shares opened"] += shares - len(missed)
    cache.STATS["shares built"] += len(missed)
    cache.STATS["shares discarded"] += len(damage)
    found = opened.where(F.col("query_id").isNotNull()).select(*CANDIDATES.names)
    if not missed:
        return opened, found
    rows = captions.frame
    if len(missed) < shares:  # the rows of the missed shares only: the partitioner's own hash
        rows = rows.where(F.pmod(F.hash("image_id"), F.lit(shares)).isin(sorted(missed)))
    build = partial(_candidates, plans, rules, captions.sources, state_dir, key, missed, slices)
    built = _built(Captions(rows, captions.rows), shares, build, saved=True)
    return opened, found.unionByName(built)


def _open_shares(plans, rules: Rules, state_dir: str, key: dict, slices: int, batches: Iterator[pa.RecordBatch]):
    for batch in batches:
        for task in batch.column(0).to_pylist():
            share, part = divmod(task, slices)
            index, damage = cache.open_share(state_dir, cache.share_of(key, share))
            if index is None:
                yield pa.RecordBatch.from_pylist([dict(share=share, slice=part, damage=damage)], schema=OPENED)
            else:
                yield _found(Searcher(index, rules), plans.value[part::slices], share, part)


def _candidates(
    plans,
    rules: Rules,
    sources: Lake | None,
    state_dir: str | None,
    key: dict | None,
    missed: dict[int, set[int]] | None,
    slices: int,
    batches,
):
    """A share's candidates. With a key its index is saved, and `missed` (share -> its slices not answered, of
    `slices`) says which plans it answers: those of its missed slices, on as many threads
    (while a share is built, the cores that would have searched its other slices have no task). A share
    without images is not saved: it has no rows to tell its number (only a lake with fewer images than shares
    has one, and reading it again is cheap)."""
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
    if missed is None:
        yield _found(Searcher(index, rules), plans.value)
    else:
        gone = missed[share]
        asked = [plan for i, plan in enumerate(plans.value) if i % slices in gone]
        yield _found(Searcher(index, rules), asked, threads=len(gone))


def _found(
    searcher: Searcher, plans: list[Plan], share: int | None = None, part: int = 0, threads: int = 1
) -> pa.RecordBatch:
    """Every plan's candidates in this share, with what each needs to be shown (Arrow takes, no row loop).
    The engine's kernel releases the GIL: on `threads` threads, plans are searched side by side."""
    with ThreadPoolExecutor(threads) as pool:
        each = list(pool.map(searcher.candidates, plans))
    query_ids = [plan.query_id for plan, candidates in zip(plans, each) for _ in candidates]
    found = [c for candidates in each for c in candidates]
    schema = CANDIDATES if share is None else OPENED
    if not found:
        return pa.RecordBatch.from_pylist([], schema=schema)
    rows = [c.row for c in found]
    index = searcher.index
    texts, kinds = index.references.take(rows).lists()
    columns = {
        "query_id": pa.array(query_ids, pa.string()),
        **index.table.select(["image_id", "uri", "caption"]).take(pa.array(rows, pa.int64())).to_pydict(),
        "bleu": pa.array([c.bleu for c in found], pa.float64()),
        "cosine": pa.array([c.cosine for c in found], pa.float64()),
        "resembles": pa.array([c.resembles for c in found], pa.int32()),
        "texts": texts,
        "kinds": kinds,
    }
    if share is not None:
        columns |= {
            "share": pa.array([share] * len(found), pa.int32()),
            "slice": pa.array([part] * len(found), pa.int32()),
            "damage": pa.nulls(len(found), pa.string()),
        }
    return pa.RecordBatch.from_pydict(columns, schema=schema)


def _rank(plans, rules: Rules, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The queries' candidates from every task, each query ranked and its top k shown (an image given twice,
    by a share opened and built again when Spark recomputes a lost partition, counts once)."""
    batches = [batch for batch in batches if batch.num_rows]
    if not batches:
        return
    table = pa.Table.from_batches(batches)
    asked = {plan.query_id: plan for plan in plans.value}
    found: dict[str, dict[str, Candidate]] = {}
    names = ("query_id", "image_id", "bleu", "cosine", "resembles")
    for row, (query_id, image_id, bleu, cosine, resembles) in enumerate(
        zip(*(table.column(name).to_pylist() for name in names))
    ):
        found.setdefault(query_id, {}).setdefault(image_id, Candidate(image_id, bleu, cosine, row, resembles))
    winners, scores, ranks = [], [], []
    for query_id, candidates in found.items():
        plan = asked[query_id]
        for n, (score, c) in enumerate(rank(candidates.values(), plan.k, plan.likeness), start=1):
            winners.append(c.row)
            scores.append(score)
            ranks.append(n)
    taken = table.take(pa.array(winners, pa.int64()))
    words = [asked[query_id].words for query_id in taken.column("query_id").to_pylist()]
    references = References.from_lists(taken.column("texts").combine_chunks(), taken.column("kinds").combine_chunks())
    hits = hit_rows(taken, references.matched(words, rules.params))
    ranked = {
        **{
            name: [hit[name] for hit in hits] for name in ("image_id", "uri", "caption", "matched_kind", "matched_text")
        },
        "query_id": taken.column("query_id"),
        "score": scores,
        "cosine": taken.column("cosine"),
        "resembles": taken.column("resembles"),
        "rank": ranks,
    }
    yield from pa.Table.from_pydict(ranked, schema=RANKED).to_batches()
