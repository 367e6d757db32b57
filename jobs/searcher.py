"""Searcher: search without Spark. The captions and references of a captioner version, read once; the
BLEU index over them; a query's exact top k with why each image matched; an image query captioned
as the index job captions; BLEU blended with visual similarity.

cbir web and cbir search use it in their own process; each Spark task of the query job uses it over
its share of the captions, so every way of searching ranks alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from cbir.bleu import BleuParams
from cbir.engine import BleuIndex
from cbir.errors import UsageError
from cbir.images import ImageRejected, Limits, inspect_image
from cbir.lake import Lake
from cbir.references import SOURCE, SOURCE_COLUMNS, References, build_index, reference_texts
from cbir.schemas import CAPTIONS, subschema
from cbir.settings import Settings
from cbir.text import too_many_words, words
from jobs.encoding import EncoderConfig, encode_chunks, encoder_config, load_captioner, read_features
from jobs.reader import read_bytes
from models import store
from models.captioner import Decoding
from models.neighbours import Prototypes

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


# The index.
@dataclass(frozen=True)
class PrototypeRanking:
    """How text queries borrow a picture (models.neighbours.Prototypes): `images` remembered images make it,
    and the top `pool` images by BLEU are ranked by (1 - weight) * BLEU + weight * likeness to it."""

    images: int = 0
    weight: float = 0.0
    pool: int = 0
    all_images: int = 0  # an index this small ranks every image by likeness too: words miss many targets

    @classmethod
    def from_settings(cls, settings: Settings) -> PrototypeRanking:
        q = settings.query
        return cls(q.prototype_images, q.prototype_weight, q.prototype_pool, q.prototype_all_images)

    def everyone(self, images: int) -> bool:
        """Whether an index of this many images ranks them all, not only the BLEU pool."""
        return images <= self.all_images

    @property
    def on(self) -> bool:
        return self.images > 0 and self.weight > 0 and self.pool > 0


OFF = PrototypeRanking()


def load_prototypes(lake: Lake, version: str | None, settings: Settings) -> Prototypes | None:
    """The pictures text queries borrow from this captioner version's memory; None when it has none, the
    ranking is off, the lake holds captions but not their captioner (a copied table), or its memory.npz is
    refused (damaged or foreign: one warning)."""
    ranking = PrototypeRanking.from_settings(settings)
    if version is None or not ranking.on:
        return None
    try:
        card = store.card(lake, version)
    except UsageError:
        return None
    try:
        memory = store.load_memory(lake, card)
    except UsageError as exc:  # a damaged or foreign memory: say so once, and rank by BLEU alone
        log.warning("%s: text queries are ranked without pictures", exc)
        return None
    return Prototypes.of(memory, ranking.images, bleu_params(settings).max_order) if memory is not None else None


def with_pictures(queries: list, prototypes: Prototypes | None, params: BleuParams) -> None:
    """Give each text query (a jobs.queries.Query with text) its picture, in the driver: the tasks only
    compare it with their images."""
    if prototypes is None:
        return
    for query in queries:
        if query.text is not None and query.words:
            query.picture = prototypes.picture(query.words, params)


def likeness(vectors: np.ndarray, picture: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Cosines of the (unit, float16) vectors with the picture, the same whichever rows are computed together
    (a Spark task holds some, the web app all): exact float64 products, summed, rounded to float32; float32
    sums in BLAS vary with the rows' layout in the last bit, which would break ties differently."""
    picture = np.asarray(picture, np.float64)
    out = np.empty(len(vectors), np.float32)
    for start in range(0, len(vectors), chunk):
        out[start : start + chunk] = vectors[start : start + chunk].astype(np.float64) @ picture
    return out.astype(np.float64)


