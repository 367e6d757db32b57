"""Queries by example (search.examples): more like the positives, less like the negatives, planned once for
every front door; on a small index whose captions do not tell its groups apart but whose pictures do."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from cbir.bleu import BleuParams
from cbir.settings import Settings
from cbir.text import words
from models.neighbours import Memory
from search.examples import Examples, check_examples, example_of, example_refs
from search.index import Index
from search.pictures import Pictures
from search.queries import read_queries
from search.ranking import rank
from search.rules import QueryRefused
from search.searcher import Rules, Searcher

PARAMS = BleuParams()
GROUPS = {"cat": 0, "dog": 1, "bird": 2}  # a group per axis of the likeness space
DIM = 6


def image_id(group: str, n: int) -> str:
    return f"{GROUPS[group]}{n}".ljust(64, "0")


def unit(vector) -> np.ndarray:
    vector = np.asarray(vector, np.float32)
    return vector / np.linalg.norm(vector)


def table() -> pa.Table:
    """Four images per group; every caption says "an animal drawing" (words cannot tell the groups apart), and
    each image's vector is its group's axis with a little of the others (the pictures can)."""
    rng = np.random.default_rng(0)
    rows = []
    for group, axis in GROUPS.items():
        for n in range(4):
            vector = np.eye(DIM)[axis] + 0.15 * rng.random(DIM)
            caption = "an animal drawing" if n else f"an animal drawing of a {group}"
            rows.append((image_id(group, n), caption, unit(vector).astype("<f2").tobytes()))
    ids, captions, visual = zip(*rows)
    return pa.table(
        {"image_id": ids, "uri": [f"u/{i}" for i in ids], "caption": captions, "visual": pa.array(visual, pa.binary())}
    )


def searcher(text_images: int = 0) -> Searcher:
    memory = Memory(
        np.zeros(DIM, np.float32), np.eye(DIM, dtype=np.float32), np.eye(DIM, dtype=np.float16), ["x"] * DIM
    )
    rules = Rules(PARAMS, ("caption",), 100, text_images, 0.25, 50, 100_000)
    return Searcher(Index.build(table(), ("caption",), 4), rules, Pictures(memory, None))


def groups(hits: list[dict]) -> list[int]:
    return [int(hit["image_id"][0]) for hit in hits]


def ask(found: Searcher, text: str | None, like=(), unlike=(), k: int = 4) -> list[dict]:
    examples, failures = found.examples(list(like), list(unlike))
    assert not failures
    return found.search(found.plan("q", words(text), k, examples=examples))


def test_a_positive_lifts_its_group_and_a_negative_lowers_its_group():
    found = searcher()
    plain = ask(found, "an animal drawing")
    assert len(set(groups(plain))) > 1  # by words alone the groups are mixed
    liked = ask(found, "an animal drawing", like=[image_id("dog", 1)])
    assert groups(liked) == [1, 1, 1, 1]
    assert all(hit["example"] == image_id("dog", 1) for hit in liked)  # each says which example it resembles
    away = ask(found, "an animal drawing", like=[image_id("cat", 1)], unlike=[image_id("dog", 2)], k=12)
    assert image_id("dog", 2) not in [hit["image_id"] for hit in away]  # a negative is never a result
    assert groups(away)[:4] == [0, 0, 0, 0] and groups(away)[-4:].count(1) == 3  # the negative's group last


def test_examples_alone_search_for_the_positives_captions_and_pictures():
    found = searcher()
    hits = ask(found, None, like=[image_id("bird", 0)], k=4)
    assert groups(hits) == [2, 2, 2, 2]
    assert hits[0]["image_id"] == image_id("bird", 0) and hits[0]["matched_text"] == "an animal drawing of a bird"


def test_the_text_picture_moves_toward_the_positives_and_away_from_the_negatives():
    examples = Examples(
        (example_of("p", "x", [0, 1, 0]),), (example_of("n1", "x", [0, 0, 1]), example_of("n2", "x", [0, 0, 1]))
    )
    picture = examples.picture(np.array([1.0, 0, 0]), (1.0, 0.75, 0.25))
    np.testing.assert_allclose(picture, unit([1.0, 0.75, -0.25]), atol=1e-6)
    assert Examples((), (example_of("n", "x", [0, 0, 1]),)).picture(None, (1, 0.75, 0.25)) is None
    assert example_of("zeros", "x", [0, 0, 0]).vector is None  # an image without a stored vector


def test_an_unknown_example_is_left_out_and_named_the_rest_answered():
    found = searcher()
    examples, failures = found.examples([image_id("dog", 1), "f" * 64], ["nonsense"])
    assert [e.name for e in examples.positive] == [image_id("dog", 1)] and not examples.negative
    assert failures == [
        f"positive example {'f' * 64}: not-found: no indexed image has this id",
        "negative example nonsense: not-found: no indexed image has this id",
    ]


def test_an_index_without_likeness_vectors_says_to_reindex():
    plain = Searcher(Index.build(table().drop_columns(["visual"]), ("caption",), 4), searcher().rules, None)
    _, failures = plain.examples([image_id("dog", 1)], [])
    assert failures == [
        f"positive example {image_id('dog', 1)}: example images need likeness vectors: reindex with `cbir index`"
    ]


def test_shares_rank_examples_as_the_whole_index_does():
    """The query job's tasks each search a share and the job ranks their candidates together: the same hits."""
    found = searcher()
    examples, _ = found.examples([image_id("cat", 2), image_id("bird", 0)], [image_id("dog", 3)])
    plan = found.plan("q", words("a drawing of a cat"), 5, examples=examples)
    whole = found.search(plan)
    rows = table()
    shares = [
        Index.build(rows.filter(pa.array([i % 2 == s for i in range(rows.num_rows)])), ("caption",), 4) for s in (0, 1)
    ]
    candidates = {}
    for share in shares:
        for c in share.candidates(plan, PARAMS):
            candidates.setdefault(c.image_id, c)
    merged = rank(candidates.values(), plan.k, plan.likeness)
    assert [(c.image_id, score, plan.example(c.resembles)) for score, c in merged] == [
        (hit["image_id"], hit["score"], hit["example"]) for hit in whole
    ]


