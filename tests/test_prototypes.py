"""Text queries borrow a picture from the captioner's memory: the BLEU pool re-ranked by likeness to it."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest

from cbir.bleu import BleuParams
from models.neighbours import Memory, Prototypes
from search import cache as index_cache
from search.index import Index
from search.pictures import Pictures
from search.searcher import Rules, Searcher

PARAMS = BleuParams()
RED, GREEN = [1.0, 0.0], [0.0, 1.0]
CAPTIONS = {"a": "an apple", "b": "an apple on a table", "c": "apple tree", "d": "a red car"}


def memory() -> Memory:
    """Three remembered drawings in a 2-d space: a red apple, a green apple, a blue car."""
    vectors = np.array([RED, GREEN, [0.6, 0.8]], np.float16)
    texts = np.array(["red apple", "green apple", "blue car"])
    return Memory(np.zeros(2, np.float32), np.eye(2, dtype=np.float32), vectors, texts)


def visual(*vectors) -> pa.Array:
    return pa.array([None if v is None else np.array(v, "<f2").tobytes() for v in vectors], pa.binary())


def captions(column: pa.Array | None = None) -> pa.Table:
    table = pa.table(
        {"image_id": list(CAPTIONS), "uri": [f"u/{i}" for i in CAPTIONS], "caption": list(CAPTIONS.values())}
    )
    return table if column is None else table.append_column("visual", column)


class Searched(Searcher):
    """A searcher as cbir search holds one, asked as the tests ask: words, k (and an image query's features)."""

    def search(self, query: list[str], k: int, params: BleuParams = PARAMS, by_text: bool = True) -> list[dict]:
        hits = super().search(self.plan("q", query, k, None if by_text else [1.0, 0.0]))
        return [{key: value for key, value in hit.items() if key != "rank"} for hit in hits]

    @property
    def engine(self):
        return self.index.engine

    @property
    def visual(self):
        return self.index.visual


def rules(images: int = 1, weight: float = 0.5, pool: int = 50, all_images: int = 0) -> Rules:
    return Rules(PARAMS, ("caption",), 100, images, weight, pool, all_images)


def pictures(images: int = 1) -> Pictures:
    return Pictures(memory(), Prototypes.of(memory(), images, 4))


def index(table: pa.Table, images: int = 1, weight: float = 0.5, pool: int = 50, all_images: int = 0) -> Searched:
    return Searched(Index.build(table, ("caption",), 4), rules(images, weight, pool, all_images), pictures(images))


def ids(hits: list[dict]) -> list[str]:
    return [hit["image_id"] for hit in hits]


def test_the_picture_is_the_bleu_weighted_mean_of_the_best_matching_remembered_images():
    prototypes = Prototypes.of(memory(), 2, 4)
    np.testing.assert_allclose(prototypes.picture(["apple"], PARAMS), np.array([1, 1]) / np.sqrt(2), atol=1e-6)
    np.testing.assert_allclose(Prototypes.of(memory(), 1, 4).picture(["red", "apple"], PARAMS), RED, atol=1e-6)
    assert prototypes.picture(["table"], PARAMS) is None  # no remembered text has the word


def test_the_picture_re_ranks_the_bleu_pool_as_computed_by_hand():
    searched = index(captions(visual(GREEN, RED, GREEN, RED)))
    by_bleu = searched.engine.search(["red", "apple"], 10, PARAMS)
    # The picture of "red apple" is RED; cosine 1 for b and d, 0 for a and c; blend 0.5 / 0.5.
    cosine = {"a": 0.0, "b": 1.0, "c": 0.0, "d": 1.0}
    expected = sorted(by_bleu, key=lambda hit: (-(0.5 * hit.score + 0.5 * cosine[hit.image_id]), hit.image_id))
    hits = searched.search(["red", "apple"], 3, PARAMS)
    assert ids(hits) == [hit.image_id for hit in expected][:3]
    assert ids(hits) != [hit.image_id for hit in by_bleu][:3]  # the picture changed the order
    assert hits[0]["score"] == pytest.approx(
        0.5 * by_bleu[[h.image_id for h in by_bleu].index(ids(hits)[0])].score + 0.5
    )
    # A pool of one: only the best by BLEU is ranked at all.
    assert ids(index(captions(visual(GREEN, RED, GREEN, RED)), pool=1).search(["red", "apple"], 1, PARAMS)) == [
        by_bleu[0].image_id
    ]


def test_a_small_index_ranks_every_image_by_likeness_the_pool_by_its_blend_too():
    table = captions(visual(GREEN, RED, GREEN, RED))
    assert "d" not in ids(index(table).search(["apple"], 4, PARAMS))  # "a red car" has no word of the query
    hits = index(table, all_images=4).search(["apple"], 4, PARAMS)
    assert "d" in ids(hits) and hits[ids(hits).index("d")]["score"] == pytest.approx(0.5)  # likeness alone
    assert "d" not in ids(index(table, all_images=3).search(["apple"], 4, PARAMS))  # 4 images: more than 3


def test_bleu_order_stays_without_a_picture_an_image_query_or_the_ranking_off():
    table = captions(visual(GREEN, RED, GREEN, RED))
    plain = Searched(Index.build(table, ("caption",), 4), Rules(PARAMS, ("caption",)))  # BLEU alone
    assert index(table).search(["table"], 4, PARAMS) == plain.search(["table"], 4, PARAMS)  # no remembered text has it
    assert index(table).search(["red", "apple"], 4, PARAMS, by_text=False) == plain.search(["red", "apple"], 4, PARAMS)
    off = index(table, weight=0.0)
    assert off.search(["red", "apple"], 4, PARAMS) == plain.search(["red", "apple"], 4, PARAMS)


def test_a_table_without_visual_vectors_still_searches_by_bleu():
    old = index(captions())  # written before the column
    assert old.visual is None
    plain = Searched(Index.build(captions(), ("caption",), 4), Rules(PARAMS, ("caption",)))  # BLEU alone
    assert old.search(["red", "apple"], 4, PARAMS) == plain.search(["red", "apple"], 4, PARAMS)
    assert index(captions(visual(None, None, None, None))).visual is None


def test_a_visual_vector_of_another_length_is_left_out_with_a_warning(caplog):
    hostile = visual(GREEN, RED, None, RED)
    hostile = pa.array([*hostile.to_pylist()[:2], b"\x00\x3c\x00", hostile[3].as_py()], pa.binary())
    with caplog.at_level(logging.WARNING, logger="cbir.search"):
        searched = index(captions(hostile))
    assert "1 visual vector(s) left out (image c...): 3 bytes where the others have 4" in caplog.text
    np.testing.assert_array_equal(searched.visual, np.array([GREEN, RED, [0, 0], RED], np.float16))
    assert len(searched.search(["apple"], 4, PARAMS)) == 3


def test_the_saved_index_keeps_the_visual_vectors(tmp_path):
    built = Index.build(captions(visual(GREEN, RED, None, [0.6, 0.8])), ("caption",), 4)
    key = {"format": index_cache.FORMAT, "lake": "test"}
    index_cache.save(built, tmp_path / "entry", key)
    loaded = index_cache.load(tmp_path / "entry", key)
    assert loaded.visual.dtype == np.float16 and np.array_equal(loaded.visual, built.visual)
    assert Searched(loaded, rules(), pictures()).search(["red", "apple"], 4) == Searched(
        built, rules(), pictures()
    ).search(["red", "apple"], 4)
