"""Evaluate retrieval on a table of (uri, caption[, category]) whose images are ingested and indexed.

Text to image: every ground-truth caption is a query; its own image is the target; recall@1/5/10
is the share of queries whose target ranks that high. Images are searched by the texts cbir
generated for them (captions and labels), never by their source texts. Image to image: every image with a
category is a query by its generated caption (itself left out of its results); AP@10 counts the
other images of its category among the top 10, and mAP@10 is their mean over queries.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.dataset as ds
from pyspark.sql import SparkSession

from cbir.errors import UsageError
from cbir.lake import Lake
from cbir.reader import read_rows, resolve_source, resolve_uri, text_value
from cbir.references import GENERATED, reference_texts
from cbir.settings import Settings
from cbir.text import words
from jobs.captions import lake_captions
from jobs.search import search
from models import store
from search.index import version_captions
from search.queries import Query
from search.searcher import Rules

RECALL_AT = (1, 5, 10)


@dataclass
class EvalSummary:
    r_at_1: float
    r_at_5: float
    r_at_10: float
    map_at_10: float
    image_r_at_10: float  # image queries with another image of their category in their top 10
    queries: int
    image_queries: int
    reachable: float  # the best recall any ranking of these references could reach: the target shares a word
    seconds: float

    def rows(self) -> list[dict]:
        return [
            {"what": key, "value": round(value, 4) if isinstance(value, float) else value}
            for key, value in asdict(self).items()
        ]

    def as_dict(self) -> dict:
        """The metrics `cbir eval --json` prints and the flow returns: its contract's keys."""
        keys = ("r_at_1", "r_at_5", "r_at_10", "map_at_10", "queries", "image_r_at_10", "reachable")
        return {key: getattr(self, key) for key in keys}


def read_table_rows(uri: str, settings: Settings) -> list[dict]:
    """(uri, caption, category) rows; a row without uri or caption is not a query."""
    source = resolve_source(uri, settings, columns=("uri", "caption"), what="evaluation table")
    rows = []
    for row in read_rows(source):
        if isinstance(row, dict) and text_value(row.get("uri")) and text_value(row.get("caption")):
            try:
                rows.append(
                    {
                        "uri": resolve_uri(source, text_value(row["uri"])),
                        "caption": text_value(row["caption"]),
                        "category": text_value(row.get("category")),
                    }
                )
            except ValueError:
                continue
    if not rows:
        raise UsageError(f"evaluation table {uri} has no row with both a uri and a caption")
    return rows


def recall_at(ranks: list[int | None], k: int) -> float:
    """Share of queries whose target is ranked k or better (None: not in the results)."""
    return sum(1 for rank in ranks if rank is not None and rank <= k) / len(ranks) if ranks else 0.0


def average_precision_at(relevant: list[bool], total_relevant: int, k: int = 10) -> float:
    """AP@k: the mean of precision@i at each relevant rank i <= k, over min(total_relevant, k)."""
    hits, precisions = 0, []
    for i, is_relevant in enumerate(relevant[:k], start=1):
        if is_relevant:
            hits += 1
            precisions.append(hits / i)
    return sum(precisions) / min(total_relevant, k) if total_relevant else 0.0


@dataclass
class EvalJob:
    """Measure retrieval on a captioned table's images, ingested and indexed already (the flow does both
    first), in jobs.job's shape: plan finds the images, work searches in Spark and measures; nothing is
    committed."""

    lake: Lake
    settings: Settings
    table_rows: list[dict]
    kind: str = "eval"
    steps = {"plan": "find the images", "work": "measure retrieval", "commit": "commit"}

    def describe(self) -> str:
        return "eval"

    def plan(self) -> tuple[dict, list[dict], tuple[str, ...]]:
        return plan(self.lake, self.settings, self.table_rows)

    def has_work(self, planned) -> bool:
        return True

    def work(self, spark: SparkSession, planned, progress) -> EvalSummary:
        return measure(spark, self.lake, self.settings, *planned)

    def commit(self, summary: EvalSummary) -> None:
        pass  # a measurement writes nothing

    def abort(self, summary: EvalSummary) -> None:
        pass

    def tally(self, planned, summary: EvalSummary | None) -> EvalSummary:
        return summary