def test_the_engine_scores_given_images_as_its_search_does():
    """A positive's caption scores the images another word list found exactly as a search by it would."""
    index = Index.build(table(), ("caption",), 4)
    for query in (["an", "animal", "drawing"], ["a", "drawing", "of", "a", "bird"], ["bird"], ["zebra"]):
        hits = {hit.image_id: hit.score for hit in index.engine.search(query, 12, PARAMS)}
        ids = table().column("image_id").to_pylist()
        scores = index.engine.scores(query, index.engine_numbers[[index.row_of[i] for i in ids]], PARAMS)
        assert dict(zip(ids, scores)) == {i: hits.get(i, 0.0) for i in ids}


@pytest.mark.parametrize(
    ("positive", "negative", "text", "reason"),
    [
        (["a"], ["a"], True, "bad-examples"),
        ([], ["a"], False, "bad-examples"),
        ([str(n) for n in range(15)], [str(n) for n in range(15, 21)], True, "too-many-examples"),
    ],
)
def test_queries_with_examples_are_refused_with_one_line(positive, negative, text, reason):
    with pytest.raises(QueryRefused) as refused:
        check_examples(positive, negative, 20, has_text=text)
    assert refused.value.reason == reason and "\n" not in str(refused.value)


def test_example_columns_are_lists_json_in_a_csv_cell_or_pipes():
    assert example_refs(["a.png", " b.png "], "positive") == ["a.png", "b.png"]
    assert example_refs('["a.png", "b c.png"]', "positive") == ["a.png", "b c.png"]
    assert example_refs("a.png|b.png", "positive") == ["a.png", "b.png"]
    assert example_refs(None, "positive") == [] and example_refs("", "positive") == []
    with pytest.raises(QueryRefused):
        example_refs("[1, 2]", "positive")
    with pytest.raises(QueryRefused):
        example_refs("[not json", "positive")


def test_a_query_file_with_positive_and_negative_columns(tmp_path):
    rows = [
        {"query_id": "more", "text": "a dog", "positive": ["dog.png", "a" * 64], "negative": ["cat.png"]},
        {"query_id": "alone", "positive": ["dog.png"]},
        {"query_id": "both", "text": "a dog", "positive": ["dog.png"], "negative": ["dog.png"]},
        {"query_id": "only-negative", "negative": ["dog.png"]},
        {"query_id": "image-too", "image": "x.png", "positive": ["dog.png"]},
        {"query_id": "web", "text": "a dog", "positive": ["http://example.com/dog.png"]},
    ]
    path = tmp_path / "queries.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    queries, errors = read_queries(str(path), Settings(lake=str(tmp_path / "lake")))
    by_id = {q.query_id: q for q in queries}
    assert by_id["more"].positive == (str(tmp_path / "dog.png"), "a" * 64)
    assert by_id["more"].negative == (str(tmp_path / "cat.png"),)
    assert by_id["alone"].text is None and by_id["alone"].positive == (str(tmp_path / "dog.png"),)
    assert {query_id: error.reason for query_id, error in errors} == {
        "both": "bad-examples",
        "only-negative": "bad-examples",
        "image-too": "bad-row",
        "web": "unsupported-uri",
    }