def _top(values: np.ndarray, n: int) -> np.ndarray:
    """The indices of the n largest values (unordered)."""
    return np.arange(len(values)) if n >= len(values) else np.argpartition(-values, n - 1)[:n]


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
    """The BLEU index of a table of captions (row i is image i) and what its hits show; with the images'
    visual vectors and the memory's pictures, text queries' BLEU pools re-ranked by likeness."""

    table: pa.Table  # image_id, uri, caption (and any extra manifest column), without the reference texts
    references: References | None
    engine: BleuIndex | None
    row_of: dict[str, int]
    visual: np.ndarray | None = None  # (rows, d) float16: each image in the memory's space; zeros: none
    prototypes: Prototypes | None = None
    ranking: PrototypeRanking = OFF

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

    def with_prototypes(self, prototypes: Prototypes | None, ranking: PrototypeRanking) -> Index:
        return replace(self, prototypes=prototypes, ranking=ranking)

    def __len__(self) -> int:
        return len(self.row_of)

    def knows_any(self, query: list[str]) -> bool:
        return self.engine is not None and any(word in self.engine.vocabulary for word in query)

    def picture(self, query: list[str], params: BleuParams) -> np.ndarray | None:
        """The picture a text query borrows from the memory, when this index re-ranks by one."""
        if self.prototypes is None or not self.ranking.on or self.visual is None:
            return None
        return self.prototypes.picture(query, params)

    def search(
        self, query: list[str], k: int, params: BleuParams, by_text: bool = True, picture: np.ndarray | None = None
    ) -> list[dict]:
        """The top k, best first: image_id, uri, caption, score, matched_kind and matched_text of each. A text
        query (by_text) is ranked with its picture (given, or borrowed now) when the index has one; the
        score is then the blend. An image query's caption searches by BLEU alone."""
        if picture is None and by_text:
            picture = self.picture(query, params)
        return self.hits(query, self.ranked(query, k, params, picture), params)

    def ranked(
        self,
        query: list[str],
        k: int,
        params: BleuParams,
        picture: np.ndarray | None = None,
        everyone: bool | None = None,
        cut: bool = True,
    ) -> list[tuple[str, float, float, float | None]]:
        """(image_id, score, BLEU, cosine) of the top k, best first: by BLEU; or, given a picture, by
        weight * cosine + (1 - weight) * BLEU, the BLEU counted for the top ranking.pool by BLEU only, over
        that pool, or over every image when the index is small (`everyone`: decided for the whole index by
        the Spark search); ties by image_id. Not `cut`: every candidate, for the Spark search to merge."""
        if self.engine is None:
            return []
        if picture is None or self.visual is None or not self.ranking.on or len(picture) != self.visual.shape[1]:
            return [(hit.image_id, hit.score, hit.score, None) for hit in self.engine.search(query, k, params)]
        everyone = self.ranking.everyone(len(self)) if everyone is None else everyone
        pool = self.engine.search(query, max(k, self.ranking.pool), params)
        bleu = {self.row_of[hit.image_id]: hit.score for hit in pool}
        rows = list(bleu)
        if everyone:  # a target outside the pool ranks by likeness alone, behind at most pool + k others
            cosine = likeness(self.visual, picture)
            rows = list(dict.fromkeys([*rows, *_top(cosine, k + len(pool)).tolist()]))
        else:
            cosine = dict(zip(rows, likeness(self.visual[rows], picture).tolist()))
        w, ids = self.ranking.weight, self.table.column("image_id")
        scored = [(w * float(cosine[row]) + (1 - w) * bleu.get(row, 0.0), ids[row].as_py(), row) for row in rows]
        scored.sort(key=lambda item: (-item[0], item[1]))
        scored = scored[:k] if cut else scored
        return [(image_id, score, bleu.get(row, 0.0), float(cosine[row])) for score, image_id, row in scored]

    def hits(self, query: list[str], ranked: list[tuple[str, float, float]], params: BleuParams) -> list[dict]:
        """What each ranked image shows: its uri and caption, its score and the text that matched best."""
        if not ranked:
            return []
        rows = [self.row_of[image_id] for image_id, *_ in ranked]
        shown = self.table.select(["uri", "caption"]).take(pa.array(rows, pa.int64())).to_pylist()
        matched = self.references.matched(query, rows, params)
        return [
            dict(
                image_id=image_id,
                uri=row["uri"],
                caption=row["caption"],
                score=score,
                matched_kind=why[0] if why else None,
                matched_text=why[1] if why else None,
            )
            for (image_id, score, *_), row, why in zip(ranked, shown, matched)
        ]


