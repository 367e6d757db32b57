"""The captions searched and their BLEU index: a captioner version's captions and references, one row
per image, read once (from the lake, or a Spark task's share); the index over them; the candidates a
query may rank, with their cosine to its picture; and what each hit shows (why it matched).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from cbir.bleu import BleuParams
from cbir.engine import BleuIndex
from cbir.lake import Lake
from cbir.references import SOURCE, SOURCE_COLUMNS, References, build_index, reference_texts
from cbir.schemas import CAPTIONS, subschema
from cbir.settings import Settings
from search.ranking import Candidate, cosines, top

if TYPE_CHECKING:
    from search.searcher import Plan

log = logging.getLogger("cbir.search")

CAPTION_COLUMNS = ["image_id", "uri", "caption", "references", "visual"]
HIT_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("caption", pa.string()),
        ("score", pa.float64()),
        ("matched_kind", pa.string()),
        ("matched_text", pa.string()),
    ]
)


def bleu_params(settings: Settings) -> BleuParams:
    return BleuParams(tuple(settings.bleu.weights), settings.bleu.smoothing, settings.bleu.auto_reweigh)


# The captions searched.
def version_captions(
    lake: Lake,
    version: str | None,
    kinds: Iterable[str],
    image_ids: Iterable[str] | None = None,
    extra: tuple[str, ...] = (),
) -> pa.Table:
    """The version's ok captions (image_id, uri, caption, references), one row per image, with the source
    texts of the chosen reference kinds and the manifest columns in `extra` (see with_sources)."""
    if version is None:  # no captioner yet: nothing is indexed
        return with_sources(lake, subschema(CAPTIONS, CAPTION_COLUMNS).empty_table(), kinds, extra)
    wanted = (
        (ds.field("model_version") == version)
        & (ds.field("status") == "ok")
        & ds.field("caption").is_valid()
        & ds.field("image_id").is_valid()
    )
    if image_ids is not None:
        wanted &= ds.field("image_id").isin(pa.array(sorted(set(image_ids)), pa.string()))
    table = lake.table("captions").dataset().to_table(columns=CAPTION_COLUMNS, filter=wanted)
    return with_sources(lake, first_per_image(table), kinds, extra)


def captions_of(lake: Lake, version: str, image_ids: Iterable[str]) -> dict[str, str]:
    """image_id -> the caption this captioner version gave it (images it did not caption are left out)."""
    table = version_captions(lake, version, (), image_ids)
    return dict(zip(table.column("image_id").to_pylist(), table.column("caption").to_pylist()))


def likeness_vectors(lake: Lake, version: str | None, image_ids: Iterable[str]) -> dict[str, np.ndarray] | None:
    """image_id -> its stored likeness vector (this captioner version's), or None when it has none."""
    table = version_captions(lake, version, (), image_ids)
    vectors = visual_vectors(table)
    return None if vectors is None else dict(zip(table.column("image_id").to_pylist(), vectors))


def first_per_image(table: pa.Table) -> pa.Table:
    """One row per image_id (the first), should a version have captioned an image twice."""
    if pc.count_distinct(table.column("image_id")).as_py() == table.num_rows:
        return table
    numbered = table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    first = numbered.group_by("image_id", use_threads=False).aggregate([("_row", "min")]).column("_row_min")
    return table.take(pc.sort_indices(first))


def with_sources(lake: Lake, table: pa.Table, kinds: Iterable[str], extra: tuple[str, ...] = ()) -> pa.Table:
    """`table` with a column per source kind of `kinds` (title, description, tags, given) and per manifest column
    of `extra`: for each image, the first value that its manifest rows that did not fail have (an image
    ingested twice, once with a title and once without, keeps the title)."""
    sources = {kind: SOURCE_COLUMNS[kind] for kind in SOURCE if kind in kinds}
    columns = list(dict.fromkeys([*extra, *sources.values()]))
    if not columns:
        return table
    ids = table.column("image_id").combine_chunks()
    manifest = (
        lake.table("manifest")
        .dataset()
        .to_table(
            columns=["image_id", *columns], filter=((ds.field("status") != "failed") & ds.field("image_id").isin(ids))
        )
    )
    firsts = _first_values(manifest, columns)
    at = pc.index_in(ids, value_set=firsts.column("image_id").combine_chunks())
    for name, column in [*((name, name) for name in extra), *sources.items()]:
        table = table.append_column(name, firsts.column(column).take(at))
    return table.combine_chunks()


def _first_values(table: pa.Table, columns: list[str]) -> pa.Table:
    """One row per image_id: each column's first value that is not null (in the table's order)."""
    ids = pc.unique(table.column("image_id").combine_chunks())
    if len(ids) == table.num_rows:  # one row per image already
        return table.select(["image_id", *columns])
    rows = pa.array(np.arange(table.num_rows, dtype=np.int64))
    out = {"image_id": ids}
    for name in columns:
        valid = table.column(name).is_valid()
        firsts = (
            pa.table({"image_id": table.column("image_id").filter(valid), "row": rows.filter(valid)})
            .group_by("image_id", use_threads=False)
            .aggregate([("row", "min")])
        )
        at = firsts.column("row_min").take(pc.index_in(ids, value_set=firsts.column("image_id").combine_chunks()))
        out[name] = table.column(name).take(at)
    return pa.table(out)


def visual_vectors(table: pa.Table) -> np.ndarray | None:
    """The `visual` column as (rows, d) float16, zeros where an image has none; None when none has one.
    A value of another length than the others' (a foreign or damaged row) is left out, with a warning:
    one bad row must not stop search."""
    if "visual" not in table.column_names or table.column("visual").null_count == table.num_rows:
        return None
    column = table.column("visual").cast(pa.binary()).combine_chunks()
    lengths = pc.binary_length(column).to_numpy(zero_copy_only=False)
    valid = ~np.asarray(column.is_null(), bool)
    width = int(np.bincount(lengths[valid].astype(np.int64)).argmax())
    bad = valid & (lengths != width)
    if width == 0 or width % 2:
        bad, width = valid, 0
    if bad.any():
        first = table.column("image_id")[int(np.flatnonzero(bad)[0])].as_py()
        log.warning(
            "%d visual vector(s) left out (image %s...): %s",
            int(bad.sum()),
            first,
            f"{int(lengths[bad][0])} bytes where the others have {width}"
            if width
            else "not float16 vectors (an odd or zero number of bytes)",
        )
    if not width:
        return None
    keep = valid & ~bad
    out = np.zeros((len(column), width // 2), "<f2")
    values = column.filter(pa.array(keep))
    offsets = np.frombuffer(values.buffers()[1], np.int32)[values.offset : values.offset + len(values) + 1]
    data = np.frombuffer(values.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    out[keep] = data.view("<f2").reshape(-1, width // 2)
    return out


@dataclass(frozen=True)
class Index:
    """The BLEU index of a table of captions (row i is image i), what its hits show, and the images' likeness
    vectors (in the captioner memory's space) that a query's picture is compared with."""

    table: pa.Table  # image_id, uri, caption (and any extra manifest column), without the reference texts
    references: References | None
    engine: BleuIndex | None
    row_of: dict[str, int]
    visual: np.ndarray | None = None  # (rows, d) float16: each image in the memory's space; zeros: none

    @classmethod
    def build(cls, table: pa.Table, kinds: Iterable[str], max_order: int) -> Index:
        """`table` as version_captions returns it (any captions table with image_id, uri and caption will do)."""
        hidden = ("references", "visual", *SOURCE)
        shown = table.select([name for name in table.column_names if name not in hidden])
        ids = table.column("image_id").to_pylist()
        if not ids:
            return cls(shown, None, None, {})
        references = reference_texts(table, tuple(kinds))
        engine = build_index(ids, references, max_order)
        return cls(shown, references, engine, dict(zip(ids, range(len(ids)))), visual_vectors(table))

    def __len__(self) -> int:
        return len(self.row_of)

    def knows_any(self, query: list[str]) -> bool:
        return self.engine is not None and any(word in self.engine.vocabulary for word in query)

    def compares(self, picture: np.ndarray | None) -> bool:
        """Whether this index has likeness vectors of the picture's space."""
        return picture is not None and self.visual is not None and len(picture) == self.visual.shape[1]

    def candidates(self, plan: Plan, params: BleuParams) -> list[Candidate]:
        """The images that may rank in the plan's top k (search.ranking.rank orders them): its top k by BLEU;
        with a picture, the top max(k, likeness.pool) by BLEU and, for likeness.everyone, the top k + pool by
        cosine too (a target outside the pool ranks by likeness alone, behind at most pool + k others). A plan
        with examples leaves out its negatives' images and says which positive each candidate resembles."""
        if self.engine is None:
            return []
        picture, likeness = plan.picture, plan.likeness
        if likeness is None or not self.compares(picture):
            bleu = self._bleu(plan, plan.k, params)
            rows, cosine = list(bleu), [None] * len(bleu)
        else:
            bleu = self._bleu(plan, max(plan.k, likeness.pool), params)
            rows = list(bleu)
            if likeness.everyone:
                every = cosines(self.visual, picture)
                rows = list(dict.fromkeys([*rows, *top(every, plan.k + len(bleu) + len(plan.excluded)).tolist()]))
                cosine = every[rows].tolist()
            else:
                cosine = cosines(self.visual[rows], picture).tolist()
        ids = self.table.column("image_id")
        found = [
            Candidate(ids[row].as_py(), bleu.get(row, 0.0), c, row, resembles)
            for row, c, resembles in zip(rows, cosine, self._resembles(plan, rows))
        ]
        return [c for c in found if c.image_id not in plan.excluded] if plan.excluded else found

    def _bleu(self, plan: Plan, n: int, params: BleuParams) -> dict[int, float]:
        """row -> BLEU of the plan's top n: by its words, or with examples the best of its words' and each
        positive's caption's, scored exactly for every image any of them found (a share and the whole index
        give an image the same score)."""
        hits = {self.row_of[hit.image_id]: hit.score for hit in self.engine.search(plan.words, n, params)}
        if not plan.also:
            return hits
        texts = [plan.words, *map(list, plan.also)]
        for words in texts[1:]:
            hits.update({self.row_of[hit.image_id]: hit.score for hit in self.engine.search(words, n, params)})
        rows = list(hits)
        images = self.engine_numbers[rows]
        best = np.max([self.engine.scores(words, images, params) for words in texts], axis=0)
        return dict(zip(rows, best.tolist()))

    @cached_property
    def engine_numbers(self) -> np.ndarray:
        """Each row's image number in the engine (which orders images its own way)."""
        numbers = np.empty(len(self.row_of), np.int64)
        numbers[[self.row_of[image_id] for image_id in self.engine.image_ids]] = np.arange(len(numbers))
        return numbers

    def _resembles(self, plan: Plan, rows: list[int]) -> list[int]:
        """For each row, the positive example its likeness vector is nearest (-1: none, or no vector)."""
        if plan.likes is None or self.visual is None or plan.likes.shape[1] != self.visual.shape[1] or not rows:
            return [-1] * len(rows)
        vectors = self.visual[rows].astype(np.float32)
        nearest = (vectors @ plan.likes.T).argmax(axis=1)
        return np.where(np.abs(vectors).sum(axis=1) > 0, nearest, -1).tolist()

    def shown(self, query: list[str], rows: list[int], params: BleuParams) -> list[dict]:
        """What each image (its row) shows as a hit for the query: its id, uri and caption, and the text of it
        that matched the query best."""
        if not rows:
            return []
        taken = self.table.select(["image_id", "uri", "caption"]).take(pa.array(rows, pa.int64()))
        return hit_rows(taken, self.references.take(rows).matched([query] * len(rows), params))


def hit_rows(table: pa.Table, matched: list[tuple[str, str] | None]) -> list[dict]:
    """Rows of image_id, uri and caption, each with the (kind, text) of it that matched, as hits show them."""
    return [
        dict(row, matched_kind=why[0] if why else None, matched_text=why[1] if why else None)
        for row, why in zip(table.select(["image_id", "uri", "caption"]).to_pylist(), matched)
    ]