def plan(lake: Lake, settings: Settings, table_rows: list[dict]) -> tuple[dict, list[dict], tuple[str, ...]]:
    """The captioner's card, the table's rows whose images the lake has (with their image_id), and the
    reference kinds searched."""
    card = store.card(lake, settings.captioner.version)
    uris = pa.array(sorted({row["uri"] for row in table_rows}), pa.string())
    manifest = (
        lake.table("manifest")
        .dataset()
        .to_table(columns=["uri", "image_id", "status"], filter=ds.field("uri").isin(uris))
        .to_pylist()
    )
    image_of = {r["uri"]: r["image_id"] for r in manifest if r["status"] in ("ok", "duplicate")}
    rows = [dict(row, image_id=image_of[row["uri"]]) for row in table_rows if row["uri"] in image_of]
    if not rows:
        raise UsageError("none of the evaluation table's images is in the lake")
    # The images are searched by what cbir generated for them only: their source texts (the very captions
    # asked here, when the table was ingested as a manifest) would answer every query by themselves.
    kinds = tuple(kind for kind in settings.bleu.references if kind in GENERATED)
    if not kinds:
        raise UsageError("cbir eval measures what cbir generated: bleu.references names neither caption nor label")
    return card, rows, kinds


def measure(
    spark: SparkSession, lake: Lake, settings: Settings, card: dict, rows: list[dict], kinds: tuple[str, ...]
) -> EvalSummary:
    """Every caption asked as a text query, every categorised image by its caption, in one Spark search."""
    started = time.monotonic()
    captions = lake_captions(spark, lake, card["version"])
    rules = dataclasses.replace(Rules.from_settings(settings), kinds=kinds)
    pictures = rules.pictures(lake, card["version"])

    category = {row["image_id"]: row["category"] for row in rows if row["category"]}
    generated, vocabulary = _generated(lake, card["version"], [row["image_id"] for row in rows], kinds)
    # One search answers both kinds: texts are t<i>, images are asked by id (11: itself is left out) by their
    # caption, by BLEU alone.
    texts = [Query(f"t{i}", 10, text=row["caption"]) for i, row in enumerate(rows)]
    images = [Query(image_id, 11, text=generated[image_id]) for image_id in sorted(category) if generated.get(image_id)]
    plans = [rules.plan(q.query_id, q.words, q.k, captions.rows, pictures) for q in texts if q.words]
    plans += [rules.plan(q.query_id, q.words, q.k, captions.rows, None) for q in images if q.words]
    found = _ranked(search(spark, captions, plans, rules))
    ranks = [
        next((rank for image_id, rank in found.get(q.query_id, []) if image_id == row["image_id"]), None)
        for q, row in zip(texts, rows)
    ]
    reachable = sum(1 for q, row in zip(texts, rows) if vocabulary.get(row["image_id"], set()) & set(q.words))

    precisions, image_hits = [], []
    for q in images:
        others = [image_id for image_id, _ in found.get(q.query_id, []) if image_id != q.query_id][:10]
        total = sum(1 for image_id, c in category.items() if c == category[q.query_id] and image_id != q.query_id)
        if total:
            relevant = [category.get(i) == category[q.query_id] for i in others]
            precisions.append(average_precision_at(relevant, total))
            image_hits.append(any(relevant))
    return EvalSummary(
        r_at_1=recall_at(ranks, 1),
        r_at_5=recall_at(ranks, 5),
        r_at_10=recall_at(ranks, 10),
        map_at_10=sum(precisions) / len(precisions) if precisions else 0.0,
        image_r_at_10=sum(image_hits) / len(image_hits) if image_hits else 0.0,
        queries=len(ranks),
        image_queries=len(precisions),
        reachable=reachable / len(ranks) if ranks else 0.0,
        seconds=round(time.monotonic() - started, 1),
    )


def _generated(
    lake: Lake, version: str, image_ids: list[str], kinds: tuple[str, ...]
) -> tuple[dict[str, str], dict[str, set[str]]]:
    """For these images, in one read of the captions table: image_id -> its caption from this captioner
    version, and image_id -> every word of its references of these kinds."""
    table = version_captions(lake, version, kinds, image_ids)
    ids, references = table.column("image_id").to_pylist(), reference_texts(table, kinds)
    captions = dict(zip(ids, table.column("caption").to_pylist()))
    vocabulary = {
        image_id: {word for _, text in references.of(row) for word in words(text)} for row, image_id in enumerate(ids)
    }
    return captions, vocabulary


def _ranked(frame) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for row in frame.select("query_id", "image_id", "rank").collect():
        out.setdefault(row["query_id"], []).append((row["image_id"], row["rank"]))
    for hits in out.values():
        hits.sort(key=lambda hit: hit[1])
    return out