# Image queries.
@dataclass(frozen=True)
class ImageCaptioner:
    """Captions images as the index job does: the same encoder, preprocessing, rounding of the features and
    decoding; the captioner is loaded once per process."""

    lake: Lake
    version: str
    encoder: EncoderConfig
    decoding: Decoding

    @classmethod
    def from_settings(cls, lake: Lake, version: str, settings: Settings, parallel_tasks: int = 1) -> ImageCaptioner:
        return cls(lake, version, encoder_config(settings, parallel_tasks), Decoding.from_settings(settings.captioner))

    def load(self) -> None:
        """Load the encoder and the captioner now (TensorFlow's threads are set before its first use)."""
        self.encoder.load()
        load_captioner(self.lake, self.version, self.encoder)

    def caption(self, rows: Iterable[dict], read: Callable[[dict], bytes]) -> Iterator[tuple]:
        """(row, caption, features, None) for each image read and encoded, (row, None, None, reason) for the others."""
        captioner = load_captioner(self.lake, self.version, self.encoder)
        for chunk in encode_chunks(self.encoder, rows, read):
            decoded = captioner.decode(chunk.vectors, self.decoding) if chunk.rows else []
            for row, best, vector in zip(chunk.rows, decoded, chunk.vectors):
                yield row, best[0][0], vector, None
            for row, reason in chunk.failed:
                yield row, None, None, reason


def indexed(
    lake: Lake, config: EncoderConfig, version: str, image_ids: list[str]
) -> dict[str, tuple[str, list[float]]]:
    """image_id -> (caption, features) of the images this captioner version captioned."""
    captions, vectors = captions_of(lake, version, image_ids), read_features(lake, config, image_ids)
    return {
        image_id: (caption, vectors[image_id].tolist()) for image_id, caption in captions.items() if image_id in vectors
    }


def read_image(uri: str, settings: Settings, filesystems: dict | None = None) -> tuple[str, bytes]:
    """(image_id, bytes) of an image query, after the checks ingest makes; ImageRejected says why not."""
    limits = Limits.from_settings(settings.ingest)
    data = read_bytes(uri, settings.s3, {} if filesystems is None else filesystems, limits.max_bytes)
    return inspect_image(data, limits).image_id, data


def caption_image(lake: Lake, settings: Settings, card: dict, uri: str) -> str:
    """The caption of an example image: its stored one when this captioner indexed it, else made now."""
    captioner = ImageCaptioner.from_settings(lake, card["version"], settings)
    store.check_encoder(card, captioner.encoder.key)
    try:
        image_id, data = read_image(uri, settings)
    except ImageRejected as exc:
        raise UsageError(f"{uri}: {exc}") from None
    known = captions_of(lake, card["version"], [image_id])
    if image_id in known:
        return known[image_id]
    ((_, caption, _, reason),) = captioner.caption([{"image_id": image_id}], lambda row: data)
    if reason:
        raise UsageError(f"{uri}: {reason}")
    return caption


# Visual similarity.
def blend(bleu: np.ndarray, images: np.ndarray, queries: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(cosine of each image's features with its query's, BLEU blended with it): row i is one hit."""
    norms = np.linalg.norm(images, axis=1) * np.linalg.norm(queries, axis=1)
    cosine = np.where(norms > 0, (images * queries).sum(axis=1) / np.where(norms > 0, norms, 1), 0.0)
    return cosine, (1 - weight) * bleu + weight * cosine


# One query, in this process (cbir search).
def search_one(
    lake: Lake, settings: Settings, k: int, text: str | None = None, image: str | None = None
) -> tuple[str | None, list[dict]]:
    """One query by text or by example image: (the image's caption, or None; its top k, each with its rank)."""
    card = store.card(lake, settings.captioner.version)
    caption = caption_image(lake, settings, card, image) if image is not None else None
    query = words(text if text is not None else caption)
    if not query:
        raise UsageError("the query has no words")
    if long := too_many_words(text, settings.query.max_words):
        raise UsageError(f"the query is too long: {long}")
    from jobs.index_cache import cached_index  # it imports this module

    kinds, params = tuple(settings.bleu.references), bleu_params(settings)
    index = cached_index(lake, settings.state_dir, card["version"], kinds, params.max_order)
    if text is not None:  # an image query's caption searches by BLEU alone: no memory to load for it
        prototypes = load_prototypes(lake, card["version"], settings)
        index = index.with_prototypes(prototypes, PrototypeRanking.from_settings(settings))
    hits = index.search(query, k, params, by_text=text is not None)
    return caption, [dict(rank=rank, **hit) for rank, hit in enumerate(hits, start=1)]
